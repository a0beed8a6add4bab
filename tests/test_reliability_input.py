"""Bad input over the network, sent to the node (a real process) exactly as bytes on disk.

Each bad file gets the DIMSE status of the README table, a report row saying why, a copy in
<data_dir>/quarantine/ where kept, and never stops the node or another series: every test ends
by sending a good series and seeing it forwarded. A bounded, derandomized fuzz test mutates
valid files and checks that every C-STORE is answered and every Success has its row.
"""

from __future__ import annotations

import contextlib
import json
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from dicomgen import make_instance, make_series, write_series
from faultpeers import (
    FaultySCP,
    KillableNode,
    associate,
    db_rows,
    dicom_destination,
    node_raw,
    send_raw,
    write_config,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import REPO, storescu, wait_until
from pydicom import Dataset, dcmread
from pydicom import config as pydicom_config
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.network, pytest.mark.slow]

SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xA900, 0xC000


@dataclass
class RunningNode:
    proc: KillableNode
    scp: FaultySCP
    data_dir: Path
    config: Path
    workdir: Path

    @property
    def port(self) -> int:
        return self.proc.port

    @property
    def db(self) -> Path:
        return self.data_dir / "deid-node.sqlite"

    def rows(self, sql: str, params: tuple = ()) -> list[dict]:
        return db_rows(self.db, sql, params)

    def refused(self, sop_uid: str) -> dict:
        return wait_until(
            lambda: self.rows("SELECT * FROM refused WHERE sop_uid = ?", (sop_uid,)),
            10,
            what="refused row",
        )[0]

    def settled_batch(self, series_uid: str, state: str | None = None) -> dict:
        def done():
            rows = self.rows("SELECT * FROM batches WHERE series_uid = ?", (series_uid,))
            final = [r for r in rows if r["state"] in ("forwarded", "rejected", "failed")]
            return final and (state is None or final[-1]["state"] == state) and final[-1]

        return wait_until(done, 90, what=f"series {series_uid} settled")


@contextlib.contextmanager
def running_node(workdir: Path, mode: str) -> Iterator[RunningNode]:
    workdir.mkdir(parents=True, exist_ok=True)
    with FaultySCP() as scp:
        raw = node_raw(workdir / "data", [dicom_destination(scp)], mode=mode)
        config = write_config(workdir / "node.toml", raw)
        proc = KillableNode(config, raw["node"]["port"], workdir / "node.log").start()
        try:
            yield RunningNode(proc, scp, workdir / "data", config, workdir)
        finally:
            assert proc.stop() == 0, "the node did not stop cleanly"


@pytest.fixture(scope="module")
def node(tmp_path_factory) -> Iterator[RunningNode]:
    # REDACT_ALL_TEXT: pixels are decoded, so pixel data that lies about its size is caught.
    with running_node(tmp_path_factory.mktemp("input"), "REDACT_ALL_TEXT") as running:
        yield running


def still_serving(node: RunningNode, folder: Path) -> None:
    """The node is up and forwards a good series sent after the bad input."""
    assert node.proc.alive()
    series = make_series(2, "CT")
    assert storescu(node.port, write_series(series, folder)).returncode == 0
    node.settled_batch(series[0].SeriesInstanceUID, "forwarded")


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        ds.save_as(path, enforce_file_format=True)
    return path


@contextlib.contextmanager
def lax_values() -> Iterator[None]:
    before = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings.writing_validation_mode = before


def in_quarantine(node: RunningNode, path: str | None) -> bool:
    """`path` (relative to data_dir, or absolute) is a file under <data_dir>/quarantine/."""
    if not path:
        return False
    full = node.data_dir / path  # an absolute `path` stays as it is
    return full.parent == node.data_dir / "quarantine" and full.exists()


def query_failed(node: RunningNode) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "query_reports.py"), "--config", str(node.config)]
        + ["--failed", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


# -- refused by the SCP -------------------------------------------------------------------------


def big_endian_under_little_endian_meta(path: Path) -> tuple[Path, str]:
    ds = make_instance("CT")
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = False, False
    write_dataset(body, ds)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta)  # says Explicit VR Little Endian
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body.getvalue())
    return path, ds.SOPInstanceUID


