"""dciodvfy (dicom3tools) finds no new Error after de-identification of valid CT, MR, US, SC and
multi-frame SC instances."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dicomgen import make_instance
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

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
