"""The identifying values of an instance, and the fail-closed scan for them after de-identification.

`identifying_values` reads the original before it is changed: every name (whole and by component),
patient and accession IDs, dates, addresses, telephone numbers, institution and device names, and
the codes of person identification sequences, each with its kind. `residual_scan` then looks for
them in every element of the output, sequences and file meta included, text VRs as text and
binary VRs (OB, OW, UN ...) as bytes read as latin-1 and as UTF-8.

It must be exact, because a scan that cries wolf gets switched off:

- values are folded (case, accents, and letters NFKD keeps: ø, ł, æ, ß, þ) and compared by
  kind: name parts, addresses and institution or station names on token boundaries (`MARY` is
  not in `PRIMARY`), names in scripts written without spaces (山田太郎様) as substrings; IDs as
  substrings (digits not inside a longer number, written with spaces, dots, hyphens or
  slashes, with or without leading zeros); telephone numbers also by their last 7 digits;
  dates in the formats people write them (19800102, 1980-01-02, 02.01.1980, 01/02/1980,
  2 Jan 1980, 1980-Jan-02, 1980年1月2日 ...), the birth date also with a 2-digit year;
- a name is looked for whole, by component, given before family, and word by word (a family
  name of two words, a name stored without ^); an institution name or address also by its
  distinctive words (data/generic-words.txt lists the words that are not);
- identifiers are those the module lists and every ID, number or identifier Table E.1-1 does
  not keep (StudyID, order numbers, procedure step and trial subject IDs ...);
- values shorter than 3 characters (initials) are never looked for;
- not evidence (`evidence`): the node's own dummy values; a single name word, institution or
  device name that the input holds as a whole defined term (CS) or in a published scheme's
  code (Head, X-Ray); a device name equal to the kept model name; a vendor's name recorded as
  institution (data/vendors.txt) and kept as Manufacturer; a numeric ID equal to a kept
  IS/DS number. An ID, a whole name or a date typed into a kept attribute stays evidence (the
  profile cleans kept technical text that holds one, `deid.tags`);
- bulk sample data (pixels, LUTs, waveforms) are not read: numbers in them spell digits by
  chance. ICC profiles are read.

A hit names the element's path and the kind of value, never the value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from importlib import resources
from typing import Any, overload

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from deid_node.config import DeidConfig
from deid_node.deid.profile import OPTIONS, load_keep_list, load_profile_table, option_columns

# Kinds of identifying value, as reported.
NAME = "name part"
ID = "ID"
DATE = "date"
BIRTH_DATE = "birth date"  # also matched with a 2-digit year (07.11.43)
ADDRESS = "address"
PHONE = "telephone"
INSTITUTION = "institution"
DEVICE = "device"
OTHER = "other"
RETAINED = "retained"  # collected only to know what a Retain option keeps, never evidence

_KIND_BY_KEYWORD: dict[str, str] = {
    "PatientID": ID,
    "OtherPatientIDs": ID,
    "AccessionNumber": ID,
    "AdmissionID": ID,
    "ServiceEpisodeID": ID,
    "MedicalRecordLocator": ID,
    "IssuerOfPatientID": INSTITUTION,
    "PatientBirthDate": BIRTH_DATE,
    "PatientAddress": ADDRESS,
    "ReferringPhysicianAddress": ADDRESS,
    "PersonAddress": ADDRESS,
    "RegionOfResidence": ADDRESS,
    "PatientTelephoneNumbers": PHONE,
    "PatientTelecomInformation": PHONE,
    "ReferringPhysicianTelephoneNumbers": PHONE,
    "PersonTelephoneNumbers": PHONE,
    "MilitaryRank": OTHER,
    "ResponsibleOrganization": INSTITUTION,
}
_INSTITUTION_KEYWORDS = {
    "InstitutionName": INSTITUTION,
    "InstitutionAddress": ADDRESS,
    "InstitutionalDepartmentName": INSTITUTION,
}
_DEVICE_KEYWORDS = {"StationName": DEVICE, "DeviceSerialNumber": ID}
# Identifiers that Table E.1-1 removes, replaces or empties (StudyID, order numbers, procedure
# step, trial subject, specimen, device IDs ...), found by their keyword in the table itself.
_ID_KEYWORD = re.compile(r"(?:ID|IDs|Number|Numbers|Identifier|Locator)(?=[A-Z]|$)")
_ID_VRS = frozenset({"CS", "IS", "LO", "LT", "SH", "ST", "UC", "UT"})
_REMOVING_ACTIONS = frozenset({"D", "X", "Z", "X/D", "X/Z", "Z/D", "X/Z/D", "X/Z/U*"})
# Codes inside these sequences name a person or an organisation (an employee number), not a
# concept; Table E.1-1 lists them all, so their codes are identifying values.
_IDENTIFICATION_SEQUENCE = re.compile(r"Identification(Code)?Sequence$|^InstitutionCodeSequence$")
_CODE_KEYWORDS = frozenset({"CodeValue", "LongCodeValue", "URNCodeValue", "CodeMeaning"})
_SCHEME_KEYWORDS = frozenset({"CodingSchemeDesignator", "CodingSchemeVersion"})

TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NUMBER_VRS = frozenset({"DS", "IS"})
_CODED_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "TM"})
_DATE_VRS = frozenset({"DA", "DT"})

# The node's own values: dummies written for Type 1 attributes, the de-identification marks.
DUMMY_TEXT = ("ANONYMOUS", "19000101", "19000101000000", "000000", "urn:anonymous", "000D")
_OWN_TEXT = ("DEID_NODE_0_1",)  # tags.IMPLEMENTATION_VERSION_NAME
_OWN_ELEMENTS = frozenset(
    {
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    }
)
GENERIC_WORDS_TXT = "generic-words.txt"
VENDORS_TXT = "vendors.txt"
# Name words that are no name by themselves: particles of compound family names, titles.
_PARTICLES = frozenset(
    [
        "van",
        "von",
        "der",
        "den",
        "del",
        "della",
        "dei",
        "des",
        "dos",
        "das",
        "ter",
        "ten",
        "het",
        "bin",
        "ibn",
        "ben",
        "zum",
        "zur",
        "los",
        "las",
        "mrs",
        "miss",
        "prof",
        "sir",
        "dame",
        "phd",
    ]
)
_WORD = re.compile(r"[^\W\d_]+")
_MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]


class IdentifyingValue(str):
    """An identifying string of the original, with its kind (NAME, ID, DATE ...)."""

    kind: str

    def __new__(cls, value: str, kind: str) -> IdentifyingValue:
        obj = super().__new__(cls, value)
        obj.kind = kind
        return obj


class Identifiers(Sequence[str]):
    """The identifying values of one instance (a sequence of strings, for the OCR classifier),
    plus what the scan must not count as evidence: values the input holds in attributes kept as
    technical (`technical`: make, model, software; `terms`: defined terms, CS values; `codes`:
    codes and meanings of published schemes; `numbers`: kept IS/DS values; `retained`: the
    institution or device a Retain option keeps), and the node's own values."""

    def __init__(
        self,
        values: Iterable[str],
        technical: Iterable[str] = (),
        own: Iterable[str] = (),
        pseudonym_prefix: str = "DEID",
        terms: Iterable[str] = (),
        codes: Iterable[str] = (),
        numbers: Iterable[int] = (),
        retained: Iterable[str] = (),
    ) -> None:
        self.values: tuple[str, ...] = tuple(values)
        self.pseudonym_prefix = pseudonym_prefix
        self.technical: tuple[str, ...] = tuple(technical)
        self.own: tuple[str, ...] = tuple(own)
        self.terms: tuple[str, ...] = tuple(terms)
        self.codes: tuple[str, ...] = tuple(codes)
        self.numbers: frozenset[int] = frozenset(numbers)
        self.retained: tuple[str, ...] = tuple(retained)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self.values[index]

    def __len__(self) -> int:
        return len(self.values)


