"""The identifying values of an instance, and the fail-closed scan for them after de-identification.

`identifying_values` reads the original before it is changed: every name (whole and by component),
patient and accession IDs, dates, addresses, telephone numbers, institution and device names, and
the codes of person identification sequences, each with its kind. `residual_scan` then looks for
them in every element of the output, sequences and file meta included, text VRs as text and
binary VRs (OB, OW, UN ...) as bytes read as latin-1 and as UTF-8.

It must be exact, because a scan that cries wolf gets switched off:

- values are folded (case, accents) and compared by kind: name parts, addresses and institution
  or station names on token boundaries (`MARY` is not in `PRIMARY`); IDs as substrings (digits
  not inside a longer number); dates in the formats people write them (19800102, 1980-01-02,
  02.01.1980, 01/02/1980, 2 Jan 1980 ...);
- values shorter than 3 characters (initials) are never looked for;
- a value that the input also holds in an attribute kept as technical (a vendor name recorded as
  InstitutionName that is also the Manufacturer, a StationName equal to the model name, a name
  equal to a defined term) is no evidence, and neither are the node's own dummy values;
- bulk sample data (pixels, LUTs, waveforms) are not read: numbers in them spell digits by chance.

A hit names the element's path and the kind of value, never the value.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from typing import Any, overload

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from deid_node.config import DeidConfig
from deid_node.deid.profile import OPTIONS, load_keep_list, load_profile_table

# Kinds of identifying value, as reported.
NAME = "name part"
ID = "ID"
DATE = "date"
ADDRESS = "address"
PHONE = "telephone"
INSTITUTION = "institution"
DEVICE = "device"
OTHER = "other"

_KIND_BY_KEYWORD: dict[str, str] = {
    "PatientID": ID,
    "OtherPatientIDs": ID,
    "AccessionNumber": ID,
    "AdmissionID": ID,
    "ServiceEpisodeID": ID,
    "MedicalRecordLocator": ID,
    "IssuerOfPatientID": INSTITUTION,
    "PatientBirthDate": DATE,
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
# Codes inside these sequences name a person or an organisation (an employee number), not a
# concept; Table E.1-1 lists them all, so their codes are identifying values.
_IDENTIFICATION_SEQUENCE = re.compile(r"Identification(Code)?Sequence$|^InstitutionCodeSequence$")
_CODE_KEYWORDS = frozenset({"CodeValue", "LongCodeValue", "URNCodeValue", "CodeMeaning"})

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
    technical, and the node's own values."""

    def __init__(
        self,
        values: Iterable[str],
        technical: Iterable[str] = (),
        own: Iterable[str] = (),
        pseudonym_prefix: str = "DEID",
    ) -> None:
        self.values: tuple[str, ...] = tuple(values)
        self.pseudonym_prefix = pseudonym_prefix
        self.technical: tuple[str, ...] = tuple(technical)
        self.own: tuple[str, ...] = tuple(own)

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
    kinds = dict(_KIND_BY_KEYWORD)
    if "Retain Institution Identity" not in options:
        kinds |= _INSTITUTION_KEYWORDS
    if "Retain Device Identity" not in options:
        kinds |= _DEVICE_KEYWORDS
    dates = not any("Longitudinal" in o for o in options)
    by_tag = {_tag(k): kind for k, kind in kinds.items()}
    found: dict[str, IdentifyingValue] = {}
    technical: dict[str, None] = {}
    _collect(ds, by_tag, dates, found, technical, identification=False, technical_ok=True)
    own = [*DUMMY_TEXT, *_OWN_TEXT, *(o for o in (OPTIONS[n][2] for n in OPTIONS))]
    own += ["Basic Application Confidentiality Profile", "Clean Pixel Data Option"]
    if config is not None:
        own += [config.patient_id_prefix, config.method_description]
    prefix = config.patient_id_prefix if config is not None else "DEID"
    return Identifiers(found.values(), technical, own, prefix)


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
    technical: dict[str, None],
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
        if vr in BINARY_VRS - {"UN"} or (vr in _NUMBER_VRS and tag not in by_tag):
            continue
        keyword = keyword_for_tag(tag)
        listed = table.row(tag) is not None
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
                    technical,
                    child_identification,
                    technical_ok and not listed,
                )
            continue
        values = [_text(v) for v in _values(elem)]
        if elem.VR == "PN":
            for value in values:
                for part in _name_parts(value):
                    found.setdefault(part, IdentifyingValue(part, NAME))
        elif tag in by_tag:
            for value in values:
                value = value.strip(" \x00")
                if value:
                    found.setdefault(value, IdentifyingValue(value, by_tag[tag]))
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
        elif (
            technical_ok
            and not listed
            and elem.VR in TEXT_VRS
            and (elem.VR == "CS" or keep.keywords.get(keyword) == "keep")
            and (keyword not in _CODE_KEYWORDS or _standard_scheme(ds))
        ):
            # Values kept as technical (not those kept only when clean) are no evidence.
            for value in values:
                technical[value] = None


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
    """The whole name and its family, given and middle components, per component group."""
    parts = []
    if name.strip():
        parts.append(name.strip())
    for group in name.split("="):
        if group.strip() and group.strip() != name.strip():
            parts.append(group.strip())
        if not group:
            continue
        pn = PersonName(group)
        for component in (pn.family_name, pn.given_name, pn.middle_name):
            component = component.strip()
            if component:
                parts.append(component)
    return parts