def refused_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    ds = make_instance("CT")
    data = save(ds, folder / "whole.dcm").read_bytes()
    cut = data.index(b"\x08\x00\x30\x10")  # inside the header, at StudyDescription
    (folder / "truncated_header.dcm").write_bytes(data[: cut + 3])
    cases["truncated_header"] = (folder / "truncated_header.dcm", ds.SOPInstanceUID)
    cases["big_endian"] = big_endian_under_little_endian_meta(folder / "big_endian.dcm")
    ds = make_instance("CT")
    del ds.SOPInstanceUID  # the file meta still names one, so the C-STORE can be sent
    cases["missing_sop_uid"] = (
        save(ds, folder / "no_sop.dcm"),
        ds.file_meta.MediaStorageSOPInstanceUID,
    )
    ds = make_instance("CT")
    del ds.SeriesInstanceUID
    cases["missing_series_uid"] = (save(ds, folder / "no_series.dcm"), ds.SOPInstanceUID)
    with lax_values():
        ds = make_instance("CT")
        ds.SeriesInstanceUID = "1.2.abc.4"
        cases["malformed_uid"] = (save(ds, folder / "bad_uid.dcm"), ds.SOPInstanceUID)
    ds = make_instance("CT")
    data = bytearray(save(ds, folder / "len.dcm").read_bytes())
    at = data.index(b"\x08\x00\x30\x10")  # (0008,1030) LO: its 2-byte length beyond the file
    data[at + 6 : at + 8] = struct.pack("<H", 0xFFF0)
    (folder / "bad_length.dcm").write_bytes(bytes(data))
    cases["bad_length"] = (folder / "bad_length.dcm", ds.SOPInstanceUID)
    return cases


def test_unreadable_or_incomplete_datasets_are_refused_and_quarantined(node, tmp_path):
    cases = refused_cases(tmp_path / "bad")
    statuses = dict(zip(cases, send_raw(node.port, [p for p, _ in cases.values()]), strict=True))
    assert statuses == dict.fromkeys(cases, CANNOT_UNDERSTAND)
    for name, (_path, sop_uid) in cases.items():
        row = node.refused(sop_uid)
        assert row["status"] == CANNOT_UNDERSTAND, name
        assert in_quarantine(node, row["quarantine_path"]), f"{name}: not in quarantine"
    by_sop = {r["SOPInstanceUID"]: r for r in query_failed(node)}
    for name, (_path, sop_uid) in cases.items():
        report = by_sop[sop_uid]
        assert report["series_state"] == "refused" and report["dimse_status"] == "0xC000", name
        assert report["error"], name
    assert "missing SeriesInstanceUID" in by_sop[cases["missing_series_uid"][1]]["error"]
    assert "missing SOPInstanceUID" in by_sop[cases["missing_sop_uid"][1]]["error"]
    assert "malformed UID" in by_sop[cases["malformed_uid"][1]]["error"]
    still_serving(node, tmp_path / "good")


def test_dataset_that_differs_from_the_request_is_refused_with_a900(node, tmp_path):
    ds = make_instance("CT")
    path = save(ds, tmp_path / "mismatch.dcm")
    data = bytearray(path.read_bytes())
    old = ds.SOPInstanceUID.encode()
    at = data.rindex(old)  # the dataset's SOPInstanceUID, not the file meta's
    data[at + len(old) - 1 : at + len(old)] = b"9" if old[-1:] != b"9" else b"8"
    path.write_bytes(bytes(data))
    assert send_raw(node.port, [path]) == [MISMATCH]
    row = node.refused(ds.SOPInstanceUID)
    assert row["status"] == MISMATCH and in_quarantine(node, row["quarantine_path"])
    still_serving(node, tmp_path / "good")


# -- refused at receive by their pixel attributes -------------------------------------------


