"""Several research projects on one node (issue 14): routing by called and calling AE title and
by header, each project with its own conditions, pixel mode, pseudonyms, secret and archive.

The end-to-end test runs `deid-node serve` as a real process, DCMTK storescu/echoscu, a real
Orthanc reached by C-STORE and a real Orthanc with its DICOMweb plugin reached by STOW-RS (both
checked through their REST API), and scripts/query_reports.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from dicomgen import PHI, make_series, phi_markers, write_series
from peers import REPO, NodeProcess, Orthanc, echoscu, free_port, require, storescu, wait_until
from pydicom import dcmread
from test_node_e2e import query_reports

from deid_node.config import parse_config
from deid_node.errors import ConfigError
from deid_node.node import Node
from deid_node.store import Receipt

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

CONFIG = """
[node]
ae_title = "DEID_NODE"
host = "127.0.0.1"
port = {port}
data_dir = "{data_dir}"
allowed_calling_aets = ["MODALITY", "US_CART", "ECHOSCU", "OTHER"]
min_free_disk_mb = 1
[series]
stable_seconds = 1
policy = "all"
[deid]
patient_id_prefix = "TOP"

[[destinations]]
name = "research-lung"
type = "dicom"
ae_title = "{lung_aet}"
host = "127.0.0.1"
port = {lung_port}
backoff_initial_seconds = 1

[[destinations]]
name = "research-web"
type = "dicomweb"
url = "http://127.0.0.1:{web_port}/dicom-web"
instances_per_request = 3
backoff_initial_seconds = 1

[[projects]]
name = "lung-ct"
called_ae_titles = ["LUNG_CT", "IMAGING"]
destinations = ["research-lung"]
match = [ {{ type = "IN", dicom_tag = "Modality", value = ["CT"] }} ]
[projects.deid]
redact_pixels_mode = "REDACT_NO_TEXT"
patient_id_prefix = "LUNG"
[[projects.save_conditions]]
type = "IN"
value = ["CT"]
dicom_tag = "Modality"

