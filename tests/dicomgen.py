"""Generate real DICOM files with pydicom for tests: CT/MR/US/SC instances with planted PHI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "US": UltrasoundImageStorage,
    "OT": SecondaryCaptureImageStorage,
    "SC": SecondaryCaptureImageStorage,
    "OPT": "1.2.840.10008.5.1.4.1.1.77.1.5.1",
}

# Identifying values planted in every generated header; tests grep output bytes for them.
PHI = {
    "PatientName": "Zyxwortha^Quilliam^Montague",
    "PatientID": "PIDQX778812",
    "PatientBirthDate": "19431107",
    "OtherPatientIDs": "OPIDQX55521",
    "InstitutionName": "Saint Quarvington Hospital",
    "InstitutionAddress": "17 Brumblewick Lane Quarvington",
    "ReferringPhysicianName": "Drovak^Elspeth",
    "OperatorsName": "Tenniwell^Osric",
    "AccessionNumber": "ACCQX99103",
    "StudyID": "SIDQX4410",
    "StationName": "STATQX17",
    "PatientAddress": "221 Fenwhistle Road",
    "PerformingPhysicianName": "Marbleton^Cyrus",
}
PRIVATE_PHI = "PRIVQX Patient Harlowe"
NESTED_PHI = "NESTQX Requesting Dr Pemberly"


def make_instance(
    modality: str = "CT",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    image_type: str = "DERIVED\\SECONDARY\\AXIAL",
    rows: int = 64,
    columns: int = 64,
    photometric: str = "MONOCHROME2",
    pixel_array: np.ndarray | None = None,
    phi: dict[str, str] | None = None,
) -> Dataset:
    """One complete, valid-enough instance with PHI in header, a sequence and a private block."""
    ds = Dataset()
    sop_class = SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = modality
    ds.ImageType = image_type.split("\\")
    ds.StudyDate = "20240312"
    ds.SeriesDate = "20240312"
    ds.ContentDate = "20240312"
    ds.StudyTime = "101530"
    ds.SeriesTime = "101531"
    ds.ContentTime = "101532"
    ds.Manufacturer = "ACME"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.StudyDescription = "CHEST"
    ds.SeriesDescription = "AXIAL 5mm"
    ds.PatientSex = "M"
    ds.PatientAge = "080Y"
    for keyword, value in (phi or PHI).items():
        setattr(ds, keyword, value)
    item = Dataset()
    item.RequestingPhysician = NESTED_PHI
    item.RequestedProcedureID = "RPQX3131"
    ds.RequestAttributesSequence = Sequence([item])
    block = ds.private_block(0x0099, "QX HOSPITAL PRIVATE", create=True)
    block.add_new(0x01, "LO", PRIVATE_PHI)
    if pixel_array is None:
        samples = 3 if photometric == "RGB" else 1
        shape = (rows, columns, 3) if samples == 3 else (rows, columns)
        rng = np.random.default_rng(instance_number)
        dtype = np.uint8 if samples == 3 else np.uint16
        pixel_array = rng.integers(0, 200, size=shape, dtype=dtype)
    _set_pixels(ds, pixel_array, photometric)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.SourceApplicationEntityTitle = "QXMODALITY"
    ds.file_meta = meta
    return ds


def _set_pixels(ds: Dataset, array: np.ndarray, photometric: str) -> None:
    ds.Rows, ds.Columns = int(array.shape[0]), int(array.shape[1])
    ds.PhotometricInterpretation = photometric
    if array.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
    bits = array.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits if bits == 8 else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = array.tobytes()


def make_series(
    count: int,
    modality: str = "CT",
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    **kwargs,
) -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    return [
        make_instance(
            modality, study_uid=study_uid, series_uid=series_uid, instance_number=i + 1, **kwargs
        )
        for i in range(count)
    ]


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def phi_markers() -> list[bytes]:
    """Byte strings that must not survive de-identification (names split into components too)."""
    markers = set()
    for value in [*PHI.values(), PRIVATE_PHI, NESTED_PHI, "RPQX3131", "QXMODALITY"]:
        markers.add(value.encode())
        for part in value.replace("^", " ").split():
            if (
                len(part) >= 6
                and any(c.isalpha() for c in part)
                and "QX" in part.upper()
                or part
                in (
                    "Zyxwortha",
                    "Quilliam",
                    "Montague",
                    "Drovak",
                    "Elspeth",
                    "Tenniwell",
                    "Osric",
                    "Marbleton",
                    "Brumblewick",
                    "Fenwhistle",
                    "Quarvington",
                    "Harlowe",
                    "Pemberly",
                )
            ):
                markers.add(part.encode())
    return sorted(markers)
