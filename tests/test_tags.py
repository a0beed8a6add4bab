"""Header de-identification against Table E.1-1: every attribute, every option, every depth."""

from __future__ import annotations

import copy
import datetime as dt
from io import BytesIO
from pathlib import Path

import pytest
from dicomgen import PHI, make_instance, make_series, phi_markers
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from deid_node.config import PROFILE_OPTIONS, DeidConfig
from deid_node.deid.profile import OPTIONS, load_profile_table
from deid_node.deid.tags import (
    deidentify_tags,
    identifying_values,
    residual_scan,
)
from deid_node.deid.uids import Pseudonymizer, load_or_create_secret
from deid_node.errors import InputError

TABLE = load_profile_table()
SECRET = b"t" * 32
# Attributes that are ours to write, not the original's.
MARKS = {"PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence"}
MARKS |= {"LongitudinalTemporalInformationModified"}
# Unlisted in Table E.1-1, so kept and cleaned: the nested copies of every attribute go here.
NEST = "AnatomicRegionSequence"
DEEP_NEST = "ReferencedSeriesSequence"
SAFE_CREATOR = "Philips PET Private Group"
ETHICS_COMMITTEE = "ClinicalTrialProtocolEthicsCommitteeName"


def _vr(tag: int) -> str:
    return dictionary_VR(tag).split(" or ")[0]


def _marker(tag: int, prefix: str, index: int) -> object:
    """A unique value consistent with the VR; text-like ones can be found in the output bytes."""
    vr = _vr(tag)
    text = f"{prefix}{index:04d}M"
    date = dt.date(1850, 1, 1) + dt.timedelta(days=index + (2000 if prefix != "QZ" else 0))
    if vr == "PN":
        return f"{text}^G{text}"
    if vr in ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"):
        return text
    if vr == "UR":
        return f"http://{text}.example"
    if vr == "DA":
        return date.strftime("%Y%m%d")
    if vr == "DT":
        return date.strftime("%Y%m%d") + "121314"
    if vr == "TM":
        return f"235959.{index + (2000 if prefix != 'QZ' else 0):06d}"
    if vr == "UI":
        return f"1.2.999.{len(prefix)}.{index}.7"
    if vr == "AS":
        return f"{index % 1000:03d}D"
    if vr in ("DS", "IS"):
        return str(index)
    if vr in ("US", "SS", "UL", "SL"):
        return index
    if vr in ("OB", "OW", "UN"):
        return f"{text}B".encode()
    if vr == "SQ":
        item = Dataset()
        item.PatientComments = f"{text}S"
        return Sequence([item])
    raise AssertionError(f"no marker for VR {vr}")


def _text_marker(value: object) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, Sequence):
        return value[0].PatientComments.encode()
    if isinstance(value, str) and not value.isdigit() and not value.endswith("D"):
        return value.encode()
    return None


def _all_attributes(prefix: str) -> dict[int, object]:
    return {
        tag: _marker(tag, prefix, index)
        for index, tag in enumerate(sorted(TABLE.by_tag))
        if tag >> 16 not in (0x0000, 0x0002)  # command and file meta groups: not data set
    }


