"""The operator console served for real by a node in-process: /metrics against what DCMTK sent,
/healthz, login, CSRF, roles, the pages and the API without patient values, the systemd unit."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from dicomgen import make_series, phi_markers, write_series
from peers import REPO, free_port, storescu, wait_until
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from structlog.testing import capture_logs
from textimages import found_strings, tesseract_text, text_image

from deid_node.config import parse_config
from deid_node.console.auth import (
    LOCK_SECONDS,
    Sessions,
    add_user,
    load_users,
    verify_password,
)
from deid_node.errors import ConfigError
from deid_node.node import Node

PASSWORD = "correct horse battery"


def console_config(tmp_path: Path, **node) -> dict:
    return {
        "node": {
            "host": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(tmp_path / "data"),
            "min_free_disk_mb": 1,
            "poll_seconds": 0.2,
            "retention_hours": 24,  # de-identified outputs kept: the thumbnails show them
            **node,
        },
        "series": {"stable_seconds": 1},
        "deid": {"redact_pixels_mode": "REDACT_NO_TEXT"},
        "save_conditions": [{"type": "NOT_SUBSTR", "value": "PRIMARY", "dicom_tag": "ImageType"}],
        "destinations": [{"name": "out", "type": "folder", "path": str(tmp_path / "out")}],
        "console": {
            "enabled": True,
            "host": "127.0.0.1",
            "port": free_port(),
            "users_file": str(tmp_path / "users.toml"),
        },
    }


def start_node(raw: dict) -> Node:
    config = parse_config(raw)
    add_user(config.console.users_file, "olga", "operator", PASSWORD)
    add_user(config.console.users_file, "vic", "viewer", PASSWORD)
    node = Node(config)
    node.start()
    return node


def client(node: Node) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{node.console_port}", timeout=20)


def post_login(http: httpx.Client, name: str, password: str = PASSWORD) -> httpx.Response:
    """The login form as a browser sends it: loaded first, its CSRF token sent back."""
    page = http.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    return http.post("/login", data={"username": name, "password": password, "csrf": token})


def login(http: httpx.Client, name: str) -> str:
    """Log in; returns the session's CSRF token."""
    response = post_login(http, name)
    assert response.status_code == 303, response.text
    return http.get("/api/v1/session").json()["csrf"]