# --- matching -----------------------------------------------------------------------------------


def fold(text: str) -> str:
    """Case and accents folded: 'Müller' and 'MULLER' compare equal."""
    decomposed = unicodedata.normalize("NFKD", text)
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
        self._compact: dict[str, str] = {}  # alphanumeric IDs
        self._digits: list[tuple[re.Pattern[str], str, bool]] = []  # (pattern, kind, short)
        self._dates: list[re.Pattern[str]] = []
        for value in values:
            kind = getattr(value, "kind", OTHER)
            self._add(str(value), kind)

    def _add(self, value: str, kind: str) -> None:
        folded = fold(value)
        if kind == DATE:
            digits = re.sub(r"\D", "", folded)
            if len(digits) >= 8 and digits[:8] not in ("19000101",):
                pattern = _date_pattern(digits[:8])
                if pattern is not None:
                    self._dates.append(pattern)
            return
        tokens = _tokens(folded)
        if not tokens or not _long_enough(tokens):
            return
        compact = "".join(tokens)
        if len(set(compact)) == 1:
            return  # a placeholder ("000000000", "XXX"), not a person's value
        if compact.isdigit() or (kind in (ID, PHONE) and any(c.isdigit() for c in compact)):
            if compact.isdigit():
                # long numbers also as people write them: 123 456 78, 123-456-78
                body = "[ -]?".join(compact) if len(compact) >= 5 else compact
                guarded = rf"(?<![\d])(?<!\d[.,]){body}(?![\d])(?![.,]\d)"
                self._digits.append((re.compile(guarded), kind, len(compact) < 5))
            else:
                self._compact[compact] = kind
            return
        self._tokens[compact] = kind

    def __bool__(self) -> bool:
        return bool(self._tokens or self._compact or self._digits or self._dates)

    def find(self, text: str, coded: bool = False) -> str | None:
        """The kind of the first identifying value in `text`, or None. `coded`: the text is a
        number, age, date, time or code, where a short number is no evidence."""
        folded = fold(text)
        if self._tokens:
            kind = _find_on_token_boundaries(folded, self._tokens)
            if kind:
                return kind
        if self._compact:
            compact = "\n".join("".join(_tokens(part)) for part in folded.split("\\"))
            for needle, kind in self._compact.items():
                if needle in compact:
                    return kind
        for pattern, kind, short in self._digits:
            if short and coded:
                continue  # a 4-digit ID is any window width or slice count
            if pattern.search(folded):
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


def _date_pattern(yyyymmdd: str) -> re.Pattern[str] | None:
    """The date in the ways it gets written: ISO and DICOM, day first, month first, month names."""
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
    ]
    return re.compile(rf"(?<!\d)(?<!\d[.,])(?:{'|'.join(alternatives)})(?!\d)(?![.,]\d)")


# --- scanning -----------------------------------------------------------------------------------


def evidence(identifiers: Sequence[str]) -> Matcher:
    """A matcher for the values that would be evidence of a leak: those that neither a technical
    attribute of the input nor the node's own values hold."""
    candidates = [v if hasattr(v, "kind") else _guess(v) for v in identifiers if v]
    technical = getattr(identifiers, "technical", ())
    own = getattr(identifiers, "own", DUMMY_TEXT)
    excluded = "\\".join([*technical, *own])
    kept = [v for v in candidates if not Matcher([v]).find(excluded)]
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
    """Kept attributes of binary VR: sample data (pixels, LUTs, waveforms, surfaces)."""
    keep = load_keep_list()
    binary = set()
    for keyword, action in keep.keywords.items():
        try:
            vr = dictionary_VR(_tag(keyword))
        except KeyError:
            continue
        if action == "keep" and any(v in BINARY_VRS for v in vr.split(" or ")):
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
    values = _values(elem)
    if elem.VR.split(" or ")[0] in BINARY_VRS:
        texts = []
        for value in values:
            data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
            texts.append(data.decode("latin-1"))
            texts.append(data.decode("utf-8", "ignore"))
        return texts
    texts = [_text(v) for v in values]
    texts = [
        t
        for t in texts
        if t.strip(" \x00") not in DUMMY_TEXT and not pseudonym.fullmatch(t.strip(" \x00"))
    ]
    return ["\\".join(texts)] if texts else []


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, PersonName):
        return str(value)
    return str(value)