def everything() -> tuple[Dataset, list[bytes]]:
    """An instance with every Table E.1-1 attribute pydicom knows, at three depths, plus
    private (LO, UN, SQ), overlay, curve, group length and unknown public attributes."""
    ds = make_instance("CT", study_uid="1.2.999.1", series_uid="1.2.999.2", sop_uid="1.2.999.3")
    ds.FrameOfReferenceUID = "1.2.999.4"
    markers: list[bytes] = []
    top = _all_attributes("QZ")
    for tag, value in top.items():
        if tag not in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E):
            ds.add_new(tag, _vr(tag), value)
    nested, deep = Dataset(), Dataset()
    for prefix, item in (("QN", nested), ("QD", deep)):
        for tag, value in _all_attributes(prefix).items():
            item.add_new(tag, _vr(tag), value)
    nested.add_new(0x00081115, "SQ", Sequence([deep]))
    ds.add_new(0x00082218, "SQ", Sequence([nested]))
    for value in [*top.values(), *_all_attributes("QN").values(), *_all_attributes("QD").values()]:
        marker = _text_marker(value)
        if marker is not None:
            markers.append(marker)

    block = ds.private_block(0x0011, "QZ VENDOR", create=True)
    block.add_new(0x01, "LO", "QZPRIVLO")
    block.add_new(0x02, "UN", b"QZPRIVUN")
    item = Dataset()
    item.add_new(0x00100010, "PN", "QZPRIVSQ^Nested")
    block.add_new(0x03, "SQ", Sequence([item]))
    safe = ds.private_block(0x7053, SAFE_CREATOR, create=True)
    safe.add_new(0x00, "DS", "1.5")  # SUV factor: on the safe list
    safe.add_new(0x01, "LO", "QZUNSAFEOFFSET")  # same block, offset not on the list
    fake = ds.private_block(0x7053, "QZ FAKE PET", create=True)
    fake.add_new(0x00, "LO", "QZWRONGCREATOR")  # safe offset, wrong creator
    ds.add_new(0x00090010, "LO", "QZ LOST CREATOR")
    ds.add_new(0x00091001, "UN", b"QZLOSTUN")
    markers += [b"QZPRIVLO", b"QZPRIVUN", b"QZPRIVSQ", b"QZUNSAFEOFFSET", b"QZWRONGCREATOR"]
    markers += [b"QZ VENDOR", b"QZ FAKE PET", b"QZ LOST CREATOR", b"QZLOSTUN"]

    ds.add_new(0x60000010, "US", 64)
    ds.add_new(0x60000011, "US", 64)
    ds.add_new(0x60000022, "LO", "QZOVERLAYDESC")
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", b"QZOVERLAYDATA\x00" * 37)
    ds.add_new(0x60004000, "LT", "QZOVERLAYCOMMENT")
    ds.add_new(0x50003000, "OB", b"QZCURVEDATA\x00")
    ds.add_new(0x50000022, "LO", "QZCURVEDESC")
    ds.add_new(0x00080000, "UL", 1234)  # group length
    ds.add_new(0x0040E0F0, "LO", "QZUNKNOWNTEXT")  # not in pydicom's dictionary
    ds.add_new(0x0040E0F2, "UN", b"QZUNKNOWNUN")
    ds.add_new(0x0040E0F4, "US", 7)
    markers += [b"QZOVERLAYDESC", b"QZOVERLAYDATA", b"QZOVERLAYCOMMENT", b"QZCURVEDATA"]
    markers += [b"QZCURVEDESC", b"QZUNKNOWNTEXT", b"QZUNKNOWNUN"]
    ds.file_meta.SourceApplicationEntityTitle = "QZSOURCEAE"
    ds.file_meta.SendingApplicationEntityTitle = "QZSENDINGAE"
    markers += [b"QZSOURCEAE", b"QZSENDINGAE"]
    return ds, sorted(set(markers))


def _bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _deid(options: tuple[str, ...] = (), **kwargs: object) -> tuple[Dataset, Dataset]:
    original, _ = everything()
    ds, _ = everything()
    deidentify_tags(ds, DeidConfig(profile_options=options), Pseudonymizer(SECRET), **kwargs)
    return original, dcmread(BytesIO(_bytes(ds)))


@pytest.fixture(scope="module")
def basic() -> tuple[Dataset, Dataset]:
    return _deid()


def test_no_marker_survives_the_basic_profile(basic: tuple[Dataset, Dataset]) -> None:
    _, markers = everything()
    original_bytes = _bytes(everything()[0])
    output = _bytes(basic[1])
    assert len(markers) > 1000
    planted = [m for m in markers if m in original_bytes]
    assert planted == markers, "every marker must be in the original bytes"
    assert [m.decode() for m in markers if m in output] == []
    original = everything()[0]
    assert residual_scan(basic[1], identifying_values(original)) == []


def test_basic_actions_at_top_level(basic: tuple[Dataset, Dataset]) -> None:
    original, out = basic
    keys = Pseudonymizer(SECRET)
    checked = 0
    for tag, row in TABLE.by_tag.items():
        if tag not in original or tag >> 16 == 0x0002:
            continue
        keyword = keyword_for_tag(tag)
        before, action = original[tag], row.basic
        if keyword in ("PatientID", "PatientName"):
            assert out[tag].value == keys.patient_id(str(original.PatientID)), keyword
        elif keyword == ETHICS_COMMITTEE:  # 1C: present only with its approval number (X)
            assert tag not in out, keyword
        elif action == "X" or (
            action in ("X/D", "X/Z", "X/Z/D", "X/Z/U*")
            and keyword not in ("AcquisitionContextSequence")
        ):
            assert tag not in out, f"{keyword} ({action}) should be removed"
        elif action == "Z" or action == "Z/D" or keyword == "AcquisitionContextSequence":
            assert tag in out and out[tag].is_empty, f"{keyword} ({action}) should be empty"
        elif action == "U":
            assert out[tag].value == keys.uid(str(before.value)), keyword
        elif action == "D":
            assert tag in out and not out[tag].is_empty, f"{keyword} (D) must be present"
            if before.VR != "SQ":
                assert out[tag].value != before.value, keyword
        checked += 1
    assert checked > 600


