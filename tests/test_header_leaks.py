"""Each header leak found on real archives, planted in a file and run through the pipeline's
per-file path (`deidentify_file`: read, de-identify, residual scan, write): nothing identifying
leaves (a byte search of the output for every identifying value of the input), and nothing
innocent is quarantined."""

from __future__ import annotations

from pathlib import Path

import pytest
from dicomgen import make_instance
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.sequence import Sequence

from deid_node.config import DeidConfig, PixelsConfig
from deid_node.deid.residual import identifying_values
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy
from deid_node.pipeline import DeidJob, DeidOutcome, PipelineSettings, deidentify_file

NAME = "Quillfeather"
MRN = "MRN20240917"
EMPLOYEE = "EMP-4711"


def _settings() -> PipelineSettings:
    return PipelineSettings(
        deid=DeidConfig(redact_pixels_mode=DeidentifyRedactTextMode.REDACT_NO_TEXT),
        pixels=PixelsConfig(),
        conditions=(),
        policy=SeriesPolicy.PER_INSTANCE,
        secret=b"h" * 32,
        durable=False,
    )


def _run(ds: Dataset, tmp_path: Path) -> tuple[DeidOutcome, bytes]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    outcome = deidentify_file(DeidJob(src, tmp_path / "out"), _settings())
    return outcome, outcome.path.read_bytes() if outcome.path else b""


def _leaks(original: Dataset, output: bytes, planted: tuple[str, ...] = ()) -> list[str]:
    """Identifying values of the input (3 characters or more) found in the output bytes, in
    any case, as UTF-8 or latin-1. The list holds values: test data only."""
    values = {str(v) for v in identifying_values(original)} | set(planted)
    haystack = output.upper()
    found = []
    for value in sorted(values):
        if len(value) < 3:
            continue
        for encoding in ("utf-8", "latin-1"):
            needle = value.upper().encode(encoding, "ignore")
            if needle and needle in haystack:
                found.append(value)
                break
    return found


def test_unlisted_binary_attributes_holding_a_name_and_mrn_are_removed(tmp_path: Path) -> None:
    ds = make_instance("CT")
    secret = f"{NAME}^Ilsabet {MRN}".encode()
    ds.add_new(0x00DC1000, "OB", secret)  # public group, not in the dictionary
    ds.add_new(0x00DC1002, "UN", secret)
    ds.add_new(0x00143080, "OB", secret)  # BadPixelImage: known, binary, not on the keep list
    ds.add_new(0x00700256, "OB", secret)  # FillPattern
    outcome, output = _run(ds, tmp_path)
    assert outcome.error is None
    out = dcmread(outcome.path)
    assert not {0x00DC1000, 0x00DC1002, 0x00143080, 0x00700256} & set(out.keys())
    assert _leaks(ds, output, (NAME, MRN)) == []


def test_encrypted_attributes_signatures_mac_and_original_attributes_are_removed(
    tmp_path: Path,
) -> None:
    ds = make_instance("MR")
    encrypted = Dataset()
    encrypted.EncryptedContentTransferSyntaxUID = "1.2.840.10008.1.2.1"
    encrypted.EncryptedContent = f"PatientName={NAME}^Osk;PatientID={MRN}".encode()
    ds.EncryptedAttributesSequence = Sequence([encrypted])
    original = Dataset()
    original.PatientName = f"{NAME}^Osk"
    modified = Dataset()
    modified.ModifiedAttributesSequence = Sequence([original])
    modified.SourceOfPreviousValues = "Quillhaven Hospital"
    ds.OriginalAttributesSequence = Sequence([modified])
    mac = Dataset()
    mac.MACIDNumber = 1
    mac.MACCalculationTransferSyntaxUID = "1.2.840.10008.1.2.1"
    mac.MACAlgorithm = "SHA256"
    ds.MACParametersSequence = Sequence([mac])
    signature = Dataset()
    signature.MACIDNumber = 1
    signature.Signature = f"signed by {NAME}".encode()
    ds.DigitalSignaturesSequence = Sequence([signature])
    outcome, output = _run(ds, tmp_path)
    assert outcome.error is None
    out = dcmread(outcome.path)
    for keyword in (
        "EncryptedAttributesSequence",
        "OriginalAttributesSequence",
        "MACParametersSequence",
        "DigitalSignaturesSequence",
    ):
        assert keyword not in out
    assert _leaks(ds, output, (NAME, MRN, "Quillhaven")) == []


