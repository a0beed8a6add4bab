"""Header de-identification: PS3.15 Basic Application Level Confidentiality Profile and options.

Actions come from Table E.1-1 (`deid.profile`); this module gives them meaning, in place, at every
sequence depth and in the file meta. Policy beyond the table, chosen deliberately:

- Compound actions (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) are resolved with `_REQUIRED_TYPE`, a small
  table of attributes that are Type 1 or 2 in the common IODs (Patient, General Study, General
  Equipment, General Image, Multi-frame Functional Groups, Enhanced General Equipment). Anything
  not listed there is treated as Type 3 and removed.
- D writes a dummy consistent with the VR (`_DUMMY`); D or C on a sequence keeps the sequence and
  cleans its items. PatientID and PatientName always get the pseudonym of the original PatientID.
- C on text (Clean Descriptors / Structured Content) keeps the value only if it contains none of
  the instance's identifying values; otherwise the attribute is removed (or emptied / dummied when
  required). C on dates shifts them (Modified Dates); C on times keeps them.
- Every UI value that is not a well-known DICOM UID or a class / transfer syntax / coding scheme
  reference is replaced by `keys.uid()`, listed in the table or not, unless Retain UIDs.
- Attributes not in Table E.1-1: private ones are removed unless Retain Safe Private and safe;
  curves (50xx) and whole overlay groups (60xx) are removed (Clean Graphics included: we cannot
  clean an overlay bitmap, and removal is the stricter choice); group lengths are removed; public
  UN is removed; free-text VRs (AE LO LT PN SH ST UC UR UT) are removed unless in
  `SAFE_TEXT_KEYWORDS`; DA/DT/TM are removed unless a Retain Longitudinal option is selected;
  everything else (CS, numbers, binary, sequences) is kept, with sequences cleaned.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, FileMetaDataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary
from pydicom.valuerep import PersonName

from deid_node.config import PROFILE_OPTIONS, DeidConfig
from deid_node.deid.profile import (
    BASIC_CODE,
    CLEAN_PIXEL_DATA_CODE,
    OPTIONS,
    ProfileTable,
    SafePrivate,
    load_profile_table,
    load_safe_private,
    option_columns,
)
from deid_node.deid.uids import Pseudonymizer
from deid_node.errors import InputError

FULL_DATES = "Retain Longitudinal Temporal Information Full Dates"
MODIFIED_DATES = "Retain Longitudinal Temporal Information Modified Dates"
IMPLEMENTATION_VERSION_NAME = "DEID_NODE_0_1"

FREE_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
DATE_VRS = frozenset({"DA", "DT"})
# VRs the residual scan reads: text that could carry a name or an ID. UI is produced by the HMAC
# and numbers cannot hold names; scanning them would only quarantine on digit coincidences.
SCANNED_VRS = FREE_TEXT_VRS | {"AS", "CS", "DA", "DT", "TM", "UN"}

# Public free-text attributes absent from Table E.1-1 that we keep: technical descriptions
# needed for a usable image and coded entries. Every other unlisted free-text attribute goes.
SAFE_TEXT_KEYWORDS = frozenset(
    {
        # equipment make and model (serial numbers and station names are in E.1-1)
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "SecondaryCaptureDeviceManufacturer",
        "SecondaryCaptureDeviceManufacturerModelName",
        "SecondaryCaptureDeviceSoftwareVersions",
        "DigitalImageFormatAcquired",
        # coded entries
        "CodeValue",
        "LongCodeValue",
        "URNCodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "MappingResourceName",
        "ContextGroupExtensionFlag",
        # acquisition and display technique
        "PositionReferenceIndicator",
        "ConvolutionKernel",
        "FilterType",
        "SequenceName",
        "PulseSequenceName",
        "ReceiveCoilName",
        "TransmitCoilName",
        "ImagedNucleus",
        "ContrastBolusRoute",
        "WindowCenterWidthExplanation",
        "RescaleType",
        "LUTExplanation",
        "PixelSpacingCalibrationDescription",
        "ProcessingFunction",
        "TransducerData",
        # written by us
        "DeidentificationMethod",
        "ImplementationVersionName",
    }
)
# Text kept under Clean Structured Content when it holds none of the identifying values.
STRUCTURED_TEXT_KEYWORDS = frozenset({"TextValue"})

# Type 1 or 2 attributes for compound actions: keyword -> type in conventional IODs, in enhanced
# multi-frame IODs (those with functional groups), and inside a given parent sequence.
_REQUIRED_TYPE: dict[str, str] = {
    "PatientName": "2",
    "PatientID": "2",
    "PatientBirthDate": "2",
    "PatientSex": "2",
    "StudyDate": "2",
    "StudyTime": "2",
    "ReferringPhysicianName": "2",
    "StudyID": "2",
    "AccessionNumber": "2",
    "Manufacturer": "2",
    "ContentDate": "2",  # General Image: 2C, present when the image is temporally related
    "ContentTime": "2",
    "ContrastBolusAgent": "2",  # Contrast/Bolus module
    "AcquisitionContextSequence": "2",  # Acquisition Context module
    "ContentCreatorName": "2",  # Presentation State / Segmentation content identification
}
_REQUIRED_TYPE_ENHANCED: dict[str, str] = {
    **_REQUIRED_TYPE,
    "ContentDate": "1",  # Multi-frame Functional Groups module
    "ContentTime": "1",
    "AcquisitionDateTime": "1",  # Enhanced CT/MR/XA Image: 1C for ORIGINAL/MIXED
    "Manufacturer": "1",  # Enhanced General Equipment module
    "ManufacturerModelName": "1",
    "DeviceSerialNumber": "1",
    "SoftwareVersions": "1",
}
_REQUIRED_TYPE_NESTED: dict[tuple[str, str], str] = {
    ("DerivationImageSequence", "SourceImageSequence"): "1",
    ("FrameContentSequence", "FrameAcquisitionDateTime"): "1",
    ("FrameContentSequence", "FrameReferenceDateTime"): "1",
}

_DUMMY: dict[str, Any] = {
    "AE": "ANONYMOUS",
    "AS": "000D",
    "CS": "ANONYMOUS",
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": "ANONYMOUS",
    "LT": "ANONYMOUS",
    "PN": "ANONYMOUS",
    "SH": "ANONYMOUS",
    "ST": "ANONYMOUS",
    "TM": "000000",
    "UC": "ANONYMOUS",
    "UR": "urn:anonymous",
    "UT": "ANONYMOUS",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
    "AT": 0,
}
# The action for attributes Table E.1-1 does not list and our policy keeps (see module docstring).
_POLICY_KEEP = "keep-unlisted"
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})

# Identifying attributes beyond every PN value; used for the residual scan and OCR matching.
_IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "PatientBirthDate",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MedicalRecordLocator",
        "MilitaryRank",
        "RegionOfResidence",
        "AccessionNumber",
        "AdmissionID",
        "ServiceEpisodeID",
        "IssuerOfPatientID",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PersonAddress",
        "PersonTelephoneNumbers",
        "ResponsibleOrganization",
    }
)
_INSTITUTION_KEYWORDS = frozenset(
    {"InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"}
)
_DEVICE_KEYWORDS = frozenset({"StationName", "DeviceSerialNumber"})


@dataclass
class TagResult:
    options: tuple[str, ...]
    removed: int = 0
    replaced: int = 0


@dataclass
class _Context:
    table: ProfileTable
    safe: SafePrivate
    columns: tuple[str, ...]
    options: frozenset[str]
    keys: Pseudonymizer
    patient_key: str
    enhanced: bool
    identifiers: list[str]
    shift_days: int
    removed: int = 0
    replaced: int = 0

    @property
    def modified_dates(self) -> bool:
        return MODIFIED_DATES in self.options

    @property
    def full_dates(self) -> bool:
        return FULL_DATES in self.options


def identifying_values(ds: Dataset, config: DeidConfig | None = None) -> list[str]:
    """The original's identifying strings: every PN (whole and its name components), patient
    IDs, birth date, addresses, accession number, institution and device names, at all depths.

    Call before de-identifying. With `config`, values that a selected Retain option keeps
    (institution, device) are left out so that the residual scan does not flag them.
    """
    options = set(config.profile_options) if config else set()
    keywords = set(_IDENTIFYING_KEYWORDS)
    if "Retain Institution Identity" not in options:
        keywords |= _INSTITUTION_KEYWORDS
    if "Retain Device Identity" not in options:
        keywords |= _DEVICE_KEYWORDS
    tags = {tag_for_keyword(k) for k in keywords}
    found: dict[str, None] = {}
    _collect_identifiers(ds, tags, found)
    return list(found)


def _collect_identifiers(ds: Dataset, tags: set[int | None], found: dict[str, None]) -> None:
    """PN values (whole and parts) and the values of `tags`, at every depth.

    Reads the VR from the raw element where it can: converting every element (pixel data
    included) only to look at its VR costs more than the rest of the header's de-identification.
    """
    for tag, raw in ds._dict.items():  # noqa: SLF001 - raw elements, not converted values
        vr = getattr(raw, "VR", None) or dictionary_vr_or_none(tag)
        if vr not in ("PN", "SQ", "UN", None) and tag not in tags:
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or []:
                _collect_identifiers(item, tags, found)
        elif elem.VR == "PN":
            for value in _values(elem):
                for part in _name_parts(str(value)):
                    found[part] = None
        elif tag in tags:
            for value in _values(elem):
                text = str(value).strip(" \x00")
                if text:
                    found[text] = None


def dictionary_vr_or_none(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def deidentify_tags(
    ds: Dataset,
    config: DeidConfig,
    keys: Pseudonymizer,
    *,
    pixels_cleaned: bool = False,
    identifiers: Sequence[str] | None = None,
) -> TagResult:
    """Apply the profile with config.profile_options to ds in place, file meta included.

    `identifiers`: identifying_values(ds, config), when the caller already has them.
    """
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        raise InputError("instance has no SOPClassUID or SOPInstanceUID; cannot de-identify")
    options = tuple(o for o in PROFILE_OPTIONS if o in config.profile_options)
    patient_key = str(ds.get("PatientID", "") or "")
    ctx = _Context(
        table=load_profile_table(),
        safe=load_safe_private(),
        columns=option_columns(options),
        options=frozenset(options),
        keys=keys,
        patient_key=patient_key,
        enhanced="PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds,
        identifiers=_normalized_identifiers(
            identifiers if identifiers is not None else identifying_values(ds, config)
        ),
        shift_days=keys.date_shift_days(patient_key),
    )
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _clean_dataset(ds, ctx, parent="")
    _mark_deidentified(ds, config, options, pixels_cleaned)
    _rebuild_file_meta(ds, transfer_syntax)
    if getattr(ds, "preamble", None):
        ds.preamble = b"\x00" * 128  # may hold a TIFF header or anything else
    return TagResult(options=options, removed=ctx.removed, replaced=ctx.replaced)


def residual_scan(ds: Dataset, identifiers: Sequence[str]) -> list[str]:
    """Paths of text elements (all depths, file meta too) that contain any identifier.

    Matching ignores case, '^' and spaces; identifiers shorter than 3 characters are ignored.
    Only paths are returned, never values.
    """
    needles = _normalized_identifiers(identifiers)
    if not needles:
        return []
    hits: list[str] = []
    meta = getattr(ds, "file_meta", None)
    sources = [(ds, "")] + ([(meta, "file_meta.")] if meta is not None else [])
    for source, prefix in sources:
        for path, elem in _walk(source, prefix):
            if elem.VR not in SCANNED_VRS:
                continue
            haystack = _normalize(" ".join(_text(v) for v in _values(elem)))
            if any(needle in haystack for needle in needles):
                hits.append(path)
    return hits


# --- the walk ------------------------------------------------------------------------------


def _clean_dataset(ds: Dataset, ctx: _Context, parent: str) -> None:
    kept_private_blocks: set[tuple[int, int]] = set()
    creators: list[int] = []
    for tag in list(ds.keys()):
        group, element = tag.group, tag.element
        if group & 1 and 0x0010 <= element <= 0x00FF:
            creators.append(tag)  # decided once we know which blocks keep an element
            continue
        elem = ds[tag]
        if element == 0 or group == 0x0002:
            _remove(ds, tag, ctx)  # group lengths; file meta does not belong in the data set
        elif group & 1:
            if _keep_private(ds, elem, ctx):
                kept_private_blocks.add((group, element >> 8))
                _finish_kept(ds, elem, ctx, parent, _POLICY_KEEP)
            else:
                _remove(ds, tag, ctx)
        elif 0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E:
            _remove(ds, tag, ctx)  # curves; overlays as whole groups (see module docstring)
        elif elem.keyword == "PatientID":
            _replace(elem, ctx.keys.patient_id(str(elem.value or "")), ctx)
        elif elem.keyword == "PatientName":
            # An item naming another patient gets that patient's pseudonym (PatientID sorts
            # after PatientName, so the sibling still holds the original here).
            sibling = ds.get("PatientID")
            key = ctx.patient_key if parent == "" or sibling is None else str(sibling)
            _replace(elem, ctx.keys.patient_name(key), ctx)
        else:
            _apply(ds, elem, _action(elem, ctx), ctx, parent)
    for tag in creators:
        if (tag.group, tag.element) not in kept_private_blocks:
            _remove(ds, tag, ctx)


def _action(elem: DataElement, ctx: _Context) -> str:
    """The Table E.1-1 action, or our policy's for attributes the table does not list."""
    row = ctx.table.row(elem.tag)
    if row is not None:
        return row.action(ctx.columns)
    vr = elem.VR
    if vr in DATE_VRS or vr == "TM":
        return "C" if ctx.modified_dates or ctx.full_dates else "X"
    if vr in FREE_TEXT_VRS:
        if elem.keyword in SAFE_TEXT_KEYWORDS:
            return _POLICY_KEEP
        if "Clean Structured Content" in ctx.options and elem.keyword in STRUCTURED_TEXT_KEYWORDS:
            return "C"
        return "X"
    if vr == "UN":
        return "X"  # a public attribute we cannot even type
    return _POLICY_KEEP