def test_nested_attributes_follow_the_table_and_type3(basic: tuple[Dataset, Dataset]) -> None:
    _, out = basic
    nested = out[NEST][0]
    deep = nested[DEEP_NEST][0]
    for item in (nested, deep):
        assert "PatientComments" not in item
        assert "InstitutionName" not in item  # X/Z/D: Type 3 inside a sequence
        assert item.StudyDate == ""  # Z
        assert item.SOPInstanceUID.startswith("2.25.")


def test_private_overlay_curve_group_length_and_unknown_public(
    basic: tuple[Dataset, Dataset],
) -> None:
    _, out = basic
    assert not [e.tag for e in out if e.tag.is_private]
    assert not [e.tag for e in out if 0x5000 <= e.tag.group <= 0x60FF]
    assert Tag(0x00080000) not in out
    assert Tag(0x0040E0F0) not in out  # unknown public text
    assert Tag(0x0040E0F2) not in out  # unknown public UN
    assert Tag(0x0040E0F4) not in out  # unknown public number: default deny


def test_file_meta_is_rebuilt(basic: tuple[Dataset, Dataset]) -> None:
    original, out = basic
    meta = out.file_meta
    assert meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != original.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == original.SOPClassUID == out.SOPClassUID
    assert meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert "SourceApplicationEntityTitle" not in meta
    assert "SendingApplicationEntityTitle" not in meta


def test_marks_and_codes_basic(basic: tuple[Dataset, Dataset]) -> None:
    _, out = basic
    assert out.PatientIdentityRemoved == "YES"
    assert out.DeidentificationMethod == DeidConfig().method_description
    assert [i.CodeValue for i in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert {i.CodingSchemeDesignator for i in out.DeidentificationMethodCodeSequence} == {"DCM"}
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


def test_clean_pixel_data_code_when_pixels_were_cleaned() -> None:
    _, out = _deid(pixels_cleaned=True)
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113101"]


def _shift(value: str, days: int) -> str:
    date = dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) + dt.timedelta(days=days)
    return date.strftime("%Y%m%d") + value[8:]


