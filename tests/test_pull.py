"""Pull a cohort (issue 16): a real Orthanc as the clinical PACS, the node in-process, jobs
submitted through the CLI into the node's database; C-FIND + C-MOVE to the node."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from dicomgen import make_series
from peers import NodeProcess, Orthanc, free_port, wait_until
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from deid_node import pull
from deid_node.cli import main as cli_main
from deid_node.config import parse_config
from deid_node.errors import ConfigError
from deid_node.node import Node
from deid_node.pull_cli import follow
from deid_node.store import Store

pytestmark = [pytest.mark.network]

NODE_AET = "DEID_NODE"
PACS_AET = "CLIN_PACS"


def test_sources_config_is_validated_key_by_key():
    good = {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104}
    config = parse_config({"sources": [good]})
    assert config.sources[0].retrieve == "move" and config.sources[0].max_concurrent == 2
    for bad, key in (
        ({**good, "retrieve": "fetch"}, "sources[0].retrieve"),
        ({**good, "port": 0}, "sources[0].port"),
        ({**good, "max_concurrent": 0}, "sources[0].max_concurrent"),
        ({**good, "pause_seconds": -1}, "sources[0].pause_seconds"),
        ({**good, "ae_title": "X" * 17}, "sources[0].ae_title"),
        ({k: v for k, v in good.items() if k != "host"}, "sources[0].host"),
        ({**good, "speed": 1}, "sources[0].speed"),
    ):
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            parse_config({"sources": [bad]})
    with pytest.raises(ConfigError, match="sources: names must be unique"):
        parse_config({"sources": [good, good]})


def make_study(accession: str, patient_id: str, series_sizes: tuple[int, ...]) -> list:
    study_uid = None
    datasets = []
    for size in series_sizes:
        series = make_series(size, "CT", study_uid=study_uid)
        study_uid = series[0].StudyInstanceUID
        datasets += series
    for ds in datasets:
        ds.AccessionNumber = accession
        ds.PatientID = patient_id
    return datasets


def upload(pacs: Orthanc, datasets: list) -> None:
    for ds in datasets:
        buffer = DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        request = urllib.request.Request(
            f"http://127.0.0.1:{pacs.http_port}/instances", data=buffer.getvalue(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200


@pytest.fixture
def setup(tmp_path):
    """Orthanc (knowing the node as a C-MOVE destination) with three studies, and a node."""
    node_port = free_port()
    pacs = Orthanc(
        tmp_path / "orthanc",
        aet=PACS_AET,
        extra_config={"DicomModalities": {"deid": [NODE_AET, "127.0.0.1", node_port]}},
    ).start()
    studies = {
        "ACCPULL0001": make_study("ACCPULL0001", "PIDPULL01", (2, 1)),
        "ACCPULL0002": make_study("ACCPULL0002", "PIDPULL02", (2,)),
        "ACCPULL0003": make_study("ACCPULL0003", "PIDPULL03", (1,)),
    }
    for datasets in studies.values():
        upload(pacs, datasets)
    nodes: list[Node] = []

    def start(in_process: bool = True, node_extra: dict | None = None, **source):
        raw = {
            "node": {
                "ae_title": NODE_AET,
                "host": "127.0.0.1",
                "port": node_port,
                "data_dir": str(tmp_path / "data"),
                "min_free_disk_mb": 1,
                "poll_seconds": 0.2,
                "network_timeout_seconds": 10,
                **(node_extra or {}),
            },
            "series": {"stable_seconds": 1},
            "deid": {"redact_pixels_mode": "REDACT_NO_TEXT"},
            "destinations": [{"name": "out", "type": "folder", "path": str(tmp_path / "out")}],
            "sources": [
                {
                    "name": "clinical",
                    "ae_title": PACS_AET,
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    **source,
                }
            ],
        }
        config_path = tmp_path / "node.toml"
        config_path.write_text(_toml(raw))
        if in_process is False:
            return raw, config_path
        node = Node(parse_config(raw))
        node.start()
        nodes.append(node)
        return node, config_path

    try:
        yield pacs, studies, start, tmp_path
    finally:
        for node in nodes:
            if node.store is not None and node._threads and not node._stop.is_set():
                node.stop()
        pacs.stop()


def _toml(raw: dict) -> str:
    lines = []
    for section in ("node", "series", "deid"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in raw[section].items()]
    for array in ("destinations", "sources"):
        for entry in raw[array]:
            lines.append(f"[[{array}]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


class Output:
    """capsys, keeping every line written to stderr (the node's and the CLI's log lines)."""

    def __init__(self, capsys) -> None:
        self.capsys = capsys
        self.err: list[str] = []

    def read(self) -> str:
        captured = self.capsys.readouterr()
        self.err.append(captured.err)
        return captured.out


def submit(config_path: Path, capsys, *args: str) -> int:
    out = capsys if isinstance(capsys, Output) else Output(capsys)
    out.read()
    code = cli_main(
        ["pull", "--config", str(config_path), "--source", "clinical", "--no-wait", *args]
    )
    assert code == 0
    return int(out.read().strip())


def job_of(node: Node, job_id: int) -> dict:
    return node.store.pull_jobs(job_id)[0]


def test_pull_by_accession_csv_retrieves_deidentifies_forwards_and_reports_not_found(setup, capsys):
    pacs, studies, start, tmp_path = setup
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("accession_number\nACCPULL0001\nACCPULL0002\nACCNOSUCH99\n")
    output = Output(capsys)
    node, config_path = start(max_concurrent=2)
    job_id = submit(config_path, output, "--csv", str(cohort))
    job = wait_until(
        lambda: (j := job_of(node, job_id))["state"] in ("done", "failed") and j,
        25,
        what="pull job over",
    )
    assert job["state"] == "done", job
    assert job["lines"] == {"total": 3, "found": 2, "not_found": 1}
    assert job["studies"] == {"found": 2, "retrieved": 2}
    assert job["instances_retrieved"] == 5
    wanted = {studies[a][0].StudyInstanceUID for a in ("ACCPULL0001", "ACCPULL0002")}
    assert {s["study_uid"] for s in job["study_list"]} == wanted
    out = tmp_path / "out"
    wait_until(lambda: len(list(out.rglob("*.dcm"))) == 5, 20, what="5 files forwarded")
    wait_until(lambda: job_of(node, job_id)["series_forwarded"] == 3, 10, what="3 series")
    for path in out.rglob("*.dcm"):
        ds = dcmread(path)
        assert "PULL" not in str(ds.get("AccessionNumber", ""))
        assert "PIDPULL" not in str(ds.PatientID)
        assert ds.StudyInstanceUID not in wanted
    # The third study of the PACS was not asked for and never came.
    assert len(list(out.rglob("*.dcm"))) == 5
    # The progress view ends at once on a finished job.
    assert follow(node.store, job_id, poll=0.1)["state"] == "done"

    output.read()
    assert cli_main(["pull-status", "--config", str(config_path), str(job_id)]) == 0
    status = output.read()
    assert "PULL" not in status and json.loads(status)[0]["state"] == "done"
    assert cli_main(["status", "--config", str(config_path)]) == 0
    assert "PULL" not in output.read()
    assert cli_main(["pull-status", "--config", str(config_path), str(job_id), "--detail"]) == 0
    detail = json.loads(output.read())[0]["lines_detail"]
    assert [(d["query"]["accession_number"], d["state"]) for d in detail] == [
        ("ACCPULL0001", "found"),
        ("ACCPULL0002", "found"),
        ("ACCNOSUCH99", "not_found"),
    ]
    assert detail[0]["study_uids"] == [studies["ACCPULL0001"][0].StudyInstanceUID]
    node.stop()
    output.read()
    logged = "".join(output.err)
    assert '"pull_study_retrieved"' in logged and '"pull_submitted"' in logged
    assert "PULL" not in logged and "NOSUCH" not in logged


def test_max_concurrent_1_moves_one_study_at_a_time(setup, capsys):
    """max_concurrent = 1: no two studies' C-MOVEs overlap. Orthanc's C-MOVE is synchronous
    (every sub-operation is stored at the node before its final response) and the node
    records each instance before answering its C-STORE, so in the order of arrival (the
    instances' row ids) each study's instances form one unbroken run."""
    pacs, studies, start, tmp_path = setup
    node, config_path = start(max_concurrent=1, pause_seconds=0)
    job_id = submit(config_path, capsys, "--accession", *studies)
    job = wait_until(
        lambda: (j := job_of(node, job_id))["state"] in ("done", "failed") and j,
        25,
        what="pull job over",
    )
    assert job["state"] == "done" and job["studies"] == {"found": 3, "retrieved": 3}, job
    arrivals = [
        r["study_uid"] for r in node.store.query("SELECT study_uid FROM instances ORDER BY id")
    ]
    assert len(arrivals) == sum(len(d) for d in studies.values())
    runs = [uid for i, uid in enumerate(arrivals) if i == 0 or arrivals[i - 1] != uid]
    assert sorted(runs) == sorted(d[0].StudyInstanceUID for d in studies.values()), arrivals
    node.stop()


def test_pull_by_patient_and_date_range(setup, capsys):
    pacs, studies, start, tmp_path = setup
    node, config_path = start(max_concurrent=1)
    job_id = submit(
        config_path,
        capsys,
        "--patient-id",
        "PIDPULL03",
        "--study-date",
        "20240101-20241231",
    )
    miss = submit(
        config_path, capsys, "--patient-id", "PIDPULL03", "--study-date", "20200101-20201231"
    )
    job = wait_until(
        lambda: (
            all(job_of(node, j)["state"] == "done" for j in (job_id, miss)) and job_of(node, job_id)
        ),
        25,
        what="jobs done",
    )
    assert [s["study_uid"] for s in job["study_list"]] == [
        studies["ACCPULL0003"][0].StudyInstanceUID
    ]
    assert job_of(node, miss)["lines"] == {"total": 1, "not_found": 1}
    node.stop()


def test_cancel_stops_a_job_between_studies(setup, capsys):
    pacs, studies, start, tmp_path = setup
    node, config_path = start(max_concurrent=1, pause_seconds=30)
    job_id = submit(config_path, capsys, "--accession", "ACCPULL0001", "ACCPULL0002")
    wait_until(
        lambda: job_of(node, job_id)["studies"].get("retrieved") == 1, 20, what="first study"
    )
    assert cli_main(["pull-cancel", "--config", str(config_path), str(job_id)]) == 0
    job = wait_until(
        lambda: (j := job_of(node, job_id))["state"] == "cancelled" and j, 40, what="cancelled"
    )
    assert job["studies"] == {"found": 2, "retrieved": 1, "cancelled": 1}
    assert cli_main(["pull-cancel", "--config", str(config_path), str(job_id)]) == 1
    node.stop()


def test_a_restarted_node_resumes_without_pulling_finished_studies_again(setup, capsys):
    pacs, studies, start, tmp_path = setup
    node, config_path = start(max_concurrent=1, pause_seconds=30)
    job_id = submit(config_path, capsys, "--accession", "ACCPULL0001", "ACCPULL0002")
    wait_until(
        lambda: job_of(node, job_id)["studies"].get("retrieved") == 1, 20, what="first study"
    )
    node.stop()
    node, _ = start(max_concurrent=1, pause_seconds=0)
    job = wait_until(
        lambda: (j := job_of(node, job_id))["state"] == "done" and j, 20, what="job done"
    )
    assert job["studies"] == {"found": 2, "retrieved": 2}
    # The study finished before the restart was moved once.
    assert [s["attempts"] for s in job["study_list"]] == [1, 1]
    node.stop()


def test_a_killed_node_resumes_the_job_after_restart(setup, capsys):
    """kill -9 of a real node process between two studies; the next one finishes the job and
    does not move the finished study again."""
    pacs, studies, start, tmp_path = setup
    raw, config_path = start(in_process=False, max_concurrent=1, pause_seconds=30)
    port = raw["node"]["port"]
    log_path = tmp_path / "node.log"
    proc = NodeProcess(config_path, port, log_path).start()
    try:
        job_id = submit(config_path, capsys, "--accession", "ACCPULL0001", "ACCPULL0002")
        store = Store(Path(raw["node"]["data_dir"]), readonly=True)
        wait_until(
            lambda: store.pull_jobs(job_id)[0]["studies"].get("retrieved") == 1,
            20,
            what="first study",
        )
        proc.proc.kill()
        proc.proc.wait(timeout=10)
        proc.log.close()
        raw["sources"][0]["pause_seconds"] = 0
        config_path.write_text(_toml(raw))
        proc = NodeProcess(config_path, port, log_path).start()
        job = wait_until(
            lambda: (j := store.pull_jobs(job_id)[0])["state"] == "done" and j, 20, what="done"
        )
        assert job["studies"] == {"found": 2, "retrieved": 2}
        assert [s["attempts"] for s in job["study_list"]] == [1, 1]
        assert job["instances_retrieved"] == 5
        store.close()
    finally:
        proc.stop()
    logged = log_path.read_text()
    assert "pull_resumed" in logged or "pull_study_retrieved" in logged
    assert "PULL" not in logged and "PIDPULL" not in logged


def test_dry_run_only_finds(setup, capsys):
    pacs, studies, start, tmp_path = setup
    node, config_path = start()
    capsys.readouterr()
    args = ["pull", "--config", str(config_path), "--source", "clinical", "--dry-run"]
    assert cli_main([*args, "--accession", "ACCPULL0001", "ACCNOSUCH99"]) == 0
    captured = capsys.readouterr()
    lines = json.loads(captured.out)
    assert [(x["line"], x["studies"], x["series"], x["instances"]) for x in lines] == [
        (1, 1, 2, 3),
        (2, 0, 0, 0),
    ]
    assert lines[0]["study_uids"] == [studies["ACCPULL0001"][0].StudyInstanceUID]
    assert "PULL" not in captured.err and "NOSUCH" not in captured.err
    assert node.store.pull_jobs() == []
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.dcm"))
    node.stop()


def test_pull_by_c_get_takes_the_same_path(setup, capsys):
    pacs, studies, start, tmp_path = setup
    node, config_path = start(retrieve="get", max_concurrent=1)
    job_id = submit(config_path, capsys, "--study-uid", studies["ACCPULL0001"][0].StudyInstanceUID)
    job = wait_until(
        lambda: (j := job_of(node, job_id))["state"] in ("done", "failed") and j, 20, what="over"
    )
    assert job["state"] == "done" and job["studies"] == {"found": 1, "retrieved": 1}, job
    assert job["instances_retrieved"] == 3
    out = tmp_path / "out"
    wait_until(lambda: len(list(out.rglob("*.dcm"))) == 3, 20, what="3 files forwarded")
    for path in out.rglob("*.dcm"):
        assert "PULL" not in str(dcmread(path).get("AccessionNumber", ""))
    # On a C-GET the node requested the association: the instances came from the PACS.
    reports = node.store.reports(study_uid=studies["ACCPULL0001"][0].StudyInstanceUID)
    assert [r["calling_ae"] for r in reports] == [PACS_AET] * 3
    assert all(r["url"].startswith(f"dicom://{PACS_AET}/") for r in reports), reports
    node.stop()


def test_a_study_that_never_arrives_is_retried_then_reported_failed(setup, capsys, monkeypatch):
    """Planted fault: the node refuses the PACS's AE title, so every C-MOVE sub-operation
    fails; the study is tried MAX_ATTEMPTS times with backoff, then failed with the reason."""
    monkeypatch.setattr(pull, "BACKOFF_INITIAL_SECONDS", 0.2)
    pacs, studies, start, tmp_path = setup
    node, config_path = start(node_extra={"allowed_calling_aets": ["SOMEONE_ELSE"]})
    job_id = submit(config_path, capsys, "--accession", "ACCPULL0002")
    job = wait_until(
        lambda: (j := job_of(node, job_id))["state"] in ("done", "failed") and j, 25, what="over"
    )
    assert job["studies"] == {"found": 1, "failed": 1}, job
    study = job["study_list"][0]
    assert study["attempts"] == pull.MAX_ATTEMPTS
    assert study["error"].startswith("C-MOVE status 0x")  # Orthanc: 0xC000
    assert job["instances_retrieved"] == 0
    node.stop()


def test_a_study_whose_retrieve_itself_crashes_is_retried_then_failed(tmp_path, monkeypatch):
    """_retrieve_one's own error path raising must not leave the study 'retrieving'."""
    monkeypatch.setattr(pull, "BACKOFF_INITIAL_SECONDS", 0.0)

    class Crashing(pull.PullWorker):
        def _retrieve_one(self, job_id, source, study, project):
            raise RuntimeError("planted")

    config = parse_config(
        {
            "node": {"data_dir": str(tmp_path / "data")},
            "sources": [
                {"name": "pacs", "ae_title": PACS_AET, "host": "127.0.0.1", "port": free_port()}
            ],
        }
    )
    store = Store(tmp_path / "data")
    job_id = store.create_pull_job("pacs", [{"study_instance_uid": "1.2.3"}])
    line = store.pending_pull_lines(job_id)[0]
    store.record_pull_line(job_id, line["id"], [("1.2.3", 1)])
    worker = Crashing(config, store, pull.threading.Event())
    worker._retrieve_studies(job_id, config.sources[0], config.all_projects[0])
    (study,) = store.query(
        "SELECT state, attempts, error FROM pull_studies WHERE job_id = ?", (job_id,)
    )
    assert (study["state"], study["attempts"], study["error"]) == (
        "failed",
        pull.MAX_ATTEMPTS,
        "RuntimeError",
    )


def test_count_of_a_malformed_is_value_is_none():
    """A PACS's NumberOfStudyRelated* that is not one integer gives None, not a crash."""
    import warnings

    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    def answer(raw: bytes) -> Dataset:
        tag = Tag("NumberOfStudyRelatedInstances")
        ds = Dataset()
        ds[tag] = RawDataElement(tag, "IS", len(raw), raw, 0, True, True)
        return ds

    assert pull._count(answer(b"12"), "NumberOfStudyRelatedInstances") == 12
    assert pull._count(Dataset(), "NumberOfStudyRelatedInstances") is None
    assert pull._count(answer(b"3\\4"), "NumberOfStudyRelatedInstances") is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid IS on reading it
        assert pull._count(answer(b"x1"), "NumberOfStudyRelatedInstances") is None


def test_a_csv_that_is_not_utf8_or_not_csv_gives_a_clear_error_without_values(tmp_path):
    from deid_node.errors import DeidNodeError
    from deid_node.pull_cli import read_csv

    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("patient_id\nMÜLLER01\n".encode("latin-1"))
    with pytest.raises(DeidNodeError, match="not UTF-8 text") as caught:
        read_csv(latin1)
    assert str(latin1) in str(caught.value) and "UnicodeDecodeError" in str(caught.value)
    assert "0xdc" not in str(caught.value).lower() and "LLER" not in str(caught.value)

    huge = tmp_path / "huge.csv"
    huge.write_text("accession_number\n" + "ACC" * 50_000 + "\n")  # past csv's field limit
    with pytest.raises(DeidNodeError, match=r"not a valid CSV file \(csv.Error\)") as caught:
        read_csv(huge)
    assert "ACCACC" not in str(caught.value)