def _apply(ds: Dataset, elem: DataElement, action: str, ctx: _Context, parent: str) -> None:
    if action in ("Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"):
        action = _resolve_compound(action, _required_type(elem.keyword, parent, ctx))
    if action == "X":
        _remove(ds, elem.tag, ctx)
    elif action == "Z":
        _empty(elem, ctx)
    elif action == "D":
        if elem.VR == "SQ":
            _finish_kept(ds, elem, ctx, parent, "K")
        elif elem.VR == "UI":
            _finish_kept(ds, elem, ctx, parent, "U")
        else:
            _dummy(elem, ctx)
    elif action == "C":
        _clean(ds, elem, ctx, parent)
    else:  # K, U (and U* resolved to U), and our policy's keep
        _finish_kept(ds, elem, ctx, parent, action)


def _resolve_compound(action: str, required: str | None) -> str:
    if action == "X/Z/U*":
        return {"1": "U", "2": "Z"}.get(required or "", "X")
    if action == "Z/D":
        return "D" if required == "1" else "Z"
    if action == "X/Z":
        return "Z" if required else "X"
    if action == "X/D":
        return "D" if required else "X"
    return {"1": "D", "2": "Z"}.get(required or "", "X")  # X/Z/D


def _required_type(keyword: str, parent: str, ctx: _Context) -> str | None:
    nested = _REQUIRED_TYPE_NESTED.get((parent, keyword))
    if nested:
        return nested
    if parent:
        return None  # inside other sequences we do not know the macro; Type 3 is the safe side
    return (_REQUIRED_TYPE_ENHANCED if ctx.enhanced else _REQUIRED_TYPE).get(keyword)