@pytest.mark.parametrize("option", PROFILE_OPTIONS)
def test_each_option_changes_exactly_its_column(
    option: str, basic: tuple[Dataset, Dataset]
) -> None:
    original, out = _deid((option,))
    _, basic_out = basic
    column = OPTIONS[option][0]
    keys = Pseudonymizer(SECRET)
    days = keys.date_shift_days(str(original.PatientID))
    changed = 0
    for tag, row in TABLE.by_tag.items():
        if tag not in original or tag >> 16 == 0x0002 or keyword_for_tag(tag) in MARKS:
            continue
        keyword, before = keyword_for_tag(tag), original[tag]
        action = row.options.get(column)
        if keyword == ETHICS_COMMITTEE:
            continue  # 1C: leaves with its approval number, whatever the option
        if action is None:
            assert (tag in out) == (tag in basic_out), f"{keyword}: not {option}'s to change"
            if tag in out and before.VR != "SQ":
                assert out[tag].value == basic_out[tag].value, keyword
            continue
        changed += 1
        if action == "K" and before.VR == "SQ":
            assert tag in out, keyword
        elif action == "K":
            assert out[tag].value == before.value, f"{keyword}: {option} keeps it"
        elif action == "C" and before.VR in ("DA", "DT"):
            assert out[tag].value == _shift(before.value, days), keyword
        elif action == "C" and before.VR == "TM":
            assert out[tag].value == before.value, keyword
        elif action == "C" and before.VR == "SQ":
            # kept, and its items cleaned as the top level is
            inner = "PatientComments" in out[tag].value[0]
            assert inner == ("PatientComments" in out), keyword
        elif action == "C":  # a descriptor without identifying values is kept as it is
            assert out[tag].value == before.value, keyword
        else:
            raise AssertionError(f"{keyword}: untested action {action}")
    assert changed > 0 or option == "Retain Safe Private"
    codes = [i.CodeValue for i in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", OPTIONS[option][1]]


def test_retain_uids_keeps_every_uid() -> None:
    original, out = _deid(("Retain UIDs",))
    assert out.SOPInstanceUID == original.SOPInstanceUID == out.file_meta.MediaStorageSOPInstanceUID
    assert out.FrameOfReferenceUID == original.FrameOfReferenceUID
    assert out[NEST][0].SOPInstanceUID == original[NEST][0].SOPInstanceUID


def test_retain_safe_private_keeps_only_listed_elements() -> None:
    _, out = _deid(("Retain Safe Private",))
    private = {(e.tag.group, e.tag.element): e.value for e in out if e.tag.is_private}
    creators = {k: v for k, v in private.items() if k[1] < 0x1000}
    assert list(creators.values()) == [SAFE_CREATOR]
    ((group, block),) = creators
    assert {k: v for k, v in private.items() if k[1] >= 0x1000} == {(group, block << 8): 1.5}


def test_modified_dates_keep_intervals_and_mark_modified() -> None:
    original, out = _deid(("Retain Longitudinal Temporal Information Modified Dates",))
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    before = dt.date.fromisoformat(original.InstanceCreationDate) - dt.date.fromisoformat(
        original.AcquisitionDate
    )
    after = dt.date.fromisoformat(out.InstanceCreationDate) - dt.date.fromisoformat(
        out.AcquisitionDate
    )
    assert before == after
    assert out.AcquisitionDate != original.AcquisitionDate
    assert out.PatientBirthDate == ""  # Z whatever the dates option


def test_full_dates_keep_dates_and_mark_unmodified() -> None:
    original, out = _deid(("Retain Longitudinal Temporal Information Full Dates",))
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert out.StudyDate == original.StudyDate
    assert out.PatientBirthDate == ""


def test_clean_descriptors_removes_a_descriptor_holding_an_identifier() -> None:
    ds = make_instance("CT")
    ds.StudyDescription = f"CT for {ds.PatientName.family_name} follow-up"
    ds.SeriesDescription = "AXIAL 5mm"
    deidentify_tags(ds, DeidConfig(profile_options=("Clean Descriptors",)), Pseudonymizer(SECRET))
    assert "StudyDescription" not in ds
    assert ds.SeriesDescription == "AXIAL 5mm"


def test_clean_graphics_still_removes_overlays() -> None:
    _, out = _deid(("Clean Graphics",))
    assert not [e.tag for e in out if 0x6000 <= e.tag.group <= 0x60FF]


def test_enhanced_instances_keep_type1_dates_and_source_images() -> None:
    ds = make_instance("CT")
    ds.SharedFunctionalGroupsSequence = Sequence([Dataset()])
    source = Dataset()
    source.ReferencedSOPClassUID = ds.SOPClassUID
    source.ReferencedSOPInstanceUID = "1.2.3.4.5"
    derivation = Dataset()
    derivation.SourceImageSequence = Sequence([source])
    frame = Dataset()
    frame.DerivationImageSequence = Sequence([derivation])
    ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
    ds.AcquisitionDateTime = "20240312101530"
    keys = Pseudonymizer(SECRET)
    deidentify_tags(ds, DeidConfig(), keys)
    assert ds.ContentDate == "19000101"  # Z/D, Type 1 in Multi-frame Functional Groups
    assert ds.AcquisitionDateTime == "19000101000000"  # X/Z/D, Type 1C
    item = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert item.SourceImageSequence[0].ReferencedSOPInstanceUID == keys.uid("1.2.3.4.5")


def test_uids_and_pseudonyms_consistent_across_series_and_restarts(tmp_path: Path) -> None:
    study = generate_uid()
    first = make_series(3, "CT", study_uid=study)
    second = make_series(2, "CT", study_uid=study)
    reference = Dataset()
    reference.SeriesInstanceUID = first[0].SeriesInstanceUID
    instance = Dataset()
    instance.ReferencedSOPClassUID = first[0].SOPClassUID
    instance.ReferencedSOPInstanceUID = first[1].SOPInstanceUID
    reference.ReferencedInstanceSequence = Sequence([instance])
    for ds in second:
        ds.FrameOfReferenceUID = first[0].FrameOfReferenceUID
        ds.ReferencedSeriesSequence = Sequence([copy.deepcopy(reference)])
    originals = [ds.SOPInstanceUID for ds in first]
    config = DeidConfig()
    before_restart = Pseudonymizer(load_or_create_secret(tmp_path))
    for ds in first:
        deidentify_tags(ds, config, before_restart)
    after_restart = Pseudonymizer(load_or_create_secret(tmp_path))
    for ds in second:
        deidentify_tags(ds, config, after_restart)

    assert len({ds.StudyInstanceUID for ds in first + second}) == 1
    assert first[0].StudyInstanceUID != study
    assert len({ds.SeriesInstanceUID for ds in first}) == 1
    assert first[0].SeriesInstanceUID != second[0].SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in first + second}) == 5
    assert not set(originals) & {ds.SOPInstanceUID for ds in first}
    assert {ds.PatientID for ds in first + second} == {str(first[0].PatientName)}
    for ds in second:
        ref = ds.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == first[0].SeriesInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == first[1].SOPInstanceUID
        assert ref.ReferencedInstanceSequence[0].ReferencedSOPClassUID == first[0].SOPClassUID
        assert ds.FrameOfReferenceUID == first[0].FrameOfReferenceUID