[[projects]]
name = "cohort-us"
called_ae_titles = ["US_STUDY", "IMAGING"]
calling_ae_titles = ["US_CART", "MODALITY", "ECHOSCU"]
destinations = ["research-web"]
# The fan-out rule: a study sent to IMAGING goes here too when it is the cohort's.
match = [ {{ type = "SUBSTR", dicom_tag = "StudyDescription", value = "COHORT" }} ]
[projects.deid]
redact_pixels_mode = "REDACT_SENSITIVE_TEXT"
patient_id_prefix = "USC"
[[projects.save_conditions]]
type = "IN"
value = ["US", "CT"]
dicom_tag = "Modality"
"""


def _series(count: int, modality: str, description: str, folder: Path) -> tuple[list, list[Path]]:
    datasets = make_series(count, modality)
    for ds in datasets:
        ds.StudyDescription = description
    return datasets, write_series(datasets, folder)


def _orthanc_files(orthanc: Orthanc) -> list:
    return [dcmread(io.BytesIO(orthanc.instance_file(i))) for i in orthanc.instances()]


@pytest.mark.network
@pytest.mark.slow
def test_two_projects_route_by_ae_title_and_header_to_their_own_archives(tmp_path):
    require("Orthanc")
    if not PLUGIN.is_file():
        pytest.skip("orthanc-dicomweb is not installed (make system-deps installs it)")
    lung_ds, lung_files = _series(3, "CT", "CHEST ROUTINE", tmp_path / "in" / "lung")
    us_ds, us_files = _series(2, "US", "COHORT FOLLOW-UP", tmp_path / "in" / "us")
    fan_ds, fan_files = _series(2, "CT", "COHORT BASELINE CT", tmp_path / "in" / "fan")
    mr_ds, mr_files = _series(2, "MR", "KNEE", tmp_path / "in" / "mr")

    lung_pacs = Orthanc(tmp_path / "orthanc-lung", aet="LUNG_PACS").start()
    web_pacs = Orthanc(
        tmp_path / "orthanc-web",
        aet="WEB_PACS",
        extra_config={"Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}},
    )
    try:
        web_pacs.start()
        port = free_port()
        config_path = tmp_path / "node.toml"
        config_path.write_text(
            CONFIG.format(
                port=port,
                data_dir=tmp_path / "data",
                lung_aet=lung_pacs.aet,
                lung_port=lung_pacs.dicom_port,
                web_port=web_pacs.http_port,
            )
        )
        node = NodeProcess(config_path, port, tmp_path / "node.log").start()
        try:
            # Who may associate: a project's AE titles; the calling AE where a project says.
            assert echoscu(port, called="LUNG_CT").returncode == 0
            assert echoscu(port, called="US_STUDY").returncode == 0
            assert echoscu(port, called="NOBODY").returncode != 0, "unknown called AE accepted"
            assert echoscu(port, called="DEID_NODE").returncode != 0, (
                "the node's own AE title is no project's here: it must be rejected"
            )
            assert echoscu(port, called="US_STUDY", calling="OTHER").returncode != 0, (
                "a calling AE outside the project's calling_ae_titles was accepted"
            )
            assert echoscu(port, called="LUNG_CT", calling="OTHER").returncode == 0

            for files, called, calling in (
                (lung_files, "LUNG_CT", "MODALITY"),
                (us_files, "US_STUDY", "US_CART"),
                (fan_files, "IMAGING", "MODALITY"),
                (mr_files, "IMAGING", "MODALITY"),  # no project's match: unrouted
            ):
                sent = storescu(port, files, called=called, calling=calling)
                assert sent.returncode == 0, sent.stderr

            def settled():
                reports = query_reports(config_path)
                done = [r for r in reports if r.get("series_state") in ("forwarded", "rejected")]
                return len(reports) == 11 and len(done) == 11 and reports

            reports = wait_until(settled, timeout=240, what="every project's series settled")
            wait_until(
                lambda: lung_pacs.count_instances() >= 5 and web_pacs.count_instances() >= 4,
                timeout=60,
                what="both archives received",
            )
            by_project = {
                name: query_reports(config_path, "--project", name)
                for name in ("lung-ct", "cohort-us")
            }
        finally:
            assert node.stop() == 0, "the node did not stop cleanly"
        lung_out = _orthanc_files(lung_pacs)
        web_out = _orthanc_files(web_pacs)
    finally:
        lung_pacs.stop()
        web_pacs.stop()

    # Each archive got its own project's series only, each instance once.
    assert len(lung_out) == 5 and len(web_out) == 4
    assert {ds.Modality for ds in lung_out} == {"CT"}
    assert sorted(ds.Modality for ds in web_out) == ["CT", "CT", "US", "US"]
    for ds in lung_out:
        assert ds.PatientID.startswith("LUNG") and ds.PatientName == ds.PatientID
    for ds in web_out:
        assert ds.PatientID.startswith("USC")
    originals = {ds.SOPInstanceUID for ds in lung_ds + us_ds + fan_ds + mr_ds}
    assert not originals & {ds.SOPInstanceUID for ds in lung_out + web_out}

    # The fan-out study reached both, under unrelated UIDs and pseudonyms.
    # (Descriptions are removed: the fan-out series is the lung archive's 2-instance one.)
    lung_series: dict[str, list] = {}
    for ds in lung_out:
        lung_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    fan_lung = next(group for group in lung_series.values() if len(group) == 2)
    fan_web = [ds for ds in web_out if ds.Modality == "CT"]
    assert len(fan_lung) == 2 and len(fan_web) == 2
    assert {ds.StudyInstanceUID for ds in fan_lung}.isdisjoint(
        {ds.StudyInstanceUID for ds in fan_web}
    )
    assert {ds.SOPInstanceUID for ds in fan_lung}.isdisjoint({ds.SOPInstanceUID for ds in fan_web})
    assert {ds.PatientID for ds in fan_lung}.isdisjoint({ds.PatientID for ds in fan_web})

    markers = phi_markers()
    for ds in lung_out + web_out:
        blob = io.BytesIO()
        ds.save_as(blob)
        assert not [m for m in markers if m in blob.getvalue()]

    # Reports: the project in every row; --project shows that project's rows only.
    lung_rows, us_rows = by_project["lung-ct"], by_project["cohort-us"]
    assert len(lung_rows) == 5 and {r["project"] for r in lung_rows} == {"lung-ct"}
    assert len(us_rows) == 4 and {r["project"] for r in us_rows} == {"cohort-us"}
    assert all(r["url_deid"].startswith(f"dicom://{'LUNG_PACS'}@") for r in lung_rows)
    assert all("/dicom-web/studies/" in r["url_deid"] for r in us_rows)
    unrouted = [r for r in reports if r["project"] is None]
    assert len(unrouted) == 2
    assert {r["SOPInstanceUID"] for r in unrouted} == {ds.SOPInstanceUID for ds in mr_ds}
    for r in unrouted:
        assert r["reason"] == "unrouted" and r["url_deid"] is None
    assert {r["SeriesInstanceUID"] for r in lung_rows} == {
        lung_ds[0].SeriesInstanceUID,
        fan_ds[0].SeriesInstanceUID,
    }


def _folder_config(tmp_path: Path, projects: str, port: int = 0) -> dict:
    import tomllib

    text = f"""
