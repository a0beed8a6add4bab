"""What identifies the patient in one file: the identifying values of an instance, each with its
kind, read from the original before it is changed. `deid.residual` looks for them afterwards.

`identifying_values` collects every name (whole and by component), patient and accession IDs,
dates, addresses, telephone numbers, institution and device names, and the codes of person
identification sequences:

- a name is collected whole, by component, given before family, and word by word (a family
  name of two words, a name stored without ^); an institution name or address also by its
  distinctive words (data/generic-words.txt lists the words that are not);
- identifiers are those the module lists and every ID, number or identifier Table E.1-1 does
  not keep (StudyID, order numbers, procedure step and trial subject IDs ...);
- what a selected Retain option keeps (institution, device, dates) is left out;
- alongside, what the input holds in attributes the profile keeps as they are (make, model,
  software, defined terms, codes of published schemes, IS/DS numbers) and the node's own
  values, which the scan does not count as evidence (`deid.residual.evidence`); and whether an
  institution value names an equipment vendor (data/vendors.txt).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from importlib import resources
from typing import Any, overload

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from deid_node.config import DeidConfig
from deid_node.deid.elements import BINARY_VRS, TEXT_VRS, element_values, tag_of, value_text
from deid_node.deid.matching import (
    ADDRESS,
    BIRTH_DATE,
    DATE,
    DEVICE,
    ID,
    INSTITUTION,
    NAME,
    OTHER,
    PHONE,
    Matcher,
    fold,
)
from deid_node.deid.profile import OPTIONS, load_keep_list, load_profile_table, option_columns

# The kinds of identifying value (NAME, ID, DATE ...) are deid.matching's; this one is collected
# only to know what a Retain option keeps, never evidence.
RETAINED = "retained"

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

_NUMBER_VRS = frozenset({"DS", "IS"})
_DATE_VRS = frozenset({"DA", "DT"})

# The node's own values: dummies written for Type 1 attributes, the de-identification marks.
DUMMY_TEXT = ("ANONYMOUS", "19000101", "19000101000000", "000000", "urn:anonymous", "000D")
_OWN_TEXT = ("DEID_NODE_0_1",)  # tags.IMPLEMENTATION_VERSION_NAME
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
        self.evidence: Matcher | None = None  # set by `evidence`, once

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self.values[index]

    def __len__(self) -> int:
        return len(self.values)


def identifying_values(ds: Dataset, config: DeidConfig | None = None) -> Identifiers:
    """The original's identifying values with their kinds, at all depths. Call before
    de-identifying. With `config`, values a selected Retain option keeps (institution, device,
    dates) are left out, and the node's own values are known."""
    options = set(config.profile_options) if config else set()
    # A copy: the cached table must not take the keywords added below.
    kinds = dict(_table_id_kinds(option_columns(o for o in OPTIONS if o in options)))
    kinds |= _KIND_BY_KEYWORD
    # What a Retain option keeps is in the output by choice: an issuer named like the kept
    # institution is no leak there.
    retain_institution = "Retain Institution Identity" in options
    kinds |= {k: RETAINED if retain_institution else v for k, v in _INSTITUTION_KEYWORDS.items()}
    retain_device = "Retain Device Identity" in options
    kinds |= {k: RETAINED if retain_device else v for k, v in _DEVICE_KEYWORDS.items()}
    dates = not any("Longitudinal" in o for o in options)
    by_tag = {tag_of(k): kind for k, kind in kinds.items()}
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


def names_a_vendor(value: str) -> bool:
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