def _finish_kept(ds: Dataset, elem: DataElement, ctx: _Context, parent: str, action: str) -> None:
    """A kept element still gets its sequences cleaned, UIDs mapped and dates shifted."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            _clean_dataset(item, ctx, parent=elem.keyword or str(elem.tag))
    elif elem.VR == "UI":
        # The table's U maps and its K (an option's) keeps; UIDs the table does not list map
        # unless Retain UIDs, or they name a class or coding scheme rather than an instance.
        if action == "U" or (
            action == _POLICY_KEEP
            and "Retain UIDs" not in ctx.options
            and not _is_class_reference(elem.keyword)
        ):
            _map_uids(elem, ctx)
    elif elem.VR in DATE_VRS and ctx.modified_dates:
        _shift(ds, elem, ctx, parent)


def _clean(ds: Dataset, elem: DataElement, ctx: _Context, parent: str) -> None:
    vr = elem.VR
    if vr == "SQ" or vr not in FREE_TEXT_VRS | DATE_VRS | {"TM"}:
        _finish_kept(ds, elem, ctx, parent, "U" if vr == "UI" else "K")
    elif vr in DATE_VRS:
        if ctx.modified_dates:
            _shift(ds, elem, ctx, parent)
        elif not ctx.full_dates:
            _apply(ds, elem, "X/Z/D", ctx, parent)
    else:
        text = _normalize(" ".join(_text(v) for v in _values(elem)))
        if any(needle in text for needle in ctx.identifiers):
            _apply(ds, elem, "X/Z/D", ctx, parent)


def _shift(ds: Dataset, elem: DataElement, ctx: _Context, parent: str) -> None:
    values = _values(elem)
    shifted = [_shift_value(str(v), elem.VR, ctx.shift_days) for v in values]
    if any(v is None for v in shifted):
        _apply(ds, elem, "X/Z/D", ctx, parent)  # unparseable: cannot shift, so do not keep
        return
    if shifted:
        elem.value = shifted if len(shifted) > 1 else shifted[0]
        ctx.replaced += 1


def _shift_value(value: str, vr: str, days: int) -> str | None:
    value = value.strip(" \x00")
    if "-" in value[1:] and vr == "DA":  # a range, as in queries
        parts = [_shift_value(p, vr, days) if p else "" for p in value.split("-")]
        return None if None in parts else "-".join(p for p in parts if p is not None)
    digits = value.replace(".", "") if vr == "DA" else value  # legacy YYYY.MM.DD
    if len(digits) < 8 or not digits[:8].isdigit():
        return None
    try:
        date = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:8]))
        return (date + dt.timedelta(days=days)).strftime("%Y%m%d") + digits[8:]
    except (ValueError, OverflowError):
        return None


def _map_uids(elem: DataElement, ctx: _Context) -> None:
    values = _values(elem)
    mapped = [v if _is_well_known(str(v)) else ctx.keys.uid(str(v)) for v in values]
    if mapped != [str(v) for v in values]:
        elem.value = mapped if len(mapped) > 1 else (mapped[0] if mapped else "")
        ctx.replaced += 1


def _is_class_reference(keyword: str) -> bool:
    # SOP classes, transfer syntaxes and coding schemes name standards and vendors, not people.
    return (
        "ClassUID" in keyword
        or "TransferSyntaxUID" in keyword
        or keyword in ("CodingSchemeUID", "ContextUID", "MappingResourceUID", "SOPClassesInStudy")
    )


def _is_well_known(uid: str) -> bool:
    return uid in UID_dictionary or uid.startswith("1.2.840.10008.")


def _keep_private(ds: Dataset, elem: DataElement, ctx: _Context) -> bool:
    if "Retain Safe Private" not in ctx.options:
        return False
    group, element = elem.tag.group, elem.tag.element
    if group <= 0x0007 or group == 0xFFFF or element < 0x1000:
        return False  # illegal private groups, or a non-creator element outside any block
    creator = ds.get((group, element >> 8))
    if creator is None or not isinstance(creator.value, str | bytes):
        return False
    name = creator.value.decode("latin-1") if isinstance(creator.value, bytes) else creator.value
    return ctx.safe.is_safe(group, name, element & 0xFF)


def _remove(ds: Dataset, tag: Any, ctx: _Context) -> None:
    del ds[tag]
    ctx.removed += 1


def _replace(elem: DataElement, value: Any, ctx: _Context) -> None:
    elem.value = value
    ctx.replaced += 1


def _empty(elem: DataElement, ctx: _Context) -> None:
    if elem.VR == "SQ":
        elem.value = DicomSequence()
    elif elem.VR in _BINARY_VRS:
        elem.value = b""
    elif elem.VR in _DUMMY and not isinstance(_DUMMY[elem.VR], str):
        elem.value = None
    else:
        elem.value = ""
    ctx.replaced += 1


def _dummy(elem: DataElement, ctx: _Context) -> None:
    elem.value = b"\x00\x00" if elem.VR in _BINARY_VRS else _DUMMY.get(elem.VR, "ANONYMOUS")
    ctx.replaced += 1


# --- de-identification marks and file meta ---------------------------------------------------


def _mark_deidentified(
    ds: Dataset, config: DeidConfig, options: tuple[str, ...], pixels_cleaned: bool
) -> None:
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = config.method_description[:64]
    codes = [BASIC_CODE]
    if pixels_cleaned:
        codes.append(CLEAN_PIXEL_DATA_CODE)
    codes += [OPTIONS[o][1:] for o in options]
    items = []
    for value, meaning in codes:
        item = Dataset()
        item.CodeValue = value
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    if MODIFIED_DATES in options and FULL_DATES not in options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    elif FULL_DATES in options:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"


def _rebuild_file_meta(ds: Dataset, transfer_syntax: str | None) -> None:
    """A new file meta: nothing of the sender's (source AE titles, private info) is carried."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if transfer_syntax:
        meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    ds.file_meta = meta


# --- helpers -----------------------------------------------------------------------------------


def _walk(ds: Dataset, prefix: str) -> Iterator[tuple[str, DataElement]]:
    for elem in ds:
        name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        path = f"{prefix}{name}"
        yield path, elem
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value or []):
                yield from _walk(item, f"{path}[{index}].")


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
    return str(value)


def _name_parts(name: str) -> list[str]:
    """The whole name and its family, given and middle components, per component group."""
    parts = []
    if name.strip():
        parts.append(name.strip())
    for group in name.split("="):
        if group.strip() and group.strip() != name.strip():
            parts.append(group.strip())
        pn = PersonName(group) if group else None
        if pn is None:
            continue
        for component in (pn.family_name, pn.given_name, pn.middle_name):
            component = component.strip()
            if component:
                parts.append(component)
    return parts


def _normalize(text: str) -> str:
    return text.casefold().replace("^", "").replace(" ", "")


def _normalized_identifiers(identifiers: Sequence[str]) -> list[str]:
    normalized = {_normalize(i) for i in identifiers}
    return sorted(n for n in normalized if len(n) >= 3)
