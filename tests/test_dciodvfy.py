"""dciodvfy (dicom3tools) finds no new Error after de-identification: valid generated CT, MR, US,
SC and multi-frame SC instances, and real files of other IODs (SR, waveform, SEG, RT, enhanced CT
and MR, PET, presentation state) that pydicom ships. scripts/dciodvfy_compare.py runs the same
comparison over every file pydicom and pydicom-data ship."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dicomgen import make_instance
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from deid_node.config import PROFILE_OPTIONS, DeidConfig
from deid_node.deid.tags import deidentify_tags
from deid_node.deid.uids import Pseudonymizer

pytestmark = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not on PATH")

MULTIFRAME_GRAYSCALE_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def _valid_instance(kind: str) -> Dataset:
    """dicomgen's instance plus what its IOD requires, so that dciodvfy reports no Error."""
    modality = "SC" if kind == "MF" else kind
    ds = make_instance(modality, photometric="RGB" if kind == "US" else "MONOCHROME2")
    ds.PositionReferenceIndicator = ""
    ds.Laterality = ""
    ds.PatientOrientation = ""
    if kind in ("CT", "MR"):
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 5
        ds.PatientPosition = "HFS"
    if kind == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.AcquisitionNumber = 1
        ds.KVP = 120
    if kind == "MR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = 10
        ds.RepetitionTime = 500
        ds.EchoTrainLength = 1
    if kind in ("SC", "MF"):
        ds.ConversionType = "WSD"
        ds.Modality = "OT"
        del ds.FrameOfReferenceUID
    if kind == "MF":
        ds.SOPClassUID = MULTIFRAME_GRAYSCALE_WORD_SC
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        frames = np.random.default_rng(1).integers(0, 4000, size=(3, 64, 64), dtype=np.uint16)
        ds.NumberOfFrames = 3
        ds.FrameIncrementPointer = 0x00181063
        ds.FrameTime = 100
        ds.PixelData = frames.tobytes()
        ds.BurnedInAnnotation = "NO"
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "IDENTITY"
        source = Dataset()
        source.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        source.ReferencedSOPInstanceUID = generate_uid()
        ds.SourceImageSequence = Sequence([source])
    return ds


def _errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=30)
    lines = (run.stdout + run.stderr).splitlines()
    return {line for line in lines if line.startswith("Error")}


@pytest.mark.parametrize("kind", ["CT", "MR", "US", "SC", "MF"])
@pytest.mark.parametrize(
    "options",
    [(), PROFILE_OPTIONS[:5] + PROFILE_OPTIONS[6:]],
    ids=["basic", "all-options"],
)
def test_no_new_dciodvfy_errors(tmp_path: Path, kind: str, options: tuple[str, ...]) -> None:
    original = tmp_path / "original.dcm"
    _valid_instance(kind).save_as(original, enforce_file_format=True)
    assert _errors(original) == set(), "the generated instance must start valid"

    ds = dcmread(original)
    deidentify_tags(ds, DeidConfig(profile_options=options), Pseudonymizer(b"s" * 32))
    output = tmp_path / "deid.dcm"
    ds.save_as(output, enforce_file_format=True)
    assert _errors(output) == set()


# dciodvfy quotes values and prints UIDs: an Error is the same Error with those masked.
_VALUE = re.compile(r"\"[^\"]*\"|\b\d+(?:\.\d+)+\b|(?<=UID )\d+\b")


def _new_errors(before: Path, after: Path) -> list[str]:
    known = [_VALUE.sub("<>", line) for line in _errors_list(before)]
    new = []
    for line in _errors_list(after):
        masked = _VALUE.sub("<>", line)
        if masked in known:
            known.remove(masked)
        else:
            new.append(line)
    return new