class Hit(str):
    """One element of the output holding an identifying value: `path (kind)` as a string."""

    path: str
    keyword: str
    kind: str

    def __new__(cls, path: str, keyword: str, kind: str) -> Hit:
        obj = super().__new__(cls, f"{path} ({kind})")
        obj.path, obj.keyword, obj.kind = path, keyword, kind
        return obj


# --- collecting ---------------------------------------------------------------------------------


def identifying_values(ds: Dataset, config: DeidConfig | None = None) -> Identifiers:
    """The original's identifying values with their kinds, at all depths. Call before
    de-identifying. With `config`, values a selected Retain option keeps (institution, device,
    dates) are left out, and the node's own values are known."""
    options = set(config.profile_options) if config else set()
    kinds = _table_id_kinds(option_columns(o for o in OPTIONS if o in options))
    kinds |= _KIND_BY_KEYWORD
    # What a Retain option keeps is in the output by choice: an issuer named like the kept
    # institution is no leak there.
    retain_institution = "Retain Institution Identity" in options
    kinds |= {k: RETAINED if retain_institution else v for k, v in _INSTITUTION_KEYWORDS.items()}
    retain_device = "Retain Device Identity" in options
    kinds |= {k: RETAINED if retain_device else v for k, v in _DEVICE_KEYWORDS.items()}
    dates = not any("Longitudinal" in o for o in options)
    by_tag = {_tag(k): kind for k, kind in kinds.items()}
    found: dict[str, IdentifyingValue] = {}
    kept = _Kept()
    _collect(ds, by_tag, dates, found, kept, identification=False, technical_ok=True)
    own = [*DUMMY_TEXT, *_OWN_TEXT, *(o for o in (OPTIONS[n][2] for n in OPTIONS))]
    own += ["Basic Application Confidentiality Profile", "Clean Pixel Data Option"]
    if config is not None:
        own += [config.patient_id_prefix, config.method_description]
    prefix = config.patient_id_prefix if config is not None else "DEID"
    return Identifiers(
        found.values(),
        kept.technical,
        own,
        prefix,
        terms=kept.terms,
        codes=kept.codes,
        numbers=kept.numbers,
        retained=kept.retained,
    )