def test_person_identification_codes_are_replaced_not_kept_as_codes(tmp_path: Path) -> None:
    ds = make_instance("CT")
    code = Dataset()
    code.CodeValue = EMPLOYEE
    code.CodingSchemeDesignator = "99QHOSP"
    code.CodeMeaning = f"Badge of {NAME}"
    ds.PersonIdentificationCodeSequence = Sequence([code])  # Table E.1-1: D
    operator = Dataset()
    operator.PersonIdentificationCodeSequence = Sequence([code])
    operator.InstitutionName = "Quillhaven Hospital"
    ds.OperatorIdentificationSequence = Sequence([operator])  # Table E.1-1: X/D
    ds.RequestingPhysicianIdentificationSequence = Sequence([operator])  # not in E.1-1
    author = Dataset()
    author.CodeValue, author.CodingSchemeDesignator, author.CodeMeaning = EMPLOYEE, "99Q", NAME
    ds.DocumentAuthorIdentifierCodeSequenceTrial = Sequence([author])  # not in E.1-1
    outcome, output = _run(ds, tmp_path)
    assert outcome.error is None
    out = dcmread(outcome.path)
    item = out.PersonIdentificationCodeSequence[0]  # the shape stays (Type 1 code macro) ...
    assert item.CodeValue == item.CodeMeaning == "ANONYMOUS"  # ... the person goes
    assert "OperatorIdentificationSequence" not in out
    assert "RequestingPhysicianIdentificationSequence" not in out
    assert "DocumentAuthorIdentifierCodeSequenceTrial" not in out
    assert _leaks(ds, output, (EMPLOYEE, NAME, "99QHOSP", "Quillhaven")) == []


def test_a_patient_named_like_part_of_a_defined_term_is_not_quarantined(tmp_path: Path) -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    assert list(ds.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]
    ds.PatientName = "Quillfeather^MARY"
    outcome, output = _run(ds, tmp_path)
    assert outcome.error is None
    assert _leaks(ds, output) == ["MARY"]
    assert output.upper().count(b"MARY") == output.count(b"PRIMARY")  # only inside PRIMARY


@pytest.mark.parametrize(
    ("institution", "manufacturer"), [("TOSHIBA_MEC", "TOSHIBA"), ("TOSHIBA", "TOSHIBA_MEC")]
)
def test_vendor_names_recorded_as_institution_station_or_creator_are_not_quarantined(
    tmp_path: Path, institution: str, manufacturer: str
) -> None:
    ds = make_instance("CT")
    ds.InstitutionName = institution
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "Aquilion ONE"
    ds.StationName = "AQUILION_ONE"
    ds.ContentCreatorName = "DEEPVENDOR^AI"
    ds.SoftwareVersions = "DeepVendor 2.1"
    outcome, output = _run(ds, tmp_path)
    assert outcome.error is None
    technical = {institution, manufacturer, "AQUILION_ONE", "DEEPVENDOR^AI", "DEEPVENDOR"}
    assert [v for v in _leaks(ds, output) if v not in technical] == []


def test_an_already_anonymised_input_is_not_quarantined(tmp_path: Path) -> None:
    ds = make_instance("US")
    for keyword in ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate"):
        setattr(ds, keyword, "19000101")
    ds.ContentDate = "19000101"
    ds.PatientName = "ANONYMOUS"
    ds.ReferringPhysicianName = "ANONYMOUS"
    ds.InstitutionName = "ANONYMOUS"
    ds.OperatorsName = ""
    outcome, _ = _run(ds, tmp_path)
    assert outcome.error is None
    again, _ = _run(dcmread(outcome.path), tmp_path / "again")  # its own output, once more
    assert again.error is None


def test_names_in_private_and_unknown_public_tags_are_removed(tmp_path: Path) -> None:
    ds = make_instance("MR")
    block = ds.private_block(0x0029, "QUILL VENDOR", create=True)
    block.add_new(0x01, "LO", f"{NAME}^Ilsabet")
    block.add_new(0x02, "UN", MRN.encode())
    ds.add_new(0x0040E0F0, "LO", f"{NAME} {MRN}")  # not in pydicom's dictionary
    ds.add_new(0x00189999, "SH", NAME)  # unknown element of a public group
    outcome, output = _run(ds, tmp_path)
    assert outcome.error is None
    assert _leaks(ds, output, (NAME, MRN, "QUILL VENDOR")) == []


def test_a_real_leak_left_in_a_kept_field_still_quarantines_with_keyword_and_kind(
    tmp_path: Path,
) -> None:
    ds = make_instance("CT")
    ds.PatientID = "20240917"
    ds.ScanOptions = "MRN20240917"  # CS: kept, and here a patient number
    ds.BodyPartExamined = "ZYXWORTHA QUILLIAM"  # CS: kept, and here the whole name
    outcome, _ = _run(ds, tmp_path)
    assert outcome.path is None
    assert outcome.error is not None
    assert "ScanOptions (ID)" in outcome.error
    assert "BodyPartExamined (name part)" in outcome.error
    assert "20240917" not in outcome.error and "Zyxwortha" not in outcome.error


def test_standard_codes_named_like_the_patient_are_no_evidence(tmp_path: Path) -> None:
    ds = make_instance("CT")
    ds.PatientName = "Hand^Quillon"
    code = Dataset()
    code.CodeValue = "85562004"
    code.CodingSchemeDesignator = "SCT"
    code.CodeMeaning = "Hand"
    ds.AnatomicRegionSequence = Sequence([code])
    outcome, _ = _run(ds, tmp_path)
    assert outcome.error is None
