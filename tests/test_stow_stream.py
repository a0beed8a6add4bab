"""STOW-RS bodies streamed from the files: a large multi-frame instance reaches a real Orthanc
byte for byte while this process holds a small fraction of it, and a file that changes under
a request abandons that request (a transient ForwardError) instead of sending a malformed body.
"""

from __future__ import annotations

import gc
import hashlib
import os
import tracemalloc
from pathlib import Path

import httpx
import pytest
from dicomgen import make_series, write_series
from faultpeers import node_raw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_forward_dicomweb import PASSWORD, PASSWORD_ENV, USER, count, web_destination, web_orthanc

from deid_node.config import parse_config
from deid_node.errors import ForwardError
from deid_node.forward import Outgoing
from deid_node.forward_dicomweb import stow

pytestmark = [pytest.mark.network]

FRAMES, ROWS, COLUMNS = 40, 2048, 2048  # 160 MiB of 8-bit pixels


def write_multiframe(path: Path) -> Dataset:
    """A multi-frame grayscale secondary capture of FRAMES x ROWS x COLUMNS random bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "OT", "STREAM-TEST", "Stream^Test"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = FRAMES, ROWS, COLUMNS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = os.urandom(FRAMES * ROWS * COLUMNS)
    ds.save_as(path, enforce_file_format=True)
    header = Dataset()
    header.SOPInstanceUID, header.StudyInstanceUID = ds.SOPInstanceUID, ds.StudyInstanceUID
    header.SeriesInstanceUID = ds.SeriesInstanceUID
    return header


def small_items(tmp_path: Path, n: int, first_id: int = 0) -> list[Outgoing]:
    series = make_series(n, "CT")
    paths = write_series(series, tmp_path / f"in{first_id}")
    return [
        Outgoing(first_id + k, path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), "1.2.3")
        for k, (ds, path) in enumerate(zip(series, paths, strict=True))
    ]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while piece := file.read(2**20):
            digest.update(piece)
    return digest.hexdigest()


def stored_sha256(port: int, sop_uid: str) -> str:
    """The SHA-256 of the file Orthanc keeps for the instance, streamed over its REST API."""
    auth = (USER, PASSWORD)
    base = f"http://127.0.0.1:{port}"
    found = httpx.post(
        f"{base}/tools/find",
        json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}},
        auth=auth,
        timeout=30,
    ).json()
    assert len(found) == 1
    digest = hashlib.sha256()
    with httpx.stream("GET", f"{base}/instances/{found[0]}/file", auth=auth, timeout=60) as got:
        assert got.status_code == 200
        for piece in got.iter_bytes(2**20):
            digest.update(piece)
    return digest.hexdigest()


def test_large_instance_is_stored_byte_for_byte_with_memory_far_below_its_size(
    tmp_path, monkeypatch
):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    orthanc = web_orthanc(tmp_path / "orthanc").start()
    try:
        raw = node_raw(
            tmp_path / "data",
            [web_destination(orthanc, instances_per_request=10, timeout_seconds=120)],
        )
        dest = parse_config(raw).destinations[0]
        big_path = tmp_path / "big.dcm"
        header = write_multiframe(big_path)
        gc.collect()
        size = big_path.stat().st_size
        assert size > 150 * 2**20
        big = Outgoing(100, big_path, str(header.SOPInstanceUID), str(header.StudyInstanceUID), "1")
        # Two small instances ahead of the large one: they share a request, the large goes alone.
        items = [*small_items(tmp_path, 2), big]
        stored, refused = [], []
        tracemalloc.start()
        try:
            stow(
                dest,
                items,
                lambda item, url, status: stored.append((item.instance_id, status)),
                lambda item, status, reason: refused.append(item.instance_id),
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sorted(stored) == [(0, 0), (1, 0), (100, 0)] and refused == []
        assert peak < 32 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
        assert count(orthanc) == 3
        assert stored_sha256(orthanc.http_port, big.sop_uid) == sha256_file(big_path)
    finally:
        orthanc.stop()


class ChangingPath(type(Path())):
    """A spool path whose file changes when it is opened: after the request's Content-Length
    was counted from its size, before its bytes are read."""

    change = "truncate"

    def open(self, *args, **kwargs):
        if self.change == "truncate":
            os.truncate(self, self.stat().st_size // 2)
        elif self.change == "grow":
            with open(os.fspath(self), "ab") as file:
                file.write(b"\0" * 4096)
        else:
            os.unlink(self)
        return super().open(*args, **kwargs)


@pytest.mark.parametrize("change", ["truncate", "grow", "vanish"])
def test_file_changed_after_content_length_abandons_the_request(tmp_path, monkeypatch, change):
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    orthanc = web_orthanc(tmp_path / "orthanc").start()
    try:
        raw = node_raw(tmp_path / "data", [web_destination(orthanc, instances_per_request=10)])
        dest = parse_config(raw).destinations[0]
        items = small_items(tmp_path, 3)
        changing = ChangingPath(items[1].path)
        changing.change = change
        items[1] = Outgoing(1, changing, items[1].sop_uid, items[1].study_uid, "1.2.3")
        stored, refused = [], []
        with pytest.raises(ForwardError) as raised:
            stow(
                dest,
                items,
                lambda item, url, status: stored.append(item.instance_id),
                lambda item, status, reason: refused.append(item.instance_id),
            )
        message = str(raised.value)
        # The de-identified UID names the instance; no path, no tag value of the patient.
        assert message.startswith("research-web: STOW-RS request abandoned: ")
        assert items[1].sop_uid in message and str(tmp_path) not in message
        # Nothing of the request was taken or refused for good, and Orthanc is still well.
        assert stored == [] and refused == [] and count(orthanc) == 0
        stow(dest, [items[0], items[2]], lambda *a: stored.append(a[0].instance_id), print)
        assert sorted(stored) == [0, 2] and count(orthanc) == 2
    finally:
        orthanc.stop()
