"""The residual scan is exact: it finds identifying values in every form and VR, and nothing else."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from deid_node.config import DeidConfig
from deid_node.deid.residual import (
    BIRTH_DATE,
    DATE,
    ID,
    NAME,
    Identifiers,
    IdentifyingValue,
    Matcher,
    identifying_values,
    residual_scan,
)
from deid_node.deid.tags import deidentify_tags
from deid_node.deid.uids import Pseudonymizer


def _matcher(*values: tuple[str, str]) -> Matcher:
    return Matcher([IdentifyingValue(v, kind) for v, kind in values])


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("ORIGINAL\\PRIMARY\\AXIAL", False),  # MARY inside PRIMARY is no name
        ("Mary", True),
        ("for MARY", True),
        ("SMITH^MARY", True),
        ("mary123", True),  # a letter run ends where digits start
        ("Rosemary", False),
        ("MÁRY", True),  # accents folded
        ("MARYLAND", False),
    ],
)
def test_name_parts_match_on_token_boundaries(text: str, found: bool) -> None:
    assert bool(_matcher(("MARY", NAME)).find(text)) is found


def test_whole_names_match_with_separators_ignored() -> None:
    matcher = _matcher(("Zyxwortha^Quilliam", NAME))
    assert matcher.find("ZYXWORTHA QUILLIAM") == NAME
    assert matcher.find("zyxwortha-quilliam, 1980") == NAME
    assert matcher.find("xzyxworthaquilliam") is None


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("MRN 12345678", True),
        ("MRN 1234-5678", True),
        ("12 345 678", True),
        ("12345678", True),
        ("id:12345678;", True),
        ("912345678", False),  # a longer number is another number
        ("123456789", False),
        ("0.12345678", False),  # a decimal fraction
        ("12345678.5", False),
    ],
)
def test_numeric_ids_match_as_whole_numbers(text: str, found: bool) -> None:
    assert bool(_matcher(("12345678", ID)).find(text)) is found


def test_alphanumeric_ids_match_as_substrings_ignoring_separators() -> None:
    matcher = _matcher(("EMP-4711", ID))
    assert matcher.find("emp4711") == ID
    assert matcher.find("XEMP 4711X") == ID
    assert matcher.find("EMP\\4711") is None  # two values of a multi-valued element
    assert matcher.find("4711") is None


def test_short_numeric_ids_are_not_evidence_in_numbers_and_codes() -> None:
    matcher = _matcher(("4711", ID))
    assert matcher.find("patient 4711") == ID  # free text
    assert matcher.find("4711", coded=True) is None  # a window width, a slice count


@pytest.mark.parametrize(
    "text",
    [
        "19800102",
        "1980-01-02",
        "1980/1/2",
        "1980.01.02",
        "02.01.1980",
        "2.1.1980",
        "02/01/1980",
        "01/02/1980",
        "01021980",
        "2 Jan 1980",
        "02-JAN-1980",
        "January 2, 1980",
        "born 02.01.1980 in",
    ],
)
def test_dates_match_in_every_written_format(text: str) -> None:
    assert _matcher(("19800102", DATE)).find(text) == DATE


@pytest.mark.parametrize("text", ["119800102", "19800103", "1980-01-020", "0.19800102", "198001"])
def test_dates_do_not_match_other_numbers(text: str) -> None:
    assert _matcher(("19800102", DATE)).find(text) is None


def test_short_values_are_never_looked_for() -> None:
    matcher = _matcher(("J", NAME), ("Li", NAME), ("12", ID))
    assert not matcher
    assert matcher.find("J LI 12") is None


def _instance(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_binary_values_are_read_as_latin1_and_utf8_bytes_inside_sequences() -> None:
    original = _instance(PatientName="Müller^Jürgen", PatientID="MRN99887766")
    identifiers = identifying_values(original)
    out = _instance()
    item = Dataset()
    item.add_new(0x00DC1000, "OB", "xx Jürgen xx".encode())  # UTF-8
    item.add_new(0x00DC1002, "UN", "..MÜLLER..".encode("latin-1"))
    item.add_new(0x00DC1004, "OB", b"\x00\x01MRN99887766\x00")
    out.AnatomicRegionSequence = Sequence([item])
    hits = residual_scan(out, identifiers)
    assert [(h.path, h.kind) for h in hits] == [
        ("AnatomicRegionSequence[0].(00DC,1000)", NAME),
        ("AnatomicRegionSequence[0].(00DC,1002)", NAME),
        ("AnatomicRegionSequence[0].(00DC,1004)", ID),
    ]


def test_bulk_sample_data_is_not_read() -> None:
    identifiers = identifying_values(_instance(PatientID="12345"))
    out = _instance(PixelData=b"\x00123456\x0012345\x00")
    assert residual_scan(out, identifiers) == []


def test_values_the_input_keeps_as_technical_are_no_evidence() -> None:
    original = _instance(
        ManufacturerModelName="Aquilion ONE",
        StationName="AQUILION ONE",  # a device name equal to the model
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        PatientName="AXIAL^Quorra",  # a name word equal to a defined term
        PatientID="120000",
        ExposureInuAs=120000,  # a numeric ID equal to a kept number
    )
    identifiers = identifying_values(original)
    out = _instance(
        ManufacturerModelName="Aquilion ONE",
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
        ExposureInuAs=120000,
    )
    assert residual_scan(out, identifiers) == []
    out.SeriesDescription = "Quorra"  # the name part that is no defined term still counts
    assert [(h.keyword, h.kind) for h in residual_scan(out, identifiers)] == [
        ("SeriesDescription", NAME)
    ]


def test_identifying_values_in_kept_technical_text_are_cleaned_not_quarantined() -> None:
    """An in-house device whose Manufacturer names the hospital, an AI vendor recorded as
    ContentCreatorName: the kept technical text holding them is emptied, nothing quarantines."""
    ds = _instance(
        Manufacturer="Quarvington Medical Physics",
        InstitutionName="Quarvington Royal Infirmary",
        ManufacturerModelName="Aquilion ONE",
        ContentCreatorName="DEEPVENDOR^AI",
        SoftwareVersions="DeepVendor 2.1",
        ConvolutionKernel="FC13",
    )
    identifiers = identifying_values(ds)
    deidentify_tags(ds, DeidConfig(), Pseudonymizer(b"k" * 32), identifiers=identifiers)
    assert residual_scan(ds, identifiers) == []
    assert ds.Manufacturer == ""  # Type 2
    assert "SoftwareVersions" not in ds  # Type 3
    assert (ds.ManufacturerModelName, ds.ConvolutionKernel) == ("Aquilion ONE", "FC13")


@pytest.mark.parametrize(
    ("institution", "manufacturer"),
    [("TOSHIBA", "TOSHIBA_MEC"), ("GE MEDICAL SYSTEMS", "G.E. Medical Systems")],
)
def test_a_vendor_recorded_as_institution_keeps_its_manufacturer(
    institution: str, manufacturer: str
) -> None:
    ds = _instance(InstitutionName=institution, Manufacturer=manufacturer)
    identifiers = identifying_values(ds)
    deidentify_tags(ds, DeidConfig(), Pseudonymizer(b"k" * 32), identifiers=identifiers)
    assert residual_scan(ds, identifiers) == []
    assert ds.Manufacturer == manufacturer
    assert "InstitutionName" not in ds


def test_the_nodes_own_dummies_and_pseudonyms_are_no_evidence() -> None:
    config = DeidConfig()
    original = _instance(
        PatientName="ANONYMOUS",
        PatientID="DEID0123456789ABCDEF",
        PatientBirthDate="19000101",
        StudyDate="19000101",
    )
    identifiers = identifying_values(original, config)
    out = _instance(
        PatientName="DEIDFEDCBA9876543210",
        PatientID="DEIDFEDCBA9876543210",
        PatientBirthDate="19000101",
        ContentDate="19000101",
        ReferringPhysicianName="ANONYMOUS",
    )
    assert residual_scan(out, identifiers) == []


def test_codes_of_person_identification_sequences_are_identifying() -> None:
    code = Dataset()
    code.CodeValue = "EMP-4711"
    code.CodingSchemeDesignator = "99HOSP"
    code.CodeMeaning = "Grummlewick badge"
    original = _instance(PersonIdentificationCodeSequence=Sequence([code]))
    found = {(v, v.kind) for v in identifying_values(original)}
    assert ("EMP-4711", ID) in found
    assert ("Grummlewick badge", NAME) in found


def test_plain_strings_still_work_and_hits_never_hold_the_value() -> None:
    out = _instance(SeriesDescription="scan of Pemberly 1980-01-02")
    hits = residual_scan(out, Identifiers(["Pemberly"]))
    assert hits == ["SeriesDescription (name part)"]
    assert residual_scan(out, ["19800102"]) == ["SeriesDescription (date)"]
    assert all("Pemberly" not in hit and "1980" not in hit for hit in hits)


def test_numbers_joined_across_decimal_points_are_no_device_value() -> None:
    """MR_small's StationName is 000000000; its ImageOrientationPatient 1.0000\\0.0000\\... ."""
    identifiers = identifying_values(_instance(StationName="000000000", DeviceSerialNumber="0200"))
    out = _instance(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    out.ImageOrientationPatient = ["1.0000", "0.0000", "0.0000", "0.0000", "1.0000", "0.0000"]
    assert residual_scan(out, identifiers) == []
    identifiers = identifying_values(_instance(StationName="SCANNER 20417"))
    out.ImageComments = "from scanner 20417"
    assert [h.kind for h in residual_scan(out, identifiers)] == ["device"]


def test_every_dummy_the_profile_writes_is_known_to_the_scan() -> None:
    from deid_node.deid.residual import DUMMY_TEXT
    from deid_node.deid.tags import _DUMMY

    assert {v for v in _DUMMY.values() if isinstance(v, str) and len(v) >= 3} <= set(DUMMY_TEXT)


def test_matcher_folds_letters_nfkd_keeps_and_finds_cjk_names_inside_words() -> None:
    assert _matcher(("Bjørnstad", NAME)).find("BJORNSTAD") == NAME
    assert _matcher(("Łukaszewska", NAME)).find("lukaszewska") == NAME
    assert _matcher(("Straße", NAME)).find("STRASSE") == NAME
    assert _matcher(("山田", NAME)).find("CT胸部 山田太郎様") == NAME
    assert _matcher(("山田", NAME)).find("CT胸部") is None


def test_numbers_written_with_dots_or_without_leading_zeros_but_not_decimals() -> None:
    matcher = _matcher(("12345678909", ID), ("00123456", ID))
    assert matcher.find("CPF 123.456.789-09") == ID
    assert matcher.find("MRN 123456") == ID
    assert matcher.find("123/456/789/09") == ID
    assert matcher.find("1234.56", coded=True) is None  # a decimal is no ID written with dots
    assert matcher.find("1123456") is None


def test_telephone_numbers_by_their_last_seven_digits_and_birth_dates_with_two_digit_years() -> (
    None
):
    phone = _matcher(("+44 20 7946 0958", "telephone"))
    assert phone.find("call 020 7946 0958") == "telephone"
    assert phone.find("20 7946 0958") == "telephone"
    assert phone.find("7946 0957") is None
    birth = Matcher([IdentifyingValue("19431107", BIRTH_DATE)])
    other = _matcher(("19431107", DATE))
    for written in ("07.11.43", "11/7/43", "7 Nov 43", "1943-Nov-07", "1943年11月7日"):
        assert birth.find(f"born {written}") == DATE, written
    assert other.find("07.11.43") is None  # a 2-digit year only for the birth date
    assert other.find("1943年11月7日") == DATE


def test_name_words_equal_to_a_whole_defined_term_only_are_no_evidence() -> None:
    original = _instance(PatientName="Head^Tarn Alder", BodyPartExamined="HEAD")
    identifiers = identifying_values(original)
    out = _instance(BodyPartExamined="HEAD", ImageComments="HEAD")
    assert residual_scan(out, identifiers) == []
    out.ScanOptions = "ALDER HEAD"  # the name inside a longer CS is still evidence
    assert [h.keyword for h in residual_scan(out, identifiers)] == ["ScanOptions"]


def test_text_in_an_icc_profile_is_read() -> None:
    identifiers = identifying_values(_instance(PatientName="Zyxwortha^Quilliam"))
    out = _instance(ICCProfile=b"\x00" * 64 + b"desc Zyxwortha\x00")
    assert [h.keyword for h in residual_scan(out, identifiers)] == ["ICCProfile"]


def test_what_a_retain_option_keeps_is_no_evidence_of_an_issuer_named_alike() -> None:
    original = _instance(
        InstitutionName="Saint Quarvington Hospital",
        IssuerOfPatientID="Quarvington MPI",
        StationName="QUARVCT01",
        DetectorID="QUARVCT01",
    )
    out = _instance(InstitutionName="Saint Quarvington Hospital", StationName="QUARVCT01")
    kept = DeidConfig(profile_options=("Retain Institution Identity", "Retain Device Identity"))
    assert residual_scan(out, identifying_values(original, kept)) == []
    hits = residual_scan(out, identifying_values(original, DeidConfig()))
    assert sorted(h.keyword for h in hits) == ["InstitutionName", "StationName"]
