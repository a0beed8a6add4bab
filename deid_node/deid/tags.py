"""Header de-identification: PS3.15 Basic Application Level Confidentiality Profile and options.

Actions come from Table E.1-1 (`deid.profile`); this module gives them meaning, in place, at every
sequence depth and in the file meta. Policy beyond the table, chosen deliberately:

- Compound actions (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) and removals are resolved with
  data/required-types.csv: where an attribute is Type 1 (dummy) or Type 2 (empty) in the IOD at
  hand (top level, enhanced multi-frame, by Modality, inside a given sequence, in a content item
  of a given ValueType). Anything not listed there is treated as Type 3 and removed.
- D writes a dummy consistent with the VR (`_DUMMY`); D or C on a sequence keeps the sequence and
  cleans its items, where the codes and text that would be kept elsewhere are dummied or removed
  (a Person Identification Code Sequence keeps its shape, not the employee number).
  PatientID and PatientName always get the pseudonym of the original PatientID.
- C on text (Clean Descriptors / Structured Content) keeps the value only if it contains none of
  the instance's identifying values; otherwise the attribute is removed (or emptied / dummied when
  required). C on dates shifts them (Modified Dates); C on times keeps them.
- Every UI value that is not a well-known DICOM UID or a class / transfer syntax / coding scheme
  reference is replaced by `keys.uid()`, listed in the table or not, unless Retain UIDs.
- Default deny for what Table E.1-1 does not list: private attributes are removed unless Retain
  Safe Private and safe; curves (50xx) and whole overlay groups (60xx) are removed (Clean
  Graphics included: we cannot clean an overlay bitmap); group lengths are removed. A public
  attribute survives only if data/keep-public.csv keeps it: by VR (codes, numbers, UIDs,
  sequences, whose items are cleaned by the same rules) or by keyword (pixel data, LUTs, waveform
  samples, equipment make and model, coded entries, acquisition technique). Kept free text is
  cleaned like C: a value holding an identifying value of the instance (an in-house device
  whose Manufacturer is the institution, a local code meaning a name) is removed, emptied or
  dummied as the IOD requires. Everything else, unknown public attributes and binary VRs
  included, is removed; Encrypted Attributes, Digital Signatures, MAC Parameters and Original
  Attributes Sequences always are. DA/DT/TM are removed unless a Retain Longitudinal option is
  selected.

The identifying values live in `deid.identifiers`, the residual scan in `deid.residual`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom import Dataset, FileMetaDataset
from pydicom.dataelem import DataElement
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from deid_node.config import PROFILE_OPTIONS, DeidConfig
from deid_node.deid.elements import element_values, value_text
from deid_node.deid.identifiers import identifying_values  # the pipeline's, through here
from deid_node.deid.matching import Matcher
from deid_node.deid.profile import (
    BASIC_CODE,
    CLEAN_PIXEL_DATA_CODE,
    OPTIONS,
    KeepList,
    ProfileTable,
    RequiredTypes,
    SafePrivate,
    load_keep_list,
    load_profile_table,
    load_required_types,
    load_safe_private,
    option_columns,
)
from deid_node.deid.residual import evidence, residual_scan  # residual_scan: the pipeline's
from deid_node.deid.uids import Pseudonymizer
from deid_node.errors import InputError

__all__ = ["SAFE_TEXT_KEYWORDS", "TagResult", "deidentify_tags", "identifying_values"]
__all__ += ["residual_scan"]

FULL_DATES = "Retain Longitudinal Temporal Information Full Dates"
MODIFIED_DATES = "Retain Longitudinal Temporal Information Modified Dates"
IMPLEMENTATION_VERSION_NAME = "DEID_NODE_0_1"

FREE_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
DATE_VRS = frozenset({"DA", "DT"})
_TEXT_AND_DATE_VRS = FREE_TEXT_VRS | DATE_VRS | {"TM"}


def _safe_text_keywords(keep: KeepList) -> frozenset[str]:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    found = set()
    for keyword, action in keep.keywords.items():
        tag = tag_for_keyword(keyword)
        if action == "keep" and tag is not None and dictionary_VR(tag) in FREE_TEXT_VRS:
            found.add(keyword)
    return frozenset(found)


# Public free-text attributes absent from Table E.1-1 that data/keep-public.csv keeps as they
# are (equipment make and model, coded entries, technique); reports may show their values.
SAFE_TEXT_KEYWORDS = _safe_text_keywords(load_keep_list())
# Text kept under Clean Structured Content when it holds none of the identifying values.
STRUCTURED_TEXT_KEYWORDS = frozenset({"TextValue"})

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
# Removal that no IOD requirement turns into a dummy (encrypted attributes, unknown tags).
_REMOVE = "remove"
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PATIENT_ID, _PATIENT_NAME = 0x00100020, 0x00100010  # compared by tag: a keyword is a look-up


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
    keep: KeepList
    required: RequiredTypes
    scopes: frozenset[str]  # required-types scopes that apply at the top level
    matcher: Matcher  # the instance's identifying values, for C on text
    shift_days: int
    removed: int = 0
    replaced: int = 0

    @property
    def modified_dates(self) -> bool:
        return MODIFIED_DATES in self.options

    @property
    def full_dates(self) -> bool:
        return FULL_DATES in self.options


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
        keep=load_keep_list(),
        required=load_required_types(),
        scopes=_top_level_scopes(ds),
        matcher=evidence(
            identifiers if identifiers is not None else identifying_values(ds, config)
        ),
        shift_days=keys.date_shift_days(patient_key),
    )
    transfer_syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _clean_dataset(ds, ctx, parent="", restricted=False)
    _mark_deidentified(ds, config, options, pixels_cleaned)
    _rebuild_file_meta(ds, transfer_syntax)
    if getattr(ds, "preamble", None):
        ds.preamble = b"\x00" * 128  # may hold a TIFF header or anything else
    return TagResult(options=options, removed=ctx.removed, replaced=ctx.replaced)


# --- the walk ------------------------------------------------------------------------------


# SOP classes whose IOD uses the Enhanced General Equipment and Multi-frame Functional Groups
# modules even when a (test) instance carries no functional groups.
_ENHANCED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.4.2",  # MR Spectroscopy
        "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
        "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA
        "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # Breast Tomosynthesis
        "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
        "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
        "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET
        "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET
    }
)


# Type 1C attributes that may be present only with another one: Table E.1-1 keeps (D) the first
# and removes (X) the second, which would leave an Error.
_PRESENT_ONLY_WITH = {
    "ClinicalTrialProtocolEthicsCommitteeName": "ClinicalTrialProtocolEthicsCommitteeApprovalNumber"
}
# ... and with another one that has a value: a non-human subject's owner is emptied (Type 2C),
# so the owner's role (1C) goes.
_PRESENT_ONLY_WITH_VALUE = {"ResponsiblePersonRole": "ResponsiblePerson"}


def _top_level_scopes(ds: Dataset) -> frozenset[str]:
    """The required-types scopes that hold at the top level of `ds`."""
    scopes = {"top"}
    if (
        "PerFrameFunctionalGroupsSequence" in ds
        or "SharedFunctionalGroupsSequence" in ds
        or str(ds.get("SOPClassUID", "")) in _ENHANCED_SOP_CLASSES
    ):
        scopes.add("enhanced")
    modality = ds.get("Modality")
    if isinstance(modality, str) and modality:
        scopes.add(f"modality:{modality.strip()}")
    for keyword in load_required_types().has_keywords:
        if keyword in ds:
            scopes.add(f"has:{keyword}")
    return frozenset(scopes)


def _clean_dataset(ds: Dataset, ctx: _Context, parent: str, restricted: bool) -> None:
    """`restricted`: ds is an item of a sequence that Table E.1-1 lists for replacement or
    cleaning (a person's identification codes, observers, content); what the keep list keeps
    elsewhere (codes, descriptions) is not kept here."""
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
                _finish_kept(ds, elem, ctx, parent, _POLICY_KEEP, restricted=False)
            else:
                _remove(ds, tag, ctx)
        elif 0x5000 <= group <= 0x501E or 0x6000 <= group <= 0x601E:
            _remove(ds, tag, ctx)  # curves; overlays as whole groups (see module docstring)
        elif tag == _PATIENT_ID:
            _replace(elem, ctx.keys.patient_id(str(elem.value or "")), ctx)
        elif tag == _PATIENT_NAME:
            # An item naming another patient gets that patient's pseudonym (PatientID sorts
            # after PatientName, so the sibling still holds the original here).
            sibling = ds.get("PatientID")
            key = ctx.patient_key if parent == "" or sibling is None else str(sibling)
            _replace(elem, ctx.keys.patient_name(key), ctx)
        else:
            _apply(ds, elem, _action(elem, ctx, restricted), ctx, parent)
    for tag in creators:
        if (tag.group, tag.element) not in kept_private_blocks:
            _remove(ds, tag, ctx)
    for keyword, condition in _PRESENT_ONLY_WITH.items():
        if keyword in ds and condition not in ds:
            _remove(ds, ds.data_element(keyword).tag, ctx)  # type: ignore[union-attr]
    for keyword, condition in _PRESENT_ONLY_WITH_VALUE.items():
        if keyword in ds and not ds.get(condition):
            _remove(ds, ds.data_element(keyword).tag, ctx)  # type: ignore[union-attr]


def _action(elem: DataElement, ctx: _Context, restricted: bool) -> str:
    """The Table E.1-1 action, else the keep list's (default deny: X when not on it)."""
    row = ctx.table.row(elem.tag)
    if row is not None:
        return row.action(ctx.columns)
    keyword, vr = elem.keyword, elem.VR
    if not keyword or vr == "UN":
        return _REMOVE  # an unknown public attribute, or one we cannot even type
    keep = ctx.keep.action(keyword, vr)
    if keep == "remove":
        return _REMOVE
    if vr in DATE_VRS or vr == "TM":
        return "C" if ctx.modified_dates or ctx.full_dates else "X"
    if "Clean Structured Content" in ctx.options and keyword in STRUCTURED_TEXT_KEYWORDS:
        return "C"
    if keep is None or (restricted and vr in _TEXT_AND_DATE_VRS | _BINARY_VRS):
        return "X"  # X unless the IOD requires it (then a dummy, or empty)
    if keep in ("clean", "keep") and vr in FREE_TEXT_VRS:
        # Technical text is kept only while it holds no identifying value: an in-house
        # device's Manufacturer is the institution, a local code's meaning may be a name.
        return "C"
    return _POLICY_KEEP


def _apply(ds: Dataset, elem: DataElement, action: str, ctx: _Context, parent: str) -> None:
    if action == "X":
        action = "X/Z/D"  # removal must not break the IOD: Type 1 gets a dummy, Type 2 empty
    elif action == _REMOVE:
        action = "X"
    if action in ("Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"):
        action = _resolve_compound(action, _required_type(ds, elem.keyword, parent, ctx))
    if action == "X":
        _remove(ds, elem.tag, ctx)
    elif action == "Z":
        _empty(elem, ctx)
    elif action == "D":
        if elem.VR == "SQ":
            _finish_kept(ds, elem, ctx, parent, "K", restricted=True)
        elif elem.VR == "UI":
            _finish_kept(ds, elem, ctx, parent, "U", restricted=False)
        else:
            _dummy(elem, ctx)
    elif action == "C":
        _clean(ds, elem, ctx, parent)
    else:  # K, U (and U* resolved to U), and our policy's keep
        _finish_kept(ds, elem, ctx, parent, action, restricted=False)


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


def _required_type(ds: Dataset, keyword: str, parent: str, ctx: _Context) -> str | None:
    """Type "1" or "2" where the IOD requires the attribute; None: Type 3, or not known to us."""
    if parent:
        value_type = ds.get("ValueType")
        return ctx.required.nested(
            keyword, parent, value_type.strip() if isinstance(value_type, str) else None
        )
    return ctx.required.top_level(keyword, ctx.scopes)


def _finish_kept(
    ds: Dataset, elem: DataElement, ctx: _Context, parent: str, action: str, restricted: bool
) -> None:
    """A kept element still gets its sequences cleaned, UIDs mapped and dates shifted."""
    if elem.VR == "SQ":
        for item in elem.value or []:
            _clean_dataset(item, ctx, parent=elem.keyword or str(elem.tag), restricted=restricted)
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
    if vr == "SQ":
        _finish_kept(ds, elem, ctx, parent, "K", restricted=True)
    elif vr not in _TEXT_AND_DATE_VRS:
        _finish_kept(ds, elem, ctx, parent, "U" if vr == "UI" else "K", restricted=False)
    elif vr in DATE_VRS:
        if ctx.modified_dates:
            _shift(ds, elem, ctx, parent)
        elif not ctx.full_dates:
            _apply(ds, elem, "X/Z/D", ctx, parent)
    else:
        if any(ctx.matcher.find(value_text(v)) for v in element_values(elem)):
            _apply(ds, elem, "X/Z/D", ctx, parent)


def _shift(ds: Dataset, elem: DataElement, ctx: _Context, parent: str) -> None:
    values = element_values(elem)
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
    values = element_values(elem)
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