@cache
def _table_id_kinds(columns: tuple[str, ...]) -> dict[str, str]:
    """Keyword -> kind for the identifiers Table E.1-1 does not keep under these options."""
    kinds: dict[str, str] = {}
    for tag, row in load_profile_table().by_tag.items():
        keyword = keyword_for_tag(tag)
        if not keyword or not _ID_KEYWORD.search(keyword) or keyword.endswith("UID"):
            continue
        if _dictionary_vr(tag) not in _ID_VRS or row.action(columns) not in _REMOVING_ACTIONS:
            continue
        if "Phone" in keyword:
            kinds[keyword] = PHONE
        elif "Issuer" in keyword:
            kinds[keyword] = INSTITUTION
        else:
            kinds[keyword] = ID
    return kinds


class _Kept:
    """What the input holds in attributes that the profile keeps as they are."""

    def __init__(self) -> None:
        self.technical: dict[str, None] = {}  # kept technical text (make, model, software)
        self.terms: dict[str, None] = {}  # defined terms (CS values)
        self.codes: dict[str, None] = {}  # codes and meanings of published coding schemes
        self.numbers: set[int] = set()  # whole numbers of kept IS/DS attributes
        self.retained: dict[str, None] = {}  # institution or device kept by a Retain option


@cache
def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


