"""End to end: DCMTK storescu -> deid-node (a real process) -> a real Orthanc, then the report.

Two series: one passes the save conditions and must arrive in Orthanc without a single planted
identifying value; the other fails them and must never arrive.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dicomgen import make_series, phi_markers, write_series
from peers import REPO, NodeProcess, echoscu, free_port, orthanc, storescu, wait_until
from pydicom import dcmread

pytestmark = [pytest.mark.network, pytest.mark.slow]

CONFIG = """
[node]
ae_title = "DEID_NODE"
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
allowed_calling_aets = ["MODALITY", "ECHOSCU"]
min_free_disk_mb = 1
[series]
stable_seconds = 2
policy = "all"
[deid]
redact_dicom_tags = true
redact_pixels_mode = "REDACT_ALL_TEXT"
[[save_conditions]]
type = "NOT_SUBSTR"
value = "PRIMARY"
dicom_tag = "ImageType"
[[save_conditions]]
type = "IN"
value = ["CT", "PT", "NM", "MR", "MG"]
dicom_tag = "Modality"
[[destinations]]
name = "research"
type = "dicom"
ae_title = "{orthanc_aet}"
host = "127.0.0.1"
port = {orthanc_port}
backoff_initial_seconds = 1
"""


def query_reports(config_path, *args: str) -> list[dict]:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "query_reports.py"),
            "--config",
            str(config_path),
            "--format",
            "json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def test_two_series_one_forwarded_one_held_back(tmp_path):
    passing = make_series(3, "CT", image_type="DERIVED\\SECONDARY\\AXIAL")
    failing = make_series(2, "CT", image_type="ORIGINAL\\PRIMARY\\AXIAL")
    files = write_series(passing, tmp_path / "in" / "a") + write_series(
        failing, tmp_path / "in" / "b"
    )

    with orthanc(tmp_path / "orthanc") as pacs:
        port = free_port()
        config_path = tmp_path / "node.toml"
        config_path.write_text(
            CONFIG.format(
                port=port,
                data_dir=tmp_path / "data",
                orthanc_aet=pacs.aet,
                orthanc_port=pacs.dicom_port,
            )
        )
        node = NodeProcess(config_path, port, tmp_path / "node.log").start()
        try:
            assert echoscu(port).returncode == 0
            refused = echoscu(port, calling="INTRUDER")
            assert refused.returncode != 0, "a calling AE outside allowed_calling_aets was accepted"

            sent = storescu(port, files, calling="MODALITY")
            assert sent.returncode == 0, sent.stderr

            def settled():
                reports = query_reports(config_path)
                states = {r["SeriesInstanceUID"]: r["series_state"] for r in reports}
                return (
                    len(reports) == 5
                    and set(states.values()) <= {"forwarded", "rejected"}
                    and reports
                )

            reports = wait_until(settled, timeout=120, what="both series processed and forwarded")
            received = pacs.instances()
        finally:
            assert node.stop() == 0, "the node did not stop cleanly on SIGTERM"

        # Only the passing series reached Orthanc, each instance once.
        assert len(received) == len(passing)
        blobs = [pacs.instance_file(i) for i in received]

    markers = phi_markers()
    for blob in blobs:
        leaked = [m for m in markers if m in blob]
        assert not leaked, f"identifying values reached the research PACS: {leaked}"
    arrived = {dcmread(__import__("io").BytesIO(b)).SeriesInstanceUID for b in blobs}
    assert len(arrived) == 1

    by_series = {}
    for report in reports:
        by_series.setdefault(report["SeriesInstanceUID"], []).append(report)
    good, bad = by_series[passing[0].SeriesInstanceUID], by_series[failing[0].SeriesInstanceUID]
    assert {r["SeriesInstanceUID_deid"] for r in good} == arrived
    for r in good:
        assert r["save_condition"] is True and r["save_condition_series_agg"] is True
        assert r["save_disabling_urls_series_agg"] == []
        assert r["url_deid"].startswith(f"dicom://{pacs.aet}@127.0.0.1:{pacs.dicom_port}/2.25.")
        assert r["url"].startswith("dicom://MODALITY/")
        assert [e["evaluated_value"] for e in r["save_conditions_evaluations"]] == [True, True]
        assert r["save_conditions_evaluations"][0]["tag_value"] == "DERIVED\\SECONDARY\\AXIAL"
    for r in bad:
        assert r["save_condition"] is False and r["save_condition_series_agg"] is False
        assert r["url_deid"] is None
        assert sorted(r["save_disabling_urls_series_agg"]) == sorted(x["url"] for x in bad)
        first = r["save_conditions_evaluations"][0]
        assert first == {
            "condition": {
                "value": "PRIMARY",
                "condition_type": "NOT_SUBSTR",
                "dicom_tag": "ImageType",
            },
            "tag_value": "ORIGINAL\\PRIMARY\\AXIAL",
            "evaluated_value": False,
        }

    only_failed = query_reports(config_path, "--failed")
    assert {r["SeriesInstanceUID"] for r in only_failed} == {failing[0].SeriesInstanceUID}
    by_study = query_reports(config_path, "--study", passing[0].StudyInstanceUID)
    assert len(by_study) == len(passing)

    log_bytes = (tmp_path / "node.log").read_bytes()
    assert b"series_processed" in log_bytes
    assert not [m for m in markers if m in log_bytes], "identifying values in the node's log"