def test_pixel_data_shorter_than_its_header_is_refused_with_c000_and_quarantined(node, tmp_path):
    mismatch = make_instance("CT")
    mismatch.Rows, mismatch.Columns = 512, 512  # 64 x 64 pixels behind it
    whole = make_instance("CT")
    data = save(whole, tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "truncated_pixels.dcm").write_bytes(data[:-3000])
    odd = make_instance("CT", rows=3, columns=3)  # 9 bytes of 8-bit pixels + 1 padding: fine
    odd.BitsAllocated = odd.BitsStored = 8
    odd.HighBit = 7
    odd.PixelData = bytes(range(9)) + b"\0"
    files = [
        save(mismatch, tmp_path / "mismatch.dcm"),
        tmp_path / "truncated_pixels.dcm",
        save(odd, tmp_path / "odd.dcm"),
    ]
    assert send_raw(node.port, files) == [CANNOT_UNDERSTAND, CANNOT_UNDERSTAND, SUCCESS]
    for ds in (mismatch, whole):
        row = node.refused(ds.SOPInstanceUID)
        assert row["status"] == CANNOT_UNDERSTAND and "pixel data" in row["reason"]
        assert in_quarantine(node, row["quarantine_path"])
        assert not node.rows("SELECT id FROM instances WHERE sop_uid = ?", (ds.SOPInstanceUID,))
    failed = {r["SOPInstanceUID"]: r for r in query_failed(node)}
    for ds in (mismatch, whole):
        assert failed[ds.SOPInstanceUID]["series_state"] == "refused"
        assert failed[ds.SOPInstanceUID]["dimse_status"] == "0xC000"
    assert "differs from Rows x Columns" in failed[mismatch.SOPInstanceUID]["error"]
    assert "past the end" in failed[whole.SOPInstanceUID]["error"]
    node.settled_batch(odd.SeriesInstanceUID, "forwarded")
    still_serving(node, tmp_path / "good")


def decompression_bomb(path: Path) -> tuple[Path, str]:
    """A 3 KiB JPEG (pydicom's test file) whose header declares 8192 x 8192 RGB x 64 frames:
    12 GiB once decoded."""
    ds = dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 8192
    ds.NumberOfFrames = 64
    return save(ds, path), ds.SOPInstanceUID


def test_decompression_bomb_is_refused_at_receive_next_to_an_innocent_series(node, tmp_path):
    bomb, sop_uid = decompression_bomb(tmp_path / "bomb.dcm")
    assert bomb.stat().st_size < 16 * 1024
    innocent = make_series(3, "CT")
    files = write_series(innocent, tmp_path / "innocent")
    with ThreadPoolExecutor(2) as pool:  # side by side, on two associations
        sent_bomb = pool.submit(send_raw, node.port, [bomb])
        sent_innocent = pool.submit(storescu, node.port, files)
        assert sent_bomb.result() == [OUT_OF_RESOURCES]
        assert sent_innocent.result().returncode == 0
    row = node.refused(sop_uid)
    assert row["status"] == OUT_OF_RESOURCES and "max_decoded_mb" in row["reason"]
    assert in_quarantine(node, row["quarantine_path"])
    batch = node.settled_batch(innocent[0].SeriesInstanceUID, "forwarded")
    assert batch["processing_attempts"] == 1, "the innocent series was charged an attempt"
    assert len(node.rows("SELECT id FROM instances WHERE batch_id = ?", (batch["id"],))) == 3
    # The modality retries (0xA7xx): refused again, but no second copy in the quarantine.
    assert send_raw(node.port, [bomb]) == [OUT_OF_RESOURCES]
    rows = node.rows("SELECT quarantine_path FROM refused WHERE sop_uid = ? ORDER BY id", (sop_uid,))
    assert [r["quarantine_path"] is not None for r in rows] == [True, False]


def test_enormous_and_malformed_values_are_accepted_and_de_identified(node, tmp_path):
    with lax_values():
        ds = make_instance("CT")
        ds.StudyDescription = "X" * (4 * 1024 * 1024)  # > 64 KiB: written as UN
        ds.PatientComments = "Y" * 100_000
        ds.StudyDate = "2024-13-45xx"
        ds.PatientAge = "eighty"
        path = save(ds, tmp_path / "odd.dcm")
    assert send_raw(node.port, [path]) == [SUCCESS]
    node.settled_batch(ds.SeriesInstanceUID, "forwarded")
    [row] = node.rows("SELECT * FROM instances WHERE sop_uid = ?", (ds.SOPInstanceUID,))
    assert row["state"] == "processed"
    still_serving(node, tmp_path / "good")