def _collect(
    ds: Dataset,
    by_tag: dict[int, str],
    dates: bool,
    found: dict[str, IdentifyingValue],
    kept: _Kept,
    identification: bool,
    technical_ok: bool,
) -> None:
    """Reads the VR from the raw element where it can: converting every element (pixel data
    included) only to look at its VR costs more than the rest of the de-identification."""
    table = load_profile_table()
    keep = load_keep_list()
    for tag, raw in ds._dict.items():  # noqa: SLF001 - raw elements, not converted values
        vr = getattr(raw, "VR", None) or _dictionary_vr(tag)
        vr = vr.split(" or ")[0] if vr else None
        if vr in BINARY_VRS - {"UN"}:
            continue
        listed = table.row(tag) is not None
        if vr in _NUMBER_VRS and tag not in by_tag:
            if technical_ok and not listed:
                kept.numbers.update(_whole_numbers(raw))
            continue
        keyword = keyword_for_tag(tag)
        if (
            vr not in ("PN", "SQ", "UN", "CS", None)
            and vr not in _DATE_VRS
            and tag not in by_tag
            and keyword not in _CODE_KEYWORDS
            and keep.keywords.get(keyword) not in ("keep", "clean")
        ):
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            child_identification = bool(_IDENTIFICATION_SEQUENCE.search(keyword)) and listed
            for item in elem.value or []:
                _collect(
                    item,
                    by_tag,
                    dates,
                    found,
                    kept,
                    child_identification,
                    technical_ok and not listed,
                )
            continue
        values = [value_text(v) for v in element_values(elem)]
        if elem.VR == "PN":
            for value in values:
                for part in _name_parts(value):
                    found.setdefault(part, IdentifyingValue(part, NAME))
        elif by_tag.get(tag) == RETAINED:
            kept.retained.update(dict.fromkeys(values))
        elif tag in by_tag:
            kind = by_tag[tag]
            for value in values:
                value = value.strip(" \x00")
                if value:
                    found.setdefault(value, IdentifyingValue(value, kind))
                    if kind in (INSTITUTION, ADDRESS):
                        for word in _distinctive_words(value):
                            found.setdefault(word, IdentifyingValue(word, kind))
        elif identification and keyword in _CODE_KEYWORDS:
            for value in values:
                value = value.strip(" \x00")
                if value:
                    kind = NAME if keyword == "CodeMeaning" else ID
                    found.setdefault(value, IdentifyingValue(value, kind))
        elif elem.VR in _DATE_VRS and dates:
            for value in values:
                if len(value.strip()) >= 8 and value[:8].isdigit():
                    found.setdefault(value[:8], IdentifyingValue(value[:8], DATE))
        elif elem.VR == "CS" and not identification and not listed:
            # Defined terms at any depth (a content item's ValueType TEXT under ContentSequence)
            kept.terms.update(dict.fromkeys(v.strip(" \x00") for v in values))
        elif (
            not identification
            and not listed
            and (
                keyword in _SCHEME_KEYWORDS or (keyword in _CODE_KEYWORDS and _standard_scheme(ds))
            )
        ):
            kept.codes.update(dict.fromkeys(values))  # concept names at any depth too
        elif (
            technical_ok
            and not listed
            and elem.VR in TEXT_VRS
            and keyword not in _CODE_KEYWORDS
            and keep.keywords.get(keyword) == "keep"
        ):
            # Values kept as they are (not those kept only when clean) may be no evidence.
            kept.technical.update(dict.fromkeys(values))


def _whole_numbers(raw: Any) -> Iterator[int]:
    """The whole numbers of an IS/DS element, read from its raw bytes where it has them."""
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        texts = value.decode("latin-1").split("\\")
    else:
        texts = [str(v) for v in (value if isinstance(value, MultiValue | list) else [value])]
    for text in texts:
        try:
            number = float(text.strip(" \x00"))
        except (TypeError, ValueError):
            continue
        if number.is_integer() and abs(number) < 1e18:
            yield int(number)


@cache
def _word_list(name: str) -> frozenset[str]:
    """A word list of data/: one word a line, # comments, compared folded."""
    text = resources.files("deid_node.deid").joinpath("data", name)
    words = set()
    for line in text.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            words.add(fold(line))
    return frozenset(words)


def _generic_words() -> frozenset[str]:
    """Words of institution names and addresses that name no place (hospital, street ...)."""
    return _word_list(GENERIC_WORDS_TXT)