def _errors_list(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def _pet() -> Dataset:
    """CT_small as a PET image: Series Date and Time are Type 1 in the PET Series module."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.128"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "PT"
    ds.SeriesDate, ds.SeriesTime = "20240102", "101010"
    ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["DECY", "ATTN"]
    return ds


def _presentation_state() -> Dataset:
    """A Grayscale Softcopy Presentation State referencing CT_small, with its identification."""
    ct = dcmread(get_testdata_file("CT_small.dcm"))
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "PR"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate"):
        setattr(ds, keyword, ct.get(keyword, ""))
    ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "", "1", ""
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ct.StudyInstanceUID, generate_uid()
    ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = 1, 1, "ACME"
    ds.ContentLabel, ds.ContentDescription = "ANNOTATIONS", "arrows for Dr Pemberly"
    ds.ContentCreatorName = "Pemberly^Ada"
    ds.PresentationCreationDate, ds.PresentationCreationTime = "20240102", "101010"
    series = Dataset()
    series.SeriesInstanceUID = ct.SeriesInstanceUID
    image = Dataset()
    image.ReferencedSOPClassUID = ct.SOPClassUID
    image.ReferencedSOPInstanceUID = ct.SOPInstanceUID
    series.ReferencedImageSequence = Sequence([image])
    ds.ReferencedSeriesSequence = Sequence([series])
    ds.PresentationLUTShape = "IDENTITY"
    area = Dataset()
    area.PixelOriginInterpretation = "FRAME"
    area.DisplayedAreaTopLeftHandCorner = [1, 1]
    area.DisplayedAreaBottomRightHandCorner = [128, 128]
    area.PresentationSizeMode = "SCALE TO FIT"
    area.PresentationPixelAspectRatio = [1, 1]
    ds.DisplayedAreaSelectionSequence = Sequence([area])
    ds.ImageRotation = 0
    ds.ImageHorizontalFlip = "N"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _microscopy_common(ds: Dataset, modality: str) -> None:
    """Patient, study, series, equipment, slide and specimen, with identifying values."""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = (
        "Quill^Ada",
        "MRN77881",
        "19700101",
        "F",
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = (
        "20240102",
        "101010",
        "Doc^Who",
        "S1",
        "ACC778",
    )
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.Manufacturer, ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = (
        "ACME",
        "Scope 1",
        "SN123",
        "1.0",
    )
    ds.InstitutionName = "Quill Hospital"
    ds.ContentDate, ds.ContentTime = "20240102", "101010"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.ContainerIdentifier = "SLIDE-778"
    ds.IssuerOfTheContainerIdentifierSequence = Sequence([])
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    spec = Dataset()
    spec.SpecimenIdentifier = "SPEC-778"
    spec.SpecimenUID = generate_uid()
    spec.IssuerOfTheSpecimenIdentifierSequence = Sequence([])
    spec.SpecimenPreparationSequence = Sequence([])
    spec.SpecimenShortDescription = "biopsy of Quill"
    ds.SpecimenDescriptionSequence = Sequence([spec])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _microscopy_slide() -> Dataset:
    """A small VL Whole Slide Microscopy image."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    _microscopy_common(ds, "SM")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.AcquisitionDateTime = "20240102101010"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = 1
    ds.TotalPixelMatrixColumns = ds.TotalPixelMatrixRows = 16
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.ImagedVolumeWidth = ds.ImagedVolumeHeight = 1.0
    ds.ImagedVolumeDepth = 0.01
    ds.BurnedInAnnotation, ds.SpecimenLabelInImage, ds.FocusMethod, ds.ExtendedDepthOfField = (
        "NO",
        "NO",
        "AUTO",
        "NO",
    )
    ds.LossyImageCompression = "00"
    ds.VolumetricProperties = "VOLUME"
    ds.PixelData = np.zeros((16, 16, 3), np.uint8).tobytes()
    op = Dataset()
    op.OpticalPathIdentifier = "1"
    op.OpticalPathDescription = "brightfield"
    op.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    op.IlluminationTypeCodeSequence = Sequence([_code("111744", "DCM", "Brightfield illumination")])
    ds.OpticalPathSequence = Sequence([op])
    ds.NumberOfOpticalPaths = 1
    ds.DimensionOrganizationSequence = Sequence([])
    ds.ContentQualification = "RESEARCH"
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    sh = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [0.001, 0.001]
    pm.SliceThickness = 0.01
    sh.PixelMeasuresSequence = Sequence([pm])
    ds.SharedFunctionalGroupsSequence = Sequence([sh])
    return ds


def _microscopy_annotations() -> Dataset:
    """Microscopy Bulk Simple Annotations on a slide."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.91.1"
    _microscopy_common(ds, "ANN")
    ds.ContentLabel, ds.ContentDescription, ds.ContentCreatorName = (
        "ANN",
        "marks by Dr Who",
        "Who^Doc",
    )
    ds.AnnotationCoordinateType = "2D"
    ds.PixelOriginInterpretation = "VOLUME"
    g = Dataset()
    g.AnnotationGroupNumber = 1
    g.AnnotationGroupUID = generate_uid()
    g.AnnotationGroupLabel = "nuclei"
    g.AnnotationGroupGenerationType = "MANUAL"
    g.AnnotationPropertyCategoryCodeSequence = Sequence(
        [_code("91723000", "SCT", "Anatomical structure")]
    )
    g.AnnotationPropertyTypeCodeSequence = Sequence([_code("84640000", "SCT", "Nucleus")])
    g.NumberOfAnnotations = 1
    g.AnnotationAppliesToAllOpticalPaths = "YES"
    g.GraphicType = "POINT"
    g.PointCoordinatesData = np.array([1.0, 2.0], np.float32).tobytes()
    ds.AnnotationGroupSequence = Sequence([g])
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    ref.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = Sequence([ref])
    return ds


REAL_FILES = [
    "waveform_ecg.dcm",  # 12-lead ECG waveform
    "reportsi.dcm",  # Basic Text SR
    "test-SR.dcm",  # Comprehensive SR
    "liver.dcm",  # Segmentation
    "eCT_Supplemental.dcm",  # Enhanced CT
    "emri_small.dcm",  # Enhanced MR
    "rtplan.dcm",
    "rtdose.dcm",
    "CT_small.dcm",
    "MR_small.dcm",
]


@pytest.mark.parametrize("name", [*REAL_FILES, "PET", "PR", "SM", "ANN"])
def test_no_new_dciodvfy_errors_on_other_iods(tmp_path: Path, name: str) -> None:
    if name == "PET":
        ds = _pet()
    elif name == "PR":
        ds = _presentation_state()
    elif name == "SM":
        ds = _microscopy_slide()
    elif name == "ANN":
        ds = _microscopy_annotations()
    else:
        ds = dcmread(get_testdata_file(name))
    original = tmp_path / "original.dcm"
    ds.save_as(original, enforce_file_format=True)
    ds = dcmread(original)
    deidentify_tags(ds, DeidConfig(), Pseudonymizer(b"s" * 32))
    output = tmp_path / "deid.dcm"
    ds.save_as(output, enforce_file_format=True)
    assert _new_errors(original, output) == []


@pytest.mark.parametrize("options", ["basic", "all-options"])
def test_no_new_dciodvfy_errors_on_every_table_e11_attribute(tmp_path: Path, options: str) -> None:
    """test_tags' corpus: every Table E.1-1 attribute at three depths, private, overlay, curve
    and unknown attributes, each holding a marker value."""
    from test_tags import everything

    chosen = () if options == "basic" else PROFILE_OPTIONS[:5] + PROFILE_OPTIONS[6:]
    ds, _ = everything()
    original = tmp_path / "original.dcm"
    ds.save_as(original, enforce_file_format=True)
    ds = dcmread(original)
    deidentify_tags(ds, DeidConfig(profile_options=chosen), Pseudonymizer(b"s" * 32))
    output = tmp_path / "deid.dcm"
    ds.save_as(output, enforce_file_format=True)
    assert _new_errors(original, output) == []


def _animal(tmp_path: Path) -> Path:
    """A valid CT of a cat: species, breed, registration and owner (Patient module, 1C/2C)."""
    ds = _valid_instance("CT")
    ds.PatientSpeciesDescription = "Feline"
    ds.PatientBreedDescription = "Maine Coon"
    ds.PatientBreedCodeSequence = Sequence([])
    registry = Dataset()
    registry.CodeValue = "109200"
    registry.CodingSchemeDesignator = "DCM"
    registry.CodeMeaning = "America Kennel Club"
    registration = Dataset()
    registration.BreedRegistrationNumber = "AKC-7731-QX"
    registration.BreedRegistryCodeSequence = Sequence([registry])
    ds.BreedRegistrationSequence = Sequence([registration])
    ds.PatientSexNeutered = "ALTERED"
    ds.ResponsiblePerson = "Quistgaard^Helmer"
    ds.ResponsiblePersonRole = "OWNER"
    ds.ResponsibleOrganization = "Quistgaard Cattery"
    original = tmp_path / "original.dcm"
    ds.save_as(original, enforce_file_format=True)
    return original


@pytest.mark.parametrize("options", [(), PROFILE_OPTIONS[:5] + PROFILE_OPTIONS[6:]])
def test_non_human_subject_keeps_its_iod_without_the_owner(tmp_path: Path, options) -> None:
    original = _animal(tmp_path)
    assert _errors(original) == set(), "the generated instance must start valid"
    ds = dcmread(original)
    deidentify_tags(ds, DeidConfig(profile_options=options), Pseudonymizer(b"s" * 32))
    output = tmp_path / "deid.dcm"
    ds.save_as(output, enforce_file_format=True)
    assert _errors(output) == set()
    data = output.read_bytes()
    for identifying in (b"Quistgaard", b"Helmer", b"Cattery", b"AKC-7731-QX"):
        assert identifying not in data
    assert ds.PatientSpeciesDescription == "Feline"
    assert ds.PatientBreedDescription == "Maine Coon"
    assert ds.ResponsiblePerson in ("", None) and ds.ResponsibleOrganization in ("", None)
