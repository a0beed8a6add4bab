"""The fail-closed scan for identifying values left after de-identification.

`residual_scan` looks for the original's identifying values (`deid.identifiers`) in every
element of the output, sequences and file meta included, text VRs as text and binary VRs
(OB, OW, UN ...) as bytes read as latin-1 and as UTF-8.

It must be exact, because a scan that cries wolf gets switched off:

- values are folded and compared by kind (`deid.matching`: token boundaries for names and
  institutions, IDs and telephone numbers in their written forms, dates in many formats);
- not evidence (`evidence`): the node's own dummy values; a single name word, institution or
  device name that the input holds as a whole defined term (CS) or in a published scheme's
  code (Head, X-Ray); a device name equal to the kept model name; a vendor's name recorded as
  institution (data/vendors.txt) and kept as Manufacturer; a numeric ID equal to a kept
  IS/DS number. An ID, a whole name or a date typed into a kept attribute stays evidence (the
  profile cleans kept technical text that holds one, `deid.tags`);
- bulk sample data (pixels, LUTs, waveforms) are not read: numbers in them spell digits by
  chance. ICC profiles are read.

A hit names the element's path and the kind of value, never the value.

What this module exported before the identifying values moved to `deid.identifiers` and the
element helpers to `deid.elements` (`identifying_values`, `Identifiers`, `IdentifyingValue`,
`DUMMY_TEXT`, the kinds, `Matcher`, `element_values`, `value_text`) is still importable here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from functools import cache, lru_cache

from pydicom import Dataset
from pydicom.datadict import dictionary_has_tag, dictionary_keyword, dictionary_VR
from pydicom.dataelem import DataElement

from deid_node.deid.elements import BINARY_VRS, TEXT_VRS, element_values, tag_of, value_text
from deid_node.deid.identifiers import (
    DUMMY_TEXT,
    Identifiers,
    IdentifyingValue,
    identifying_values,
    names_a_vendor,
)
from deid_node.deid.matching import (
    ADDRESS,
    BIRTH_DATE,
    DATE,
    DEVICE,
    ID,
    INSTITUTION,
    NAME,
    Matcher,
    fold,
    tokenize,
)
from deid_node.deid.profile import load_keep_list

__all__ = [
    "BIRTH_DATE",
    "DATE",
    "DUMMY_TEXT",
    "ID",
    "NAME",
    "Hit",
    "Identifiers",
    "IdentifyingValue",
    "Matcher",
    "element_values",
    "evidence",
    "identifying_values",
    "residual_scan",
    "value_text",
]

_SCANNED_VRS = TEXT_VRS | BINARY_VRS
_CODED_VRS = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "TM"})

_OWN_ELEMENTS = frozenset(
    {
        "PatientIdentityRemoved",
        "DeidentificationMethod",
        "DeidentificationMethodCodeSequence",
        "LongitudinalTemporalInformationModified",
    }
)


class Hit(str):
    """One element of the output holding an identifying value: `path (kind)` as a string."""

    path: str
    keyword: str
    kind: str

    def __new__(cls, path: str, keyword: str, kind: str) -> Hit:
        obj = super().__new__(cls, f"{path} ({kind})")
        obj.path, obj.keyword, obj.kind = path, keyword, kind
        return obj


def evidence(identifiers: Sequence[str]) -> Matcher:
    """A matcher for the values that would be evidence of a leak. Not evidence: the node's own
    values; a single name word, an institution, address or device name that the input holds as
    a whole defined term (HEAD, PRIMARY) or in a standard code's meaning (Head, X-Ray); a
    device name the input also keeps as make or model; an institution, address or device
    that a Retain option keeps; a numeric ID equal to a kept number.
    Anything else typed into a kept attribute (an ID, a whole name, a date in a technical field,
    a name word inside a longer defined term) stays evidence."""
    if isinstance(identifiers, Identifiers) and identifiers.evidence is not None:
        return identifiers.evidence
    candidates = tuple(
        (str(v), v.kind) if hasattr(v, "kind") else (str(v), _guess(v).kind)
        for v in identifiers
        if v
    )
    kept = _not_excused(
        candidates,
        "\\".join(getattr(identifiers, "own", DUMMY_TEXT)),
        frozenset("".join(tokenize(fold(t))) for t in getattr(identifiers, "terms", ())),
        "\\".join(getattr(identifiers, "codes", ())),
        "\\".join(getattr(identifiers, "technical", ())),
        "\\".join(getattr(identifiers, "retained", ())),
    )
    numbers = getattr(identifiers, "numbers", frozenset())
    if numbers:  # differ from file to file (InstanceNumber): applied after the cache
        kept = tuple(pair for pair in kept if _id_number(*pair) not in numbers)
    matcher = _matcher(kept)
    if isinstance(identifiers, Identifiers):
        identifiers.evidence = matcher  # de-identification and the scan ask for it in turn
    return matcher


@lru_cache(maxsize=1024)
def _id_number(value: str, kind: str) -> int | None:
    """A numeric ID as a number (an ID 107 is no leak where SeriesNumber 107 is kept)."""
    compact = "".join(tokenize(fold(value)))
    return int(compact) if kind == ID and compact.isdigit() else None


# The files of a series share their identifying values (the same patient, study, physicians and
# institution): what is evidence is worked out once per distinct set, not once per file.
@lru_cache(maxsize=64)
def _not_excused(
    candidates: tuple[tuple[str, str], ...],
    own: str,
    terms: frozenset[str],
    codes: str,
    technical: str,
    retained: str,
) -> tuple[tuple[str, str], ...]:
    """The (value, kind) pairs that the node's own values, the kept defined terms, codes,
    technical text and retained values do not excuse (see `evidence`)."""
    kept = []
    for text, kind in candidates:
        value = IdentifyingValue(text, kind)
        single = Matcher([value])
        if not single or single.find(own):
            continue
        tokens = tokenize(fold(value))
        compact = "".join(tokens)
        if kind == DEVICE and single.find(technical):
            continue
        if kind in (INSTITUTION, ADDRESS, DEVICE) and retained and single.find(retained):
            continue
        if kind == INSTITUTION and names_a_vendor(value) and single.find(technical):
            continue  # a vendor's own site: its name in Manufacturer is the vendor
        named = (
            kind in (INSTITUTION, ADDRESS, DEVICE)
            or (kind == NAME and len(tokens) == 1)
            or (kind == ID and compact.isalpha())  # a time point ID BASELINE, a site ID
        )
        if named and (compact in terms or single.find(codes)):
            continue
        kept.append((text, kind))
    return tuple(kept)


@lru_cache(maxsize=64)
def _matcher(values: tuple[tuple[str, str], ...]) -> Matcher:
    """One matcher per distinct set of evidence (a Matcher is not changed by `find`)."""
    return Matcher(IdentifyingValue(text, kind) for text, kind in values)


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
        for path, keyword, elem in _walk(source, prefix):
            vr = elem.VR.split(" or ")[0]
            if keyword in bulk or vr not in _SCANNED_VRS:
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
            vr = dictionary_VR(tag_of(keyword))
        except KeyError:
            continue
        if (
            action == "keep"
            and keyword != "ICCProfile"
            and any(v in BINARY_VRS for v in vr.split(" or "))
        ):
            binary.add(keyword)
    return frozenset(binary | {"OverlayData", "CurveData", "AudioSampleData"})


def _walk(ds: Dataset, prefix: str) -> Iterator[tuple[str, str, DataElement]]:
    """(path, keyword, element) of every element, items of sequences included."""
    for elem in ds:
        keyword = _keyword(elem.tag)
        if keyword in _OWN_ELEMENTS:
            continue
        name = keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        path = f"{prefix}{name}"
        yield path, keyword, elem
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value or []):
                yield from _walk(item, f"{path}[{index}].")


@lru_cache(maxsize=4096)
def _keyword(tag: int) -> str:
    """DataElement.keyword, looked up once per tag (repeating groups have none, as there)."""
    return dictionary_keyword(tag) if dictionary_has_tag(tag) else ""


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