[node]
ae_title = "DEID_NODE"
host = "127.0.0.1"
port = {port or free_port()}
data_dir = "{tmp_path / "data"}"
min_free_disk_mb = 1
[series]
stable_seconds = 0
[[destinations]]
name = "a"
type = "folder"
path = "{tmp_path / "out-a"}"
[[destinations]]
name = "b"
type = "folder"
path = "{tmp_path / "out-b"}"
{projects}
"""
    return tomllib.loads(text)


def _receipt(ds, calling: str = "MODALITY") -> Receipt:
    return Receipt(
        sop_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        series_uid=ds.SeriesInstanceUID,
        study_uid=ds.StudyInstanceUID,
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        calling_ae=calling,
        peer="127.0.0.1",
        sha256=ds.SOPInstanceUID,
    )


def _run_until_settled(node: Node) -> None:
    def settled():
        rows = node.store.query("SELECT state FROM batches WHERE project IS NOT NULL")
        return rows and all(r["state"] in ("forwarded", "rejected", "failed") for r in rows)

    node.store.complete_stable_batches(0)
    while (batch_id := node.store.claim_batch()) is not None:
        node.process_batch(batch_id)
    for delivery in node.store.due_deliveries():
        dest = next(d for d in node.config.destinations if d.name == delivery["destination"])
        node.forward_delivery(dest, delivery)
    assert settled()


TWO_PROJECTS = """
[[projects]]
name = "alpha"
called_ae_titles = ["ALPHA"]
destinations = ["a"]
[[projects]]
name = "beta"
called_ae_titles = ["ALPHA"]
destinations = ["b"]
{beta_extra}
"""


@pytest.mark.parametrize("shared", [False, True])
def test_same_instance_in_two_projects_is_unlinkable_unless_they_share_a_secret(tmp_path, shared):
    raw = _folder_config(
        tmp_path,
        TWO_PROJECTS.format(beta_extra='secret_name = "alpha"' if shared else ""),
    )
    node = Node(parse_config(raw))
    try:
        datasets = make_series(2, "CT")
        files = write_series(datasets, tmp_path / "in")
        for ds, path in zip(datasets, files, strict=True):
            spooled = node.store.spool_adopt(node.store.tmp_write(path.read_bytes()))
            node.store.record_instance(
                _receipt(ds), spooled, path.stat().st_size, projects=["alpha", "beta"]
            )
        # One original, two names in the spool (hard links: each project's row owns one).
        paths = [r["spool_path"] for r in node.store.query("SELECT spool_path FROM instances")]
        assert len(paths) == 4 and len(set(paths)) == 4
        _run_until_settled(node)
    finally:
        node.stop()
    out_a = [dcmread(p) for p in sorted((tmp_path / "out-a").rglob("*.dcm"))]
    out_b = [dcmread(p) for p in sorted((tmp_path / "out-b").rglob("*.dcm"))]
    assert len(out_a) == 2 and len(out_b) == 2
    uids_a = {ds.SOPInstanceUID for ds in out_a} | {out_a[0].StudyInstanceUID}
    uids_b = {ds.SOPInstanceUID for ds in out_b} | {out_b[0].StudyInstanceUID}
    if shared:
        assert uids_a == uids_b and out_a[0].PatientID == out_b[0].PatientID
    else:
        assert uids_a.isdisjoint(uids_b)
        assert out_a[0].PatientID != out_b[0].PatientID
    secrets = sorted(p.name for p in (tmp_path / "data" / "secrets").iterdir())
    assert secrets == (["alpha.key"] if shared else ["alpha.key", "beta.key"])


def test_without_projects_the_default_project_keeps_todays_uids(tmp_path):
    """A config without [[projects]]: one project `default`, the installation secret, the
    node's AE title, every destination: the same de-identified UIDs as before projects."""
    from deid_node.deid.uids import Pseudonymizer, load_or_create_secret

    raw = _folder_config(tmp_path, "")
    config = parse_config(raw)
    (project,) = config.all_projects
    assert project.name == "default" and project.called_ae_titles == ("DEID_NODE",)
    assert project.destinations == ("a", "b")
    secret_before = load_or_create_secret(tmp_path / "data")  # as an older version made it
    node = Node(config)
    try:
        ds = make_series(1, "CT")[0]
        path = write_series([ds], tmp_path / "in")[0]
        spooled = node.store.spool_adopt(node.store.tmp_write(path.read_bytes()))
        node.store.record_instance(_receipt(ds), spooled, path.stat().st_size)
        _run_until_settled(node)
        report = node.store.reports()[0]
    finally:
        node.stop()
    assert report["project"] == "default"
    expected = Pseudonymizer(secret_before).uid(ds.SOPInstanceUID)
    assert report["SOPInstanceUID_deid"] == expected
    assert not (tmp_path / "data" / "secrets").exists() or not any(
        (tmp_path / "data" / "secrets").iterdir()
    )