def test_duplicate_in_the_same_round_is_stored_and_forwarded_once(node, tmp_path):
    series = make_series(3, "CT")
    files = write_series(series, tmp_path / "in")
    before = len(node.scp.stored())
    assert storescu(node.port, files + files[:1]).returncode == 0
    assert storescu(node.port, files[:2]).returncode == 0
    batch = node.settled_batch(series[0].SeriesInstanceUID, "forwarded")
    assert len(node.rows("SELECT id FROM instances WHERE batch_id = ?", (batch["id"],))) == 3
    assert len(node.scp.stored()) - before == 3
    wait_until(
        lambda: (
            not node.rows(
                "SELECT id FROM instances WHERE batch_id = ? AND spool_path IS NOT NULL",
                (batch["id"],),
            )
        ),
        10,
        what="originals released",
    )
    referenced = {  # paths in the database are relative to data_dir
        str(node.data_dir / r["spool_path"])
        for r in node.rows("SELECT spool_path FROM instances WHERE spool_path IS NOT NULL")
    }
    orphans = {str(p) for p in (node.data_dir / "spool").rglob("*.dcm")} - referenced
    assert not orphans, "a replaced duplicate left its spool file behind"


def test_duplicate_re_sent_after_forwarding_is_not_forwarded_again(node, tmp_path):
    series = make_series(2, "CT")
    files = write_series(series, tmp_path / "in")
    before = len(node.scp.stored())
    assert storescu(node.port, files).returncode == 0
    node.settled_batch(series[0].SeriesInstanceUID, "forwarded")
    assert storescu(node.port, files).returncode == 0  # the modality sends it all again
    time.sleep(4)  # stable_seconds + processing of a round, if one is opened
    wait_until(
        lambda: all(
            r["state"] in ("forwarded", "rejected", "failed")
            for r in node.rows(
                "SELECT state FROM batches WHERE series_uid = ?", (series[0].SeriesInstanceUID,)
            )
        ),
        60,
        what="every round settled",
    )
    stored = node.scp.stored()[before:]
    assert len(set(stored)) == 2, "the archive holds each instance once (same new UIDs)"
    reports = [
        r
        for r in node.rows(
            "SELECT sop_uid FROM instances WHERE series_uid = ?", (series[0].SeriesInstanceUID,)
        )
    ]
    assert len(stored) == 2 and len(reports) == 2


# -- fuzz --------------------------------------------------------------------------------------

FUZZ_SECONDS = 45.0


def test_fuzzed_files_get_a_status_and_never_stop_the_node(tmp_path):
    template = make_instance("CT", rows=16, columns=16)
    study, series_uid = template.StudyInstanceUID, template.SeriesInstanceUID
    outcomes: list[tuple[str, int | None]] = []
    with running_node(tmp_path / "node", "REDACT_NO_TEXT") as running:
        deadline = time.monotonic() + FUZZ_SECONDS
        workdir = Path(tempfile.mkdtemp(dir=tmp_path))

        @settings(
            max_examples=150,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(
            edits=st.lists(
                st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                min_size=1,
                max_size=12,
            ),
            cut=st.one_of(st.none(), st.floats(0.05, 1.0)),
        )
        def fuzz(edits: list[tuple[float, int]], cut: float | None) -> None:
            if time.monotonic() > deadline:
                return
            ds = make_instance("CT", study_uid=study, series_uid=series_uid, rows=16, columns=16)
            path = save(ds, workdir / f"{ds.SOPInstanceUID}.dcm")
            data = bytearray(path.read_bytes())
            start = _body_start(data)
            body = len(data) - start
            for where, byte in edits:
                data[start + int(where * body)] = byte
            if cut is not None:
                data = data[: start + max(1, int(cut * body))]
            path.write_bytes(bytes(data))
            [status] = send_raw(running.port, [path], calling="FUZZER")
            outcomes.append((ds.SOPInstanceUID, status))
            assert status is not None, "a C-STORE got no answer"
            assert running.proc.alive()

        fuzz()
        assert len(outcomes) >= 30
        stored = {r["sop_uid"] for r in running.rows("SELECT sop_uid FROM instances")}
        for sop_uid, status in outcomes:
            if status == SUCCESS:
                assert sop_uid in stored, "Success answered without a committed row"
            else:
                assert running.rows("SELECT id FROM refused WHERE sop_uid = ?", (sop_uid,)), (
                    f"refused (0x{status:04X}) without a report row"
                )
        assoc = associate(running.port, calling="FUZZER")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        still_serving(running, tmp_path / "good")


def _body_start(data: bytearray) -> int:
    """Offset of the dataset after the Part 10 preamble and file meta group."""
    group_length = struct.unpack("<I", data[140:144])[0]
    return 144 + group_length