def metrics(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = http.get("/metrics")
    assert response.status_code == 200
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def assert_no_phi(text: str, where: str) -> None:
    found = [m.decode() for m in phi_markers() if m.decode() in text]
    found += [d for d in ("20240312", "19431107", "2024-03-12") if d in text]
    assert not found, f"{where} shows patient values {found}"


def encapsulated_pdf(series_uid: str, study_uid: str):
    ds = make_series(1, "OT", study_uid=study_uid, series_uid=series_uid)[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    for keyword in (
        "PixelData",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SamplesPerPixel",
        "PhotometricInterpretation",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4 discharge letter\n%%EOF\n"
    return ds


def send_test_data(node: Node, tmp_path: Path, burned_in: bool = False) -> dict:
    """3 CT images (forwarded), 1 encapsulated PDF in its own series (quarantined), 1 instance
    without SeriesInstanceUID (refused 0xC000). burned_in: also an ultrasound image with
    burned-in names (BurnedInAnnotation YES) in a series of its own, held for review when OCR
    runs under a low pixels.max_redacted_fraction, and flat CT images (nothing for OCR to
    find). Waits until every series is final."""
    flat = {"pixel_array": np.full((64, 64), 700, np.uint16)} if burned_in else {}
    ct = make_series(3, "CT", **flat)
    extra, planted = [], []
    if burned_in:
        image, planted = text_image(7, 480, 640, colour=False, clinical=False, min_scale=0.7)
        extra = make_series(1, "US", study_uid=ct[0].StudyInstanceUID, pixel_array=image)
        extra[0].BurnedInAnnotation = "YES"
    pdf = encapsulated_pdf(series_uid=generate_uid(), study_uid=ct[0].StudyInstanceUID)
    bad = make_series(1, "CT")[0]
    del bad.SeriesInstanceUID
    paths = write_series([*ct, pdf, *extra], tmp_path / "in")
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path, enforce_file_format=True)
    assert storescu(node.port, paths, calling="CT_ROOM1").returncode == 0
    storescu(node.port, [bad_path], calling="CT_ROOM1")  # storescu reports the refusal
    wait_until(
        lambda: (
            len(
                node.store.query(
                    "SELECT 1 FROM batches WHERE state IN ('forwarded', 'rejected', 'failed')"
                )
            )
            == 2 + len(extra)
        ),
        120,
        what="every series final",
    )
    return {"ct": ct, "pdf": pdf, "held": extra[0] if extra else None, "planted": planted}


@pytest.fixture
def node_logs():
    """Every log line of the test (node threads included), to look for patient values."""
    with capture_logs() as logs:
        yield logs


@pytest.mark.network
def test_metrics_pages_roles_and_csrf_after_dcmtk_sends(tmp_path, node_logs):
    node = start_node(console_config(tmp_path))
    try:
        sent = send_test_data(node, tmp_path)
        with client(node) as http:
            # /metrics and /healthz need no login.
            values = metrics(http)
            assert (
                values[
                    (
                        "deid_node_instances_received_total",
                        (("calling_ae", "CT_ROOM1"), ("status", "0x0000")),
                    )
                ]
                == 4
            )
            assert (
                values[
                    (
                        "deid_node_instances_refused_total",
                        (("calling_ae", "CT_ROOM1"), ("status", "0xC000")),
                    )
                ]
                == 1
            )
            assert values[("deid_node_instances_forwarded_total", (("destination", "out"),))] == 3
            assert (
                values[
                    ("deid_node_files_quarantined_total", (("reason", "encapsulated document"),))
                ]
                == 1
            )
            assert values[("deid_node_series", (("state", "forwarded"),))] == 1
            assert (
                values[("deid_node_deliveries", (("destination", "out"), ("state", "done")))] == 1
            )
            assert values[("deid_node_destination_up", (("destination", "out"),))] == 1
            assert values[("deid_node_scp_listening", ())] == 1
            assert values[("deid_node_free_disk_bytes", ())] > 0
            assert values[("deid_node_series_processing_seconds_count", ())] == 2
            assert http.get("/healthz").status_code == 200
            assert_no_phi(http.get("/metrics").text, "/metrics")

            # Pages need a login.
            assert http.get("/series").status_code == 303
            assert http.get("/api/v1/series").status_code == 401
            # The login form has its CSRF token too: a post without it logs nobody in.
            forged = http.post("/login", data={"username": "olga", "password": PASSWORD})
            assert forged.status_code == 403 and "set-cookie" not in forged.headers
            bad = post_login(http, "olga", "wrong password")
            assert bad.status_code == 200 and "Wrong name or password" in bad.text
            assert "deid_console=" not in bad.headers.get("set-cookie", "")

            # Viewer: reads everything, acts on nothing (also with its valid CSRF token).
            response = post_login(http, "vic")
            cookie = [
                c for c in response.headers.get_list("set-cookie") if c.startswith("deid_console=")
            ][0].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
            viewer_csrf = http.get("/api/v1/session").json()["csrf"]
            ct_uid = sent["ct"][0].SeriesInstanceUID
            pdf_uid = sent["pdf"].SeriesInstanceUID
            ct_file = http.get(f"/api/v1/series/{ct_uid}").json()["files"][0]["id"]
            pdf_file = http.get(f"/api/v1/series/{pdf_uid}").json()["files"][0]["id"]
            # Every GET route of the console (a new one fails here until it is checked too).
            pages = {
                "/healthz": ["/healthz"],
                "/metrics": ["/metrics"],
                "/login": ["/login"],
                "/": ["/"],
                "/series": ["/series", "/series?state=forwarded", "/series?project=default"],
                "/series/{uid}": [f"/series/{ct_uid}", f"/series/{pdf_uid}"],
                "/series/{uid}/thumbnails/{instance_id}.png": [
                    f"/series/{ct_uid}/thumbnails/{ct_file}.png"
                ],
                "/quarantine": ["/quarantine"],
                "/quarantine/{instance_id}/image.png": [],  # no pixel review here: 404 below
                "/audit": ["/audit"],
                "/api/docs": ["/api/docs"],
                "/api/v1/openapi.json": ["/api/v1/openapi.json"],
                "/api/v1/session": ["/api/v1/session"],
                "/api/v1/overview": ["/api/v1/overview"],
                "/api/v1/series": ["/api/v1/series", "/api/v1/series?project=default"],
                "/api/v1/series/{uid}": [f"/api/v1/series/{ct_uid}", f"/api/v1/series/{pdf_uid}"],
                "/api/v1/quarantine": ["/api/v1/quarantine"],
                "/api/v1/quarantine/{instance_id}/image.png": [],
                "/api/v1/audit": ["/api/v1/audit"],
            }
            routes = {
                route.path
                for route in node._console.app.routes
                if "GET" in (getattr(route, "methods", None) or ())
            }
            assert set(pages) == routes
            for page in [url for urls in pages.values() for url in urls]:
                response = http.get(page)
                assert response.status_code == 200, page
                if not response.headers["content-type"].startswith("image/"):
                    assert_no_phi(response.text, page)
            for image in ("/quarantine/{}/image.png", "/api/v1/quarantine/{}/image.png"):
                assert http.get(image.format(pdf_file)).status_code == 404  # a document
            assert ct_uid in http.get("/series?state=forwarded").text
            files = http.get(f"/api/v1/series/{ct_uid}").json()["files"]
            assert len(files) == 3 and all(f["deid_kept"] for f in files)
            assert files[0]["evaluations"] == [
                {
                    "condition_type": "NOT_SUBSTR",
                    "dicom_tag": "ImageType",
                    "tag_value": "DERIVED\\SECONDARY\\AXIAL",
                    "evaluated_value": True,
                }
            ]
            thumb = http.get(f"/series/{ct_uid}/thumbnails/{files[0]['id']}.png")
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
            image = cv2.imdecode(np.frombuffer(thumb.content, np.uint8), cv2.IMREAD_UNCHANGED)
            assert image is not None and 0 < max(image.shape[:2]) <= 160
            pdf_file = http.get(f"/api/v1/series/{sent['pdf'].SeriesInstanceUID}").json()
            pdf_id = pdf_file["files"][0]["id"]
            # No de-identified output (quarantined), and never the kept original.
            pdf_thumb = f"/series/{sent['pdf'].SeriesInstanceUID}/thumbnails/{pdf_id}.png"
            assert http.get(pdf_thumb).status_code == 404
            assert (
                http.get(
                    f"/series/{sent['pdf'].SeriesInstanceUID}/thumbnails/{files[0]['id']}.png"
                ).status_code
                == 404
            )  # not of that series
            assert ct_uid not in http.get("/series?state=rejected").text
            today = datetime.now(UTC).date().isoformat()
            assert http.get(f"/api/v1/series?since={today}&until={today}").json()["total"] == 2
            assert http.get("/api/v1/series?until=2000-01-01").json()["total"] == 0
            assert http.get("/api/v1/series?calling_ae=CT_ROOM1").json()["total"] == 2
            assert http.get("/api/v1/series?calling_ae=OTHER").json()["total"] == 0
            assert http.get("/api/v1/series?since=yesterday").status_code == 422
            assert http.get("/api/v1/series?state=lost").status_code == 422
            quarantined = http.get("/api/v1/quarantine").json()["items"]
            assert [q["sop_uid"] for q in quarantined] == [sent["pdf"].SOPInstanceUID]
            qid = quarantined[0]["id"]
            refused = http.post(f"/quarantine/{qid}/discard", data={"csrf": viewer_csrf})
            assert refused.status_code == 403
            assert "Discard" not in http.get("/quarantine").text  # no buttons for a viewer
            assert (
                http.post(
                    f"/api/v1/quarantine/{qid}/discard", headers={"X-CSRF-Token": viewer_csrf}
                ).status_code
                == 403
            )

            # Operator: without the CSRF token (form or API) refused; with it, done and audited.
            http.cookies.clear()
            csrf = login(http, "olga")
            assert http.post(f"/quarantine/{qid}/discard", data={}).status_code == 403
            assert (
                http.post(f"/quarantine/{qid}/discard", data={"csrf": viewer_csrf}).status_code
                == 403
            )
            assert http.post(f"/api/v1/quarantine/{qid}/discard").status_code == 403
            kept = node.store.query("SELECT report FROM instances WHERE id = ?", (qid,))
            assert "quarantine" in kept[0]["report"]
            assert http.get("/api/v1/audit").json()["total"] == 0
            done = http.post(f"/quarantine/{qid}/discard", data={"csrf": csrf})
            assert done.status_code == 303
            assert http.get("/api/v1/quarantine").json()["total"] == 0
            assert not list((tmp_path / "data" / "quarantine").glob("instance-*.dcm"))
            refused = http.get("/api/v1/quarantine").json()["refused"]
            assert [(r["status"], r["calling_ae"]) for r in refused] == [("0xC000", "CT_ROOM1")]
            assert len(list((tmp_path / "data" / "quarantine").glob("*.dcm"))) == 1
            assert (
                http.post(
                    f"/api/v1/quarantine/refused/{refused[0]['id']}/discard",
                    headers={"X-CSRF-Token": csrf},
                ).status_code
                == 200
            )
            assert not list((tmp_path / "data" / "quarantine").glob("*.dcm"))
            assert http.get("/api/v1/quarantine").json()["refused_total"] == 0
            retry = http.post(f"/api/v1/series/{ct_uid}/retry", headers={"X-CSRF-Token": csrf})
            assert retry.status_code == 200
            audit = http.get("/api/v1/audit").json()["items"]
            assert [(a["user"], a["action"], a["target"]) for a in audit] == [
                ("olga", "series.retry", ct_uid),
                ("olga", "refused.discard", refused[0]["sop_uid"]),
                ("olga", "quarantine.discard", sent["pdf"].SOPInstanceUID),
            ]
            assert "quarantine.discard" in http.get("/audit").text
            openapi = http.get("/api/v1/openapi.json").json()
            assert "/api/v1/quarantine/{instance_id}/{action}" in openapi["paths"]
            docs = http.get("/api/docs")
            assert docs.status_code == 200 and "/api/v1/series/{uid}/retry" in docs.text
            # No CDN, no script: FastAPI's Swagger page is off, every page forbids scripts.
            assert http.get("/docs").status_code == 404
            assert "<script" not in docs.text and "cdn" not in docs.text.lower()
            assert "default-src 'none'" in docs.headers["content-security-policy"]
        events = {e["event"] for e in node_logs}
        assert {"store_refused", "series_processed", "console_login", "console_action"} <= events
        assert_no_phi(repr(node_logs), "log lines")
    finally:
        node.stop()


@pytest.mark.network
def test_operator_reprocesses_a_quarantined_file_in_a_new_round_and_logs_hold_no_phi(tmp_path):
    node = start_node(console_config(tmp_path))
    try:
        with capture_logs() as logs:
            sent = send_test_data(node, tmp_path)
            pdf_series = sent["pdf"].SeriesInstanceUID
            with client(node) as http:
                csrf = login(http, "olga")
                received = (
                    "deid_node_instances_received_total",
                    (("calling_ae", "CT_ROOM1"), ("status", "0x0000")),
                )
                assert metrics(http)[received] == 4
                qid = http.get("/api/v1/quarantine").json()["items"][0]["id"]
                done = http.post(
                    f"/api/v1/quarantine/{qid}/reprocess", headers={"X-CSRF-Token": csrf}
                )
                assert done.status_code == 200 and "1 instance(s)" in done.json()["detail"]

                def second_round_final():
                    rounds = http.get(f"/api/v1/series/{pdf_series}").json()["rounds"]
                    return len(rounds) == 2 and rounds[1]["state"] in ("rejected", "failed")

                # The pipeline ran again under the node's config: quarantined again, as the
                # document is still one; the new attempt is what the quarantine lists now.
                wait_until(second_round_final, 60, what="second round processed")
                items = http.get("/api/v1/quarantine").json()["items"]
                assert len(items) == 1 and items[0]["id"] != qid
                assert (
                    http.post(
                        f"/api/v1/quarantine/{qid}/reprocess", headers={"X-CSRF-Token": csrf}
                    ).status_code
                    == 404
                )  # the old attempt is history
                audit = http.get("/api/v1/audit").json()["items"]
                assert [(a["action"], a["target"]) for a in audit] == [
                    ("quarantine.reprocess", sent["pdf"].SOPInstanceUID)
                ]
                # Counted from the rows added since the last scrape: the new attempt too.
                assert metrics(http)[received] == 5
                assert_no_phi(http.get("/metrics").text, "/metrics")
        events = {e["event"] for e in logs}
        assert {"console_login", "console_action", "series_processed"} <= events
        assert_no_phi(repr(logs), "log lines")
    finally:
        node.stop()


@pytest.mark.network
@pytest.mark.ocr
def test_operator_releases_a_burned_in_image_held_for_review_and_it_is_forwarded(tmp_path):
    raw = console_config(tmp_path)
    raw["deid"]["redact_pixels_mode"] = "REDACT_ALL_TEXT"
    raw["series"]["policy"] = "per_instance"
    node = start_node(raw)
    try:
        flat = np.full((64, 64), 700, np.uint16)  # no text for OCR to find
        plain, held = make_series(2, "CT", pixel_array=flat)
        held.BurnedInAnnotation = "YES"
        pdf = encapsulated_pdf(plain.SeriesInstanceUID, plain.StudyInstanceUID)
        paths = write_series([plain, held, pdf], tmp_path / "in")
        assert storescu(node.port, paths).returncode == 0
        wait_until(
            lambda: node.store.query("SELECT state FROM batches") == [{"state": "forwarded"}],
            120,
            what="first round forwarded",
        )
        out = tmp_path / "out"
        assert len(list(out.rglob("*.dcm"))) == 1
        with client(node) as http:
            csrf = login(http, "olga")
            items = {q["sop_uid"]: q for q in http.get("/api/v1/quarantine").json()["items"]}
            assert items[held.SOPInstanceUID]["reason"].endswith("held for review")
            page = http.get("/quarantine").text
            assert page.count('class="release"') == 1  # for the image, not the document
            # The image held for review is shown as it would leave (OCR found no text: no
            # region to blank); the document has no image.
            assert page.count('class="review"') == 1
            image = http.get(items[held.SOPInstanceUID]["image"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            shown = cv2.imdecode(np.frombuffer(image.content, np.uint8), cv2.IMREAD_GRAYSCALE)
            assert shown.shape == (64, 64)
            pdf_id = items[pdf.SOPInstanceUID]["id"]
            assert items[pdf.SOPInstanceUID]["image"] is None
            assert http.get(f"/quarantine/{pdf_id}/image.png").status_code == 404
            # OCR ran on the 2 images (not on the document), timed in the worker processes.
            ocr = {k[0]: v for k, v in metrics(http).items() if k[0].startswith("deid_node_ocr")}
            assert ocr["deid_node_ocr_seconds_count"] == 2 and ocr["deid_node_ocr_seconds_sum"] > 0
            # Never released: a reason other than a pixel review (here a document).
            refused = http.post(
                f"/api/v1/quarantine/{items[pdf.SOPInstanceUID]['id']}/release",
                headers={"X-CSRF-Token": csrf},
            )
            assert refused.status_code == 409
            released = http.post(
                f"/quarantine/{items[held.SOPInstanceUID]['id']}/release", data={"csrf": csrf}
            )
            assert released.status_code == 303
            wait_until(lambda: len(list(out.rglob("*.dcm"))) == 2, 120, what="released file sent")
            report = node.store.reports(series_uid=plain.SeriesInstanceUID)[-1]
            assert report["SOPInstanceUID"] == held.SOPInstanceUID and report["url_deid"]
            assert "released_after_review" in json.dumps(report)
            audit = http.get("/api/v1/audit").json()["items"]
            assert [(a["user"], a["action"], a["target"]) for a in audit] == [
                ("olga", "quarantine.release", held.SOPInstanceUID)
            ]
            assert [q["sop_uid"] for q in http.get("/api/v1/quarantine").json()["items"]] == [
                pdf.SOPInstanceUID
            ]
            values = metrics(http)
            assert values[("deid_node_ocr_seconds_count", ())] == 3  # the released one again
            assert values[("deid_node_ocr_seconds_bucket", (("le", "+Inf"),))] == 3
    finally:
        node.stop()


@pytest.mark.network
@pytest.mark.ocr
def test_release_under_series_policy_all_forwards_the_whole_series_once(tmp_path):
    """Policy "all": the image held for review holds its series back (the plain one withheld,
    nothing sent); released, it goes again with the withheld one: the series leaves whole."""
    raw = console_config(tmp_path)
    raw["deid"]["redact_pixels_mode"] = "REDACT_ALL_TEXT"
    node = start_node(raw)  # policy "all"
    try:
        flat = np.full((64, 64), 700, np.uint16)  # no text for OCR to find
        plain, held = make_series(2, "CT", pixel_array=flat)
        held.BurnedInAnnotation = "YES"
        assert storescu(node.port, write_series([plain, held], tmp_path / "in")).returncode == 0
        wait_until(
            lambda: (
                node.store.query("SELECT state FROM batches")
                in ([{"state": "failed"}], [{"state": "rejected"}])
            ),
            120,
            what="first round held back",
        )
        out = tmp_path / "out"
        assert list(out.rglob("*.dcm")) == []
        with client(node) as http:
            csrf = login(http, "olga")
            assert http.get("/quarantine").text.count('class="release"') == 1
            (item,) = http.get("/api/v1/quarantine").json()["items"]
            assert item["sop_uid"] == held.SOPInstanceUID
            released = http.post(
                f"/api/v1/quarantine/{item['id']}/release", headers={"X-CSRF-Token": csrf}
            )
            assert released.status_code == 200
            wait_until(
                lambda: (
                    [r["state"] for r in node.store.query("SELECT state FROM batches")][-1:]
                    == ["forwarded"]
                ),
                120,
                what="released series forwarded",
            )
            assert len(list(out.rglob("*.dcm"))) == 2
            reports = node.store.reports(series_uid=plain.SeriesInstanceUID)[-2:]
            assert all(r["round"] == 2 and r["url_deid"] for r in reports)
            assert {r["SOPInstanceUID"]: r.get("attempt") for r in reports} == {
                plain.SOPInstanceUID: None,
                held.SOPInstanceUID: 2,
            }
            assert http.get("/api/v1/quarantine").json()["items"] == []
    finally:
        node.stop()


@pytest.mark.network
def test_healthz_is_503_when_the_database_takes_no_writes_or_the_scp_is_down(
    tmp_path, monkeypatch
):
    import sqlite3

    from deid_node.console import metrics

    monkeypatch.setattr(metrics, "HEALTH_TIMEOUT_SECONDS", 1.0)
    node = start_node(console_config(tmp_path))
    try:
        with client(node) as http:
            assert http.get("/healthz").json() == {
                "scp_listening": True,
                "database_writable": True,
                "ok": True,
            }
            # Root ignores file modes, so chmod proves nothing here: SQLite's own switch makes
            # the node's connection refuse every write, as a read-only database would.
            node.store.engine.db.execute("PRAGMA query_only = ON")
            response = http.get("/healthz")
            assert response.status_code == 503
            assert response.json()["database_writable"] is False
            node.store.engine.db.execute("PRAGMA query_only = OFF")
            assert http.get("/healthz").status_code == 200
            # Another writer holds the database (stuck): the probe waits, the check does not.
            blocker = sqlite3.connect(node.store.db_path, timeout=1, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                response = http.get("/healthz")
                assert response.status_code == 503
                assert response.json()["database_error"] == "TimeoutError"
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            wait_until(lambda: http.get("/healthz").status_code == 200, 60, what="healthz green")
            node._server.stop(1)  # the SCP stops listening (the node's own stop does this first)
            node._server = None
            response = http.get("/healthz")
            assert response.status_code == 503 and response.json()["scp_listening"] is False
    finally:
        node.stop()


@pytest.mark.network
def test_console_over_tls_sets_a_secure_session_cookie(tmp_path):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "console.crt", tmp_path / "console.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    raw = console_config(tmp_path)
    raw["console"].update(tls_cert=str(cert), tls_key=str(key))
    node = start_node(raw)
    try:
        base = f"127.0.0.1:{node.console_port}"
        with httpx.Client(
            base_url=f"https://{base}",
            verify=ssl.create_default_context(cafile=str(cert)),
            timeout=20,
        ) as http:
            response = post_login(http, "olga")
            assert response.status_code == 303
            cookie = [
                c for c in response.headers.get_list("set-cookie") if c.startswith("deid_console=")
            ][0].lower()
            assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
            assert http.get("/api/v1/series").status_code == 200
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on the console port
            httpx.get(f"http://{base}/healthz", timeout=5)
    finally:
        node.stop()


@pytest.mark.network
def test_failed_logins_lock_a_name_from_one_address_only_and_an_unknown_name_is_not_logged(
    tmp_path,
):
    """Someone guessing olga's password from another address (127.0.0.2) locks only
    themselves out of her name: olga, from her own address, still logs in."""
    node = start_node(console_config(tmp_path))
    try:
        attacker = httpx.Client(
            base_url=f"http://127.0.0.1:{node.console_port}",
            timeout=20,
            transport=httpx.HTTPTransport(local_address="127.0.0.2"),
        )
        with capture_logs() as logs, client(node) as http, attacker:
            typed_password = "Secret-typed-in-the-name-field"
            assert post_login(attacker, typed_password).status_code == 200
            for _ in range(5):
                assert post_login(attacker, "olga", "not her password").status_code == 200
            locked = post_login(attacker, "olga")  # the right password, too late from there
            assert locked.status_code == 429 and "15 minutes" in locked.text
            assert "deid_console=" not in locked.headers.get("set-cookie", "")
            assert post_login(attacker, "vic").status_code == 303  # other names go on
            assert post_login(http, "olga").status_code == 303  # olga from her own address
        assert typed_password not in repr(logs)
        failed = [e for e in logs if e["event"] == "console_login_failed"]
        assert [e["user"] for e in failed] == ["(unknown name)"] + ["olga"] * 5
        assert {e["client"] for e in failed} == {"127.0.0.2"}
        (lock,) = [e for e in logs if e["event"] == "console_login_locked"]
        assert lock["scope"] == "name_and_address" and lock["client"] == "127.0.0.2"
    finally:
        node.stop()


def test_login_limits_per_name_and_address_per_address_and_for_the_whole_node(tmp_path):
    """The three bounds on a clock the test moves: (name, address) 2 failures, one address 3
    (any names), the node 4 in a minute (only addresses that failed are then refused)."""
    users = tmp_path / "users.toml"
    add_user(users, "olga", "operator", PASSWORD)
    now = [1_000_000.0]
    sessions = Sessions(
        users, max_failures=2, max_address_failures=3, global_max_failures=4, clock=lambda: now[0]
    )
    for _ in range(2):
        assert sessions.login("olga", "guess", "10.0.0.66") is None
    assert sessions.refusal("olga", "10.0.0.66") == "name_and_address"
    assert sessions.refusal("vic", "10.0.0.66") is None
    assert sessions.refusal("olga", "10.0.0.7") is None  # olga's own address
    assert sessions.login("olga", "guess", "10.0.0.7") is None  # her typo
    assert sessions.login("olga", PASSWORD, "10.0.0.7") is not None  # forgives her typo only
    # One address spraying names: the address is refused, for every name.
    assert sessions.login("x1", "guess", "10.0.0.66") is None
    assert sessions.refusal("anyone", "10.0.0.66") == "address"
    # Many addresses at once: past 4 failures in a minute, an address that failed is refused,
    # a clean one (the operator's) is still checked.
    assert sessions.refusal("olga", "10.0.0.8") is None
    assert sessions.login("olga", "guess", "10.0.0.8") is None  # the 4th in the minute
    assert sessions.refusal("olga", "10.0.0.8") == "node"
    assert sessions.refusal("olga", "10.0.0.9") is None
    # IPv6 counts by /64: two addresses of one host are one.
    for address in ("2001:db8::1", "2001:db8::2"):
        now[0] += 61  # out of the node's minute
        assert sessions.login("olga", "guess", address) is None
    assert sessions.refusal("olga", "2001:db8::3") == "name_and_address"
    assert sessions.refusal("olga", "2001:db8:0:1::1") is None
    # The rate falls after a minute; the locks age out after 15.
    now[0] += 61
    assert sessions.refusal("olga", "10.0.0.8") is None
    assert sessions.refusal("olga", "10.0.0.66") == "name_and_address"
    now[0] += LOCK_SECONDS
    assert sessions.refusal("olga", "10.0.0.66") is None
    assert sessions.login("olga", PASSWORD, "10.0.0.66") is not None


@pytest.mark.network
def test_series_filtered_by_project_on_the_page_and_the_api(tmp_path):
    raw = console_config(tmp_path)
    raw["destinations"].append({"name": "neuro-out", "type": "folder", "path": str(tmp_path / "n")})
    raw["projects"] = [
        {"name": "lung-ct", "called_ae_titles": ["LUNG_CT"], "destinations": ["out"]},
        {"name": "neuro", "called_ae_titles": ["NEURO"], "destinations": ["neuro-out"]},
    ]
    node = start_node(raw)
    try:
        lung, neuro = make_series(2, "CT"), make_series(1, "MR")
        for called, series in (("LUNG_CT", lung), ("NEURO", neuro)):
            paths = write_series(series, tmp_path / called)
            assert storescu(node.port, paths, called=called).returncode == 0
        wait_until(
            lambda: (
                node.store.query("SELECT state FROM batches WHERE state = 'forwarded'")
                == [{"state": "forwarded"}] * 2
            ),
            120,
            what="both series forwarded",
        )
        with client(node) as http:
            login(http, "vic")
            both = http.get("/api/v1/series").json()
            assert both["total"] == 2 and both["projects"] == ["lung-ct", "neuro"]
            only = http.get("/api/v1/series?project=neuro").json()
            assert [(r["project"], r["series_uid"]) for r in only["items"]] == [
                ("neuro", neuro[0].SeriesInstanceUID)
            ]
            assert http.get("/api/v1/series?project=nobody").json()["total"] == 0
            page = http.get("/series?project=lung-ct").text
            assert lung[0].SeriesInstanceUID in page and neuro[0].SeriesInstanceUID not in page
            assert '<option value="lung-ct" selected>' in page
            assert '<td class="project">lung-ct</td>' in page
            detail = http.get(f"/api/v1/series/{lung[0].SeriesInstanceUID}").json()
            assert {r["project"] for r in detail["rounds"]} == {"lung-ct"}
            assert_no_phi(page, "/series?project=")
    finally:
        node.stop()


def test_console_port_taken_stops_start_up_with_a_message_naming_it(tmp_path):
    raw = console_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        raw["console"]["port"] = taken.getsockname()[1]
        node = Node(parse_config(raw))
        try:
            with pytest.raises(ConfigError, match=r"^console\.port: cannot listen"):
                node.start()
            assert not node.scp_listening()
        finally:
            node.stop()


def test_console_config_is_validated_naming_the_key(tmp_path):
    config = parse_config({"console": {"enabled": True, "port": 9090}})
    assert config.console.port == 9090 and config.console.users_file.is_absolute()
    assert parse_config({}).console.enabled is False
    for bad, key in [
        ({"port": 0}, "console.port"),
        ({"enabled": "yes"}, "console.enabled"),
        ({"listen": 1}, "console.listen"),
        (
            {"tls_cert": str(tmp_path / "none.pem"), "tls_key": str(tmp_path / "none.key")},
            "console.tls_cert",
        ),
        ({"tls_key": str(REPO / "README.md")}, "console.tls_cert"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config({"console": bad})


def test_add_user_from_the_command_line_stores_a_scrypt_hash(tmp_path):
    users = tmp_path / "var" / "users.toml"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[console]\nusers_file = "{users}"\n'
        f'[[destinations]]\nname = "o"\ntype = "folder"\npath = "{tmp_path / "o"}"\n'
    )
    command = [
        sys.executable,
        "-m",
        "deid_node.cli",
        "console",
        "add-user",
        "ana",
        "--role",
        "viewer",
        "--config",
        str(config),
        "--password-stdin",
    ]
    done = subprocess.run(
        command, input=PASSWORD + "\n", capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in users.read_text()
    assert users.stat().st_mode & 0o077 == 0
    user = load_users(users)["ana"]
    assert user.role == "viewer" and user.hash.startswith("scrypt$")
    assert verify_password(PASSWORD, user.hash) and not verify_password("other one!", user.hash)
    short = subprocess.run(
        [*command[:-1], "--password-stdin"],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert short.returncode == 1 and "at least 8" in short.stderr
    wrong = subprocess.run(
        [*command[:7], "admin", *command[8:]],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert wrong.returncode == 2  # argparse: invalid choice


@pytest.mark.network
def test_api_tokens_from_the_command_line_work_without_cookie_or_csrf(tmp_path):
    raw = console_config(tmp_path)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[console]\nusers_file = "{raw["console"]["users_file"]}"\n'
        f'[[destinations]]\nname = "o"\ntype = "folder"\npath = "{tmp_path / "o"}"\n'
    )
    tokens = {}
    for name, role in (("nightly", "viewer"), ("robot", "operator")):
        command = [
            sys.executable,
            "-m",
            "deid_node.cli",
            "console",
            "add-token",
            name,
            "--role",
            role,
            "--config",
            str(config),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)
        assert done.returncode == 0, done.stderr
        tokens[role] = done.stdout.strip()
        assert (
            tokens[role].startswith("dn_")
            and tokens[role] not in Path(raw["console"]["users_file"]).read_text()
        )
    node = start_node(raw)  # adds the users next to the tokens: both kept
    try:
        with client(node) as http:

            def bearer(role):
                return {"Authorization": f"Bearer {tokens[role]}"}

            assert http.get("/api/v1/series", headers=bearer("viewer")).status_code == 200
            assert (
                http.get("/api/v1/series", headers={"Authorization": "Bearer dn_nope"}).status_code
                == 401
            )
            assert (
                http.post("/api/v1/series/1.2.3/retry", headers=bearer("viewer")).status_code == 403
            )
            # The operator's token passes (no CSRF for a header a browser never sends by
            # itself): 404 is the series that does not exist.
            assert (
                http.post("/api/v1/series/1.2.3/retry", headers=bearer("operator")).status_code
                == 404
            )
            assert (
                http.get("/series", headers=bearer("operator")).status_code == 303
            )  # pages: login
    finally:
        node.stop()


def test_systemd_unit_verifies(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    unit = REPO / "config" / "deid-node.service"
    text = unit.read_text()
    for option in (
        "User=deid-node",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "NoNewPrivileges=yes",
    ):
        assert option in text
    # ExecStart must name an existing executable for verify: point it at this venv's.
    copy = tmp_path / "deid-node.service"
    copy.write_text(
        text.replace(
            "/opt/deid-node/.venv/bin/deid-node", str(Path(sys.executable).parent / "deid-node")
        )
    )
    done = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on a bad value (it only warns): no output at all is the pass.
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    copy.write_text(copy.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    planted = subprocess.run(
        [tool, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert "sometimes" in planted.stderr


CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def browser_login(driver, base: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.delete_all_cookies()
    driver.get(f"{base}/login")
    driver.find_element(By.ID, "username").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login").click()
    wait_until(
        lambda: any(name in e.text for e in driver.find_elements(By.ID, "who")),
        20,
        what="logged in",
    )


# Screenshots of every page, kept after the run for a person to look at (build/ is ignored by
# git); DEID_SCREENSHOTS names another folder.
SCREENSHOTS = Path(os.environ.get("DEID_SCREENSHOTS", REPO / "build" / "console-screenshots"))


@pytest.mark.network
@pytest.mark.ocr
def test_browser_operator_reviews_a_series_and_the_quarantine_viewer_cannot_act(
    tmp_path, browser, node_logs
):
    from selenium.webdriver.common.by import By

    shots = SCREENSHOTS
    shutil.rmtree(shots, ignore_errors=True)  # this test's own folder: last run's shots only
    shots.mkdir(parents=True)

    def shot(name: str) -> None:
        assert_no_phi(browser.page_source, name)
        browser.save_screenshot(str(shots / f"{name}.png"))

    def loaded(selector: str) -> bool:
        images = browser.find_elements(By.CSS_SELECTOR, selector)
        return bool(images) and all(
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
            for i in images
        )

    def post_status(path: str, with_csrf: bool) -> int:
        """A POST from the logged-in page itself (fetch), with the session's CSRF token or
        without it."""
        headers = "{'X-CSRF-Token': s.csrf}" if with_csrf else "{}"
        return browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/api/v1/session').then(r => r.json()).then(s => fetch("
            f"'{path}', {{method: 'POST', headers: {headers}}})).then(r => done(r.status));"
        )

    raw = console_config(tmp_path)
    raw["deid"]["redact_pixels_mode"] = "REDACT_ALL_TEXT"
    raw["pixels"] = {"max_redacted_fraction": 0.001}  # the burned-in names: held for review
    raw["series"]["policy"] = "per_instance"  # a release under "all" is tested above
    node = start_node(raw)
    try:
        base = f"http://127.0.0.1:{node.console_port}"
        browser.get(f"{base}/series")
        assert browser.current_url.endswith("/login")  # not logged in: sent to the login page
        shot("login")
        sent = send_test_data(node, tmp_path, burned_in=True)
        ct_uid = sent["ct"][0].SeriesInstanceUID
        held_uid = sent["held"].SeriesInstanceUID

        # A viewer sees the quarantine and the held image, has no button, and a POST with its
        # own valid CSRF token is refused.
        browser_login(browser, base, "vic")
        browser.get(f"{base}/quarantine")
        assert "2 files" in browser.page_source
        assert not browser.find_elements(By.CSS_SELECTOR, "button.release, button.discard")
        wait_until(lambda: loaded("img.review"), 20, what="review image shown to the viewer")
        shot("viewer_quarantine")
        held_id = node.store.query(
            "SELECT id FROM instances WHERE sop_uid = ?", (sent["held"].SOPInstanceUID,)
        )[0]["id"]
        assert post_status(f"/api/v1/quarantine/{held_id}/release", with_csrf=True) == 403
        browser.get(f"{base}/series/{ct_uid}")
        assert not browser.find_elements(By.ID, "retry")
        shot("viewer_series_detail")

        browser_login(browser, base, "olga")
        shot("overview")
        assert browser.find_element(By.ID, "received-today").text == "5"
        browser.get(f"{base}/series")
        rows = browser.find_elements(By.CSS_SELECTOR, "#series tr")
        states = {
            r.find_elements(By.TAG_NAME, "td")[0].text: r.find_element(By.CLASS_NAME, "state").text
            for r in rows[1:]
        }
        assert states[ct_uid] == "forwarded"
        shot("series")
        browser.find_element(By.LINK_TEXT, ct_uid).click()
        wait_until(
            lambda: any(ct_uid in e.text for e in browser.find_elements(By.TAG_NAME, "h1")),
            20,
            what="series page",
        )
        assert len(browser.find_elements(By.CSS_SELECTOR, "#files img.thumb")) == 3
        wait_until(lambda: loaded("#files img.thumb"), 20, what="thumbnails shown")
        shot("series_detail")

        # A POST without the CSRF token, from the logged-in page itself: refused.
        assert post_status(f"/api/v1/series/{ct_uid}/retry", with_csrf=False) == 403

        browser.get(f"{base}/quarantine")
        assert sent["pdf"].SOPInstanceUID in browser.page_source
        assert "2 files" in browser.page_source
        wait_until(lambda: loaded("img.review"), 20, what="review image shown")
        shot("quarantine")
        # Open the held image: the first frame as it would leave, what OCR found blanked and
        # outlined; Tesseract reads none of the burned-in names in what the browser got.
        browser.find_element(By.CSS_SELECTOR, "img.review").click()
        wait_until(lambda: browser.current_url.endswith("/image.png"), 20, what="image opened")
        wait_until(lambda: loaded("img"), 20, what="image loaded")
        browser.save_screenshot(str(shots / "quarantine_image.png"))
        cookie = browser.get_cookie("deid_console")["value"]
        png = httpx.get(browser.current_url, cookies={"deid_console": cookie}, timeout=20)
        image = cv2.imdecode(np.frombuffer(png.content, np.uint8), cv2.IMREAD_COLOR)
        assert (image == (0, 140, 255)).all(axis=2).any()  # outlined regions
        assert found_strings(tesseract_text(image[:, :, ::-1]), sent["planted"]) == []
        # Released, it is processed again without the hold and its series is forwarded.
        browser.get(f"{base}/quarantine")
        browser.find_element(By.CSS_SELECTOR, "button.release").click()
        wait_until(lambda: "1 files" in browser.page_source, 20, what="released")
        assert not browser.find_elements(By.CSS_SELECTOR, "button.release")

        def held_forwarded():
            browser.get(f"{base}/series?state=forwarded")
            return held_uid in browser.page_source

        wait_until(held_forwarded, 120, interval=1, what="released series forwarded")
        shot("series_after_release")
        browser.get(f"{base}/quarantine")
        browser.find_element(By.CSS_SELECTOR, "button.discard").click()
        wait_until(lambda: "0 files" in browser.page_source, 20, what="quarantine emptied")
        browser.get(f"{base}/audit")
        actions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#audit td.action")]
        assert actions == ["quarantine.discard", "quarantine.release"]
        assert sent["held"].SOPInstanceUID in browser.page_source
        assert sent["pdf"].SOPInstanceUID in browser.page_source and "olga" in browser.page_source
        shot("audit")
        browser.get(f"{base}/api/docs")
        assert "/api/v1/series/{uid}/retry" in browser.page_source
        shot("api_docs")
        assert sorted(p.name for p in shots.iterdir()) == [
            "api_docs.png",
            "audit.png",
            "login.png",
            "overview.png",
            "quarantine.png",
            "quarantine_image.png",
            "series.png",
            "series_after_release.png",
            "series_detail.png",
            "viewer_quarantine.png",
            "viewer_series_detail.png",
        ]
        assert_no_phi(repr(node_logs), "log lines")
        assert not [p for p in sent["planted"] if p.text in repr(node_logs)]
    finally:
        node.stop()