def test_an_instance_no_match_takes_is_kept_reported_unrouted_and_never_processed(tmp_path):
    raw = _folder_config(
        tmp_path,
        """
[[projects]]
name = "ct-only"
destinations = ["a"]
match = [ { type = "IN", dicom_tag = "Modality", value = ["CT"] } ]
""",
    )
    node = Node(parse_config(raw))
    try:
        ds = make_series(1, "MR")[0]
        path = write_series([ds], tmp_path / "in")[0]
        spooled = node.store.spool_adopt(node.store.tmp_write(path.read_bytes()))
        node.store.record_instance(_receipt(ds), spooled, path.stat().st_size, projects=[])
        again = node.store.spool_adopt(node.store.tmp_write(path.read_bytes()))
        duplicate = node.store.record_instance(
            _receipt(ds), again, path.stat().st_size, projects=[]
        )
        assert duplicate.duplicate and not again.exists(), "a re-send is kept twice"
        assert node.store.complete_stable_batches(0) == []
        assert node.store.claim_batch() is None, "an unrouted instance was queued for processing"
        (report,) = node.store.reports()
        status = node.store.status()
        kept = node.store.query("SELECT spool_path FROM instances")[0]["spool_path"]
    finally:
        node.stop()
    assert report["project"] is None and report["reason"] == "unrouted"
    assert report["url_deid"] is None and report["series_state"] == "rejected"
    assert (tmp_path / "data" / kept).is_file(), "an acknowledged instance must be kept"
    assert status["projects"]["unrouted"]["instances"] == 1
    assert not (tmp_path / "out-a").exists() or not any((tmp_path / "out-a").rglob("*.dcm"))
    for value in PHI.values():
        assert value not in json.dumps(report)


@pytest.mark.parametrize(
    ("project", "key"),
    [
        ({"name": "Bad Name", "destinations": ["a"]}, "projects[0].name"),
        ({"name": "p"}, "projects[0].destinations"),
        ({"name": "p", "destinations": ["nope"]}, "projects[0].destinations"),
        ({"name": "p", "destinations": ["a"], "called_ae_titles": []}, "called_ae_titles"),
        (
            {"name": "p", "destinations": ["a"], "called_ae_titles": ["X" * 17]},
            "projects[0].called_ae_titles",
        ),
        ({"name": "p", "destinations": ["a"], "deid": {"nope": 1}}, "projects[0].deid.nope"),
        (
            {"name": "p", "destinations": ["a"], "pixels": {"max_redacted_fraction": 2}},
            "projects[0].pixels.max_redacted_fraction",
        ),
        (
            {"name": "p", "destinations": ["a"], "match": [{"type": "IN", "dicom_tag": "Nope"}]},
            "projects[0].match[0]",
        ),
        ({"name": "p", "destinations": ["a"], "secret_name": "../x"}, "projects[0].secret_name"),
        ({"name": "p", "destinations": ["a"], "colour": "red"}, "projects[0].colour"),
    ],
)
def test_project_config_errors_name_the_key(tmp_path, project, key):
    raw = _folder_config(tmp_path, "")
    raw["projects"] = [project]
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config(raw)