def test_nested_patient_gets_its_own_pseudonym() -> None:
    ds = make_instance("CT")
    other = Dataset()
    other.PatientName = "Otherperson^Anna"
    other.PatientID = "OTHERPID77"
    ds.AnatomicRegionSequence = Sequence([other])
    keys = Pseudonymizer(SECRET)
    deidentify_tags(ds, DeidConfig(), keys)
    item = ds.AnatomicRegionSequence[0]
    assert item.PatientID == keys.patient_id("OTHERPID77") == item.PatientName
    assert ds.PatientName == keys.patient_name(PHI["PatientID"]) != item.PatientName


def test_identifying_values_include_names_components_and_ids() -> None:
    ds = make_instance("CT")
    values = identifying_values(ds)
    for expected in ("Zyxwortha^Quilliam^Montague", "Zyxwortha", "Quilliam", "Montague"):
        assert expected in values
    for keyword in ("PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber"):
        assert str(ds[keyword].value) in values
    assert "Saint Quarvington Hospital" in values
    assert "NESTQX Requesting Dr Pemberly" in values  # a PN inside a sequence
    retained = identifying_values(
        ds, DeidConfig(profile_options=("Retain Institution Identity", "Retain Device Identity"))
    )
    assert "Saint Quarvington Hospital" not in retained
    assert "STATQX17" not in retained


def test_residual_scan_finds_leftovers_by_path_only() -> None:
    ds = make_instance("CT")
    identifiers = identifying_values(ds)
    deidentify_tags(ds, DeidConfig(), Pseudonymizer(SECRET))
    assert residual_scan(ds, identifiers) == []
    ds.Manufacturer = "made for QUILLIAM"  # case-insensitive
    ds.AnatomicRegionSequence = Sequence([Dataset()])
    ds.AnatomicRegionSequence[0].CodeMeaning = "zyx wortha"  # spaces ignored
    ds.file_meta.ImplementationVersionName = "PIDQX778812"
    ds.add_new(0x00110010, "LO", "X")
    ds.add_new(0x00111001, "UN", b"..Tenniwell..")
    hits = residual_scan(ds, identifiers)
    assert hits == [
        "Manufacturer (name part)",
        "AnatomicRegionSequence[0].CodeMeaning (name part)",
        "(0011,1001) (name part)",
        "file_meta.ImplementationVersionName (ID)",
    ]
    assert [(h.keyword, h.kind) for h in hits][:2] == [
        ("Manufacturer", "name part"),
        ("CodeMeaning", "name part"),
    ]
    assert residual_scan(ds, ["Zy", "Ab", ""]) == []  # shorter than 3: ignored


def test_input_without_sop_instance_uid_is_refused_without_values() -> None:
    ds = make_instance("CT")
    del ds.SOPInstanceUID
    with pytest.raises(InputError) as excinfo:
        deidentify_tags(ds, DeidConfig(), Pseudonymizer(SECRET))
    assert not any(m.decode() in str(excinfo.value) for m in phi_markers())


def test_identifying_values_sees_names_stored_as_un_and_in_nested_sequences(tmp_path):
    """The raw-VR fast path finds a PN sent as UN (pydicom restores its VR from the dictionary
    while reading) and a PN inside a sequence."""
    from pydicom import Dataset as _Dataset
    from pydicom import dcmread as _dcmread
    from pydicom.sequence import Sequence as _Sequence

    ds = _Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.add_new(0x00100010, "UN", b"Quorvath^Ilsabet")
    item = _Dataset()
    item.ReferringPhysicianName = "Brannock^Teodor"
    ds.RequestAttributesSequence = _Sequence([item])
    path = tmp_path / "un.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    found = identifying_values(_dcmread(path, force=True))
    assert {"Quorvath", "Ilsabet", "Brannock", "Teodor"} <= set(found)