def _names_a_vendor(value: str) -> bool:
    """An institution value whose distinctive words are all equipment vendors' names: a vendor's
    own site or phantom (InstitutionName TOSHIBA, Philips Medical Systems), not a hospital."""
    generic, vendors = _generic_words(), _word_list(VENDORS_TXT)
    words = [fold(w) for w in _WORD.findall(value) if len(w) >= 2]
    distinctive = [w for w in words if w not in generic]
    return bool(distinctive) and all(w in vendors for w in distinctive)


def _distinctive_words(value: str) -> list[str]:
    """The words of an institution name or address that identify it alone: 5 letters or more
    and not generic (Quarvington in Saint Quarvington Hospital, Brumblewick in an address)."""
    generic = _generic_words()
    words = [w for w in _WORD.findall(value) if len(w) >= 5 and fold(w) not in generic]
    return words if len(words) > 1 or (words and fold(words[0]) != fold(value.strip())) else []


def _standard_scheme(item: Dataset) -> bool:
    """A code from a published scheme (DCM, SCT, LN, UCUM ...) names a concept; a local one
    (99xxx, L) may name anything, so its meaning stays evidence."""
    scheme = item.get("CodingSchemeDesignator")
    scheme = scheme.strip().upper() if isinstance(scheme, str) else ""
    return bool(scheme) and not scheme.startswith("99") and scheme != "L"


def _dictionary_vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def _name_parts(name: str) -> list[str]:
    """The whole name, per component group: the group, its family, given and middle
    components, given before family (Li^Na is also written Na Li), and every word of 3 letters
    or more but particles (Lopez of Garcia Lopez, Hale of Drovak-Hale, both words of a name
    stored without ^)."""
    parts = []
    if name.strip():
        parts.append(name.strip())
    for group in name.split("="):
        if group.strip() and group.strip() != name.strip():
            parts.append(group.strip())
        if not group:
            continue
        pn = PersonName(group)
        components = [c.strip() for c in (pn.family_name, pn.given_name, pn.middle_name)]
        family, given, middle = components
        parts += [c for c in components if c]
        if family and given:
            parts.append(f"{given} {family}")
            if middle:
                parts.append(f"{given} {middle} {family}")
        for component in components:
            words = _WORD.findall(component)
            if len(words) > 1:
                parts += [w for w in words if len(w) >= 3 and fold(w) not in _PARTICLES]
    return parts


# --- matching -----------------------------------------------------------------------------------


# Letters that NFKD does not decompose into a base letter and an accent.
_LETTERS = str.maketrans(
    {
        "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "æ": "ae", "Æ": "AE", "œ": "oe", "Œ": "OE",
        "đ": "d", "Đ": "D", "ð": "d", "Ð": "D", "þ": "th", "Þ": "TH", "ß": "ss", "ħ": "h",
        "Ħ": "H", "ı": "i", "ŧ": "t", "Ŧ": "T", "ŋ": "ng", "Ŋ": "NG", "ĸ": "k",
    }
)  # fmt: skip