def test_project_sections_inherit_the_top_level_and_override_it(tmp_path):
    raw = _folder_config(tmp_path, "")
    raw["deid"] = {"patient_id_prefix": "TOP", "profile_options": ["Retain UIDs"]}
    raw["series"] = {"stable_seconds": 7, "policy": "per_instance"}
    raw["save_conditions"] = [{"type": "IN", "dicom_tag": "Modality", "value": ["CT"]}]
    raw["projects"] = [
        {"name": "p", "destinations": ["a"], "deid": {"patient_id_prefix": "P"}},
        {
            "name": "q",
            "destinations": ["b"],
            "series": {"policy": "all"},
            "save_conditions": [{"type": "IN", "dicom_tag": "Modality", "value": ["MR"]}],
        },
    ]
    p, q = parse_config(raw).all_projects
    assert p.deid.patient_id_prefix == "P" and p.deid.profile_options == ("Retain UIDs",)
    assert q.deid.patient_id_prefix == "TOP"
    assert p.series.stable_seconds == q.series.stable_seconds == 7
    assert p.series.policy.value == "per_instance" and q.series.policy.value == "all"
    assert [c.value for c in p.save_conditions] == [["CT"]]
    assert [c.value for c in q.save_conditions] == [["MR"]]


def test_status_retry_and_query_reports_take_a_project(tmp_path):
    import subprocess
    import sys

    raw_text = f"""
[node]
ae_title = "DEID_NODE"
data_dir = "{tmp_path / "data"}"
[[destinations]]
name = "a"
type = "folder"
path = "{tmp_path / "out-a"}"
[[projects]]
name = "alpha"
destinations = ["a"]
"""
    config_path = tmp_path / "node.toml"
    config_path.write_text(raw_text)
    node = Node(parse_config(__import__("tomllib").loads(raw_text)))
    node.stop()  # the database exists now

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "deid_node.cli", *args, "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )

    status = cli("status", "--project", "alpha")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["project"] == "alpha"
    unknown = cli("status", "--project", "nope")
    assert unknown.returncode != 0 and "alpha" in unknown.stderr
    retry = cli("retry", "--series", "1.2.3", "--project", "nope")
    assert retry.returncode != 0 and "nope" in retry.stderr
    assert query_reports(config_path, "--project", "alpha") == []


def test_batch_deidentify_with_a_project_derives_that_projects_uids(tmp_path):
    """`deid-node deidentify --config C --project P` uses P's sections and secret: the files
    it writes carry the UIDs and pseudonyms the node gives P (and not another project's)."""
    import subprocess
    import sys

    raw_text = f"""
[node]
ae_title = "DEID_NODE"
data_dir = "{tmp_path / "data"}"
[deid]
redact_pixels_mode = "REDACT_NO_TEXT"
[[destinations]]
name = "a"
type = "folder"
path = "{tmp_path / "out-a"}"
[[projects]]
name = "alpha"
destinations = ["a"]
[projects.deid]
patient_id_prefix = "ALPHA"
[[projects]]
name = "beta"
called_ae_titles = ["BETA"]
destinations = ["a"]
"""
    config_path = tmp_path / "node.toml"
    config_path.write_text(raw_text)
    ds = make_series(1, "CT")[0]
    source = write_series([ds], tmp_path / "in")[0]
    node = Node(parse_config(__import__("tomllib").loads(raw_text)))
    try:
        spooled = node.store.spool_adopt(node.store.tmp_write(source.read_bytes()))
        node.store.record_instance(_receipt(ds), spooled, source.stat().st_size, projects=["alpha"])
        _run_until_settled(node)
        (node_report,) = node.store.reports(project="alpha")
    finally:
        node.stop()

    def batch(project: str) -> dict:
        out = tmp_path / f"batch-{project}"
        report = tmp_path / f"report-{project}.json"
        done = subprocess.run(
            [sys.executable, "-m", "deid_node.cli", "deidentify", str(source), "--out", str(out),
             "--report", str(report), "--config", str(config_path), "--project", project,
             "--workers", "1"],
            capture_output=True, text=True, timeout=120, cwd=REPO,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        (row,) = json.loads(report.read_text())
        (written,) = out.rglob("*.dcm")
        return {"report": row, "ds": dcmread(written)}

    alpha, beta = batch("alpha"), batch("beta")
    assert alpha["report"]["SOPInstanceUID_deid"] == node_report["SOPInstanceUID_deid"]
    assert alpha["ds"].PatientID.startswith("ALPHA")
    assert beta["report"]["SOPInstanceUID_deid"] != node_report["SOPInstanceUID_deid"]
    assert not beta["ds"].PatientID.startswith("ALPHA")