def fold(text: str) -> str:
    """Case and accents folded: 'Müller' and 'MULLER', 'Bjørn' and 'BJORN' compare equal."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_LETTERS))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


_TOKEN = re.compile(r"[^\W\d_]+|\d+")


def _tokens(folded: str) -> list[str]:
    return _TOKEN.findall(folded)


def _long_enough(tokens: Sequence[str]) -> bool:
    # Initials and 2-letter fragments are everywhere; ideographic names are short but specific.
    joined = "".join(tokens)
    return len(joined) >= 3 or (len(joined) >= 2 and not joined.isascii())


class Matcher:
    """Finds the identifying values in a text, each by the rule of its kind."""

    def __init__(self, values: Iterable[str]) -> None:
        self._tokens: dict[str, str] = {}  # tokens run together -> kind
        self._substrings: dict[str, str] = {}  # scripts written without spaces (CJK names)
        self._compact: dict[str, str] = {}  # alphanumeric IDs
        self._digits: list[tuple[re.Pattern[str], str, bool]] = []  # (pattern, kind, short)
        self._dates: list[re.Pattern[str]] = []
        for value in values:
            kind = getattr(value, "kind", OTHER)
            self._add(str(value), kind)

    def _add(self, value: str, kind: str) -> None:
        folded = fold(value)
        if kind in (DATE, BIRTH_DATE):
            digits = re.sub(r"\D", "", folded)
            if len(digits) >= 8 and digits[:8] not in ("19000101",):
                pattern = _date_pattern(digits[:8], two_digit_year=kind == BIRTH_DATE)
                if pattern is not None:
                    self._dates.append(pattern)
            return
        tokens = _tokens(folded)
        if not tokens or not _long_enough(tokens):
            return
        compact = "".join(tokens)
        if len(set(compact)) == 1:
            return  # a placeholder ("000000000", "XXX"), not a person's value
        if kind == PHONE:
            digits = re.sub(r"\D", "", folded)
            if len(digits) >= 7:
                self._add_number(digits, kind)
                if len(digits) > 7:
                    # national and international forms share the subscriber number
                    tail = "[ ./()-]*".join(digits[-7:])
                    suffix = re.compile(rf"{tail}(?!\d)(?![.,]\d)")
                    self._digits.append((suffix, kind, True))
                return
        if compact.isdigit() or (kind in (ID, PHONE) and any(c.isdigit() for c in compact)):
            if compact.isdigit():
                self._add_number(compact, kind)
            elif len(compact) < 6:
                self._tokens[compact] = kind  # short codes only as whole tokens (MR1)
            else:
                self._compact[compact] = kind
            return
        if not compact.isascii():
            self._substrings[compact] = kind
            return
        self._tokens[compact] = kind

    def _add_number(self, digits: str, kind: str) -> None:
        """A number also as people write it: 123 456 78, 123-456-78, 123.456.789-09, and
        without its leading zeros (00123456 as 123456)."""
        significant = digits.lstrip("0") or digits
        short = len(significant) < 5
        body = digits if short else "(?:0[ -]?)*" + "[ ./-]?".join(significant)
        guarded = rf"(?<![\d])(?<!\d[.,]){body}(?![\d])(?![.,]\d)"
        self._digits.append((re.compile(guarded), kind, short))

    def __bool__(self) -> bool:
        return bool(
            self._tokens or self._substrings or self._compact or self._digits or self._dates
        )

    def find(self, text: str, coded: bool = False) -> str | None:
        """The kind of the first identifying value in `text`, or None. `coded`: the text is a
        number, age, date, time or code, where a short number is no evidence."""
        folded = fold(text)
        if self._tokens:
            kind = _find_on_token_boundaries(folded, self._tokens)
            if kind:
                return kind
        if self._substrings:
            joined = "".join(_tokens(folded))
            for needle, kind in self._substrings.items():
                if needle in joined:
                    return kind
        if self._compact:
            compact = "\n".join("".join(_tokens(part)) for part in folded.split("\\"))
            for needle, kind in self._compact.items():
                if needle in compact:
                    return kind
        for pattern, kind, short in self._digits:
            if short and coded:
                continue  # a 4-digit ID is any window width or slice count
            for match in pattern.finditer(folded):
                if coded and match[0].count(".") == 1:
                    continue  # a decimal number, not an ID written with dots
                return kind
        for pattern in self._dates:
            if pattern.search(folded):
                return DATE
        return None


def _find_on_token_boundaries(folded: str, needles: dict[str, str]) -> str | None:
    """A needle that starts where a token starts and ends where a token ends, the separators
    between tokens ignored: 'zyx wortha' and 'ZYXWORTHA' hold 'Zyxwortha', 'PRIMARY' no 'MARY'."""
    starts, ends = set(), set()
    pieces = []
    position = 0
    for token in _TOKEN.findall(folded):
        starts.add(position)
        pieces.append(token)
        position += len(token)
        ends.add(position)
    haystack = "".join(pieces)
    for needle, kind in needles.items():
        at = haystack.find(needle)
        while at >= 0:
            if at in starts and at + len(needle) in ends:
                return kind
            at = haystack.find(needle, at + 1)
    return None


def _date_pattern(yyyymmdd: str, two_digit_year: bool = False) -> re.Pattern[str] | None:
    """The date in the ways it gets written: ISO and DICOM, day first, month first, month names,
    CJK (1943年11月7日); with `two_digit_year` (a birth date) also 07.11.43, 11/7/43, 7 Nov 43."""
    y, m, d = yyyymmdd[:4], yyyymmdd[4:6], yyyymmdd[6:8]
    if not (1 <= int(m) <= 12 and 1 <= int(d) <= 31):
        return None
    mm, dd = rf"0?{int(m)}", rf"0?{int(d)}"
    month = _MONTHS[int(m) - 1]
    names = rf"(?:{month[:3]}[a-z]*\.?)"
    sep = r"[-/. ]"
    alternatives = [
        rf"{y}{m}{d}",
        rf"{y}(?P<s1>{sep}){mm}(?P=s1){dd}",
        rf"{d}{m}{y}",
        rf"{m}{d}{y}",
        rf"{dd}(?P<s2>{sep}){mm}(?P=s2){y}",
        rf"{mm}(?P<s3>{sep}){dd}(?P=s3){y}",
        rf"{dd}[-/. ]?{names}[-/., ]*{y}",
        rf"{names}[-/. ]?{dd}(?:st|nd|rd|th)?[,.]?[-/ ]*{y}",
        rf"{y}[-/., ]*{names}[-/. ]?{dd}",
        rf"{y}\s*[年년]\s*{mm}\s*[月월]\s*{dd}",
    ]
    if two_digit_year:
        yy = y[2:]
        alternatives += [
            rf"{dd}(?P<s4>[-/.]){mm}(?P=s4){yy}",
            rf"{mm}(?P<s5>[-/.]){dd}(?P=s5){yy}",
            rf"{dd}[-/. ]?{names}[-/., ]*'?{yy}",
            rf"{names}[-/. ]?{dd}(?:st|nd|rd|th)?[,.]?[-/ ]*'?{yy}",
        ]
    return re.compile(rf"(?<!\d)(?<!\d[.,])(?:{'|'.join(alternatives)})(?!\d)(?![.,]\d)")


# --- scanning -----------------------------------------------------------------------------------


def evidence(identifiers: Sequence[str]) -> Matcher:
    """A matcher for the values that would be evidence of a leak. Not evidence: the node's own
    values; a single name word, an institution, address or device name that the input holds as
    a whole defined term (HEAD, PRIMARY) or in a standard code's meaning (Head, X-Ray); a
    device name the input also keeps as make or model; an institution, address or device
    that a Retain option keeps; a numeric ID equal to a kept number.
    Anything else typed into a kept attribute (an ID, a whole name, a date in a technical field,
    a name word inside a longer defined term) stays evidence."""
    candidates = [v if hasattr(v, "kind") else _guess(v) for v in identifiers if v]
    own = "\\".join(getattr(identifiers, "own", DUMMY_TEXT))
    terms = {"".join(_tokens(fold(t))) for t in getattr(identifiers, "terms", ())}
    codes = "\\".join(getattr(identifiers, "codes", ()))
    technical = "\\".join(getattr(identifiers, "technical", ()))
    retained = "\\".join(getattr(identifiers, "retained", ()))
    numbers = getattr(identifiers, "numbers", frozenset())
    kept = []
    for value in candidates:
        single = Matcher([value])
        if not single or single.find(own):
            continue
        kind, tokens = value.kind, _tokens(fold(value))
        compact = "".join(tokens)
        if kind == DEVICE and single.find(technical):
            continue
        if kind in (INSTITUTION, ADDRESS, DEVICE) and retained and single.find(retained):
            continue
        if kind == INSTITUTION and _names_a_vendor(value) and single.find(technical):
            continue  # a vendor's own site: its name in Manufacturer is the vendor
        named = (
            kind in (INSTITUTION, ADDRESS, DEVICE)
            or (kind == NAME and len(tokens) == 1)
            or (kind == ID and compact.isalpha())  # a time point ID BASELINE, a site ID
        )
        if named and (compact in terms or single.find(codes)):
            continue
        if kind == ID and compact.isdigit() and int(compact) in numbers:
            continue
        kept.append(value)
    return Matcher(kept)


def _guess(value: str) -> IdentifyingValue:
    """A kind for a bare string (callers that pass strings): names are words, IDs have digits."""
    text = str(value)
    if re.fullmatch(r"\d{8}", text):
        return IdentifyingValue(text, DATE)
    return IdentifyingValue(text, ID if any(c.isdigit() for c in text) else NAME)


def residual_scan(ds: Dataset, identifiers: Sequence[str]) -> list[Hit]:
    """Elements of `ds` (all depths, file meta too) holding an identifying value of the original:
    Hit strings `path (kind)`, never the value."""
    matcher = evidence(identifiers)
    if not matcher:
        return []
    bulk = _bulk_keywords()
    pseudonym = _pseudonym_pattern(getattr(identifiers, "pseudonym_prefix", "DEID"))
    hits: list[Hit] = []
    meta = getattr(ds, "file_meta", None)
    sources = [(ds, "")] + ([(meta, "file_meta.")] if meta is not None else [])
    for source, prefix in sources:
        for path, elem in _walk(source, prefix):
            keyword = elem.keyword or ""
            vr = elem.VR.split(" or ")[0]
            if keyword in bulk or vr not in TEXT_VRS | BINARY_VRS:
                continue
            for text in _texts(elem, pseudonym):
                kind = matcher.find(text, coded=vr in _CODED_VRS)
                if kind:
                    hits.append(Hit(path, keyword or path.rsplit(".", 1)[-1], kind))
                    break
    return hits


@cache
def _bulk_keywords() -> frozenset[str]:
    """Kept attributes of binary VR: sample data (pixels, LUTs, waveforms, surfaces). An ICC
    profile is read: its description and copyright tags are text anyone can write."""
    keep = load_keep_list()
    binary = set()
    for keyword, action in keep.keywords.items():
        try:
            vr = dictionary_VR(_tag(keyword))
        except KeyError:
            continue
        if (
            action == "keep"
            and keyword != "ICCProfile"
            and any(v in BINARY_VRS for v in vr.split(" or "))
        ):
            binary.add(keyword)
    return frozenset(binary | {"OverlayData", "CurveData", "AudioSampleData"})


def _walk(ds: Dataset, prefix: str) -> Iterator[tuple[str, DataElement]]:
    for elem in ds:
        if elem.keyword in _OWN_ELEMENTS:
            continue
        name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        path = f"{prefix}{name}"
        yield path, elem
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value or []):
                yield from _walk(item, f"{path}[{index}].")


def _pseudonym_pattern(prefix: str) -> re.Pattern[str]:
    """The node's PatientID and PatientName pseudonyms: the prefix and 16 hex digits."""
    as_name = prefix
    for separator in "^=\\":
        as_name = as_name.replace(separator, " ")
    return re.compile(rf"(?:{re.escape(prefix)}|{re.escape(as_name)})[0-9A-F]{{16}}")


def _texts(elem: DataElement, pseudonym: re.Pattern[str]) -> list[str]:
    """The value as the texts to search: one per value for text VRs; bytes read two ways.
    The node's own dummies and pseudonyms are left out."""
    values = element_values(elem)
    if elem.VR.split(" or ")[0] in BINARY_VRS:
        texts = []
        for value in values:
            data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
            texts.append(data.decode("latin-1"))
            texts.append(data.decode("utf-8", "ignore"))
        return texts
    texts = [value_text(v) for v in values]
    texts = [
        t
        for t in texts
        if t.strip(" \x00") not in DUMMY_TEXT and not pseudonym.fullmatch(t.strip(" \x00"))
    ]
    return ["\\".join(texts)] if texts else []


def element_values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def value_text(value: Any) -> str:
    """A value as text: bytes read as latin-1 (every byte a character), anything else str()."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)
