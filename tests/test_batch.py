"""Batch CLI and Python API: same pipeline as the node, Encord's names and report format."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from dicomgen import make_series, phi_markers, write_series
from pydicom import Dataset, dcmread

from deid_node import (
    DeidentifyRedactTextMode,
    SaveDeidentifiedDicomConditionIn,
    SaveDeidentifiedDicomConditionNotSubstr,
    deidentify_dicom_files,
)
from deid_node.errors import ConfigError, UnsupportedSchemeError
from deid_node.report import ENCORD_KEYS

CRITERIA = [
    SaveDeidentifiedDicomConditionNotSubstr(value="PRIMARY", dicom_tag="ImageType"),
    SaveDeidentifiedDicomConditionIn(value=["ct", "pt", "nm", "mr", "mg"], dicom_tag="Modality"),
]


@pytest.fixture
def corpus(tmp_path):
    """A folder with a passing series, a failing series, a mixed series, junk and a truncated file."""
    root = tmp_path / "in"
    passing = make_series(2, "CT", image_type="DERIVED\\SECONDARY")
    failing = make_series(2, "US", image_type="DERIVED\\SECONDARY")
    mixed = make_series(3, "MR", image_type="DERIVED\\SECONDARY")
    mixed[1].ImageType = ["ORIGINAL", "PRIMARY"]
    write_series(passing, root / "pass")
    write_series(failing, root / "fail")
    write_series(mixed, root / "mixed")
    (root / "notes.txt").write_text("not dicom")
    good = root / "pass" / f"{passing[0].SOPInstanceUID}.dcm"
    (root / "truncated.dcm").write_bytes(good.read_bytes()[:700])
    return root, passing, failing, mixed


def by_series(reports):
    out = {}
    for r in reports:
        out.setdefault(r["SeriesInstanceUID"], []).append(r)
    return out


def test_api_mirrors_encord(corpus, tmp_path):
    root, passing, failing, mixed = corpus
    out = tmp_path / "out"
    reports = deidentify_dicom_files(
        dicom_urls=[str(root)],
        redact_dicom_tags=True,
        redact_pixels_mode=DeidentifyRedactTextMode.REDACT_NO_TEXT,
        save_conditions=CRITERIA,
        upload_dir=str(out),
        data_dir=tmp_path / "data",
    )
    assert len(reports) == 8  # 7 DICOM files + the truncated one; the .txt is skipped
    for r in reports:
        assert list(r)[: len(ENCORD_KEYS)] == list(ENCORD_KEYS)
    groups = by_series(reports)
    for r in groups[passing[0].SeriesInstanceUID]:
        assert r["save_condition"] and r["save_condition_series_agg"]
        written = dcmread(r["url_deid"])
        assert written.SeriesInstanceUID == r["SeriesInstanceUID_deid"] != r["SeriesInstanceUID"]
        assert written.PatientIdentityRemoved == "YES"
    for r in groups[failing[0].SeriesInstanceUID]:
        assert not r["save_condition"] and r["url_deid"] is None
        assert r["save_conditions_evaluations"][1]["tag_value"] == "US"
    mixed_reports = groups[mixed[0].SeriesInstanceUID]
    assert [r["save_condition"] for r in mixed_reports].count(False) == 1
    assert all(not r["save_condition_series_agg"] and r["url_deid"] is None for r in mixed_reports)
    bad_url = next(r["url"] for r in mixed_reports if not r["save_condition"])
    assert all(r["save_disabling_urls_series_agg"] == [bad_url] for r in mixed_reports)
    truncated = [r for r in reports if r.get("error")]
    assert len(truncated) == 1 and truncated[0]["url_deid"] is None
    # Files found in a given folder are named by the folder as given and a number, never by
    # their own path (file names are often the patient's).
    names = {f"{root}#{n}" for n in range(1, 10)}  # 9 files, the .txt skipped
    assert len({r["url"] for r in reports}) == 8 and {r["url"] for r in reports} <= names
    # Files held back by policy "all" say so.
    held = [r for r in mixed_reports if r["save_condition"]]
    assert len(held) == 2 and all('policy "all"' in r["withheld"] for r in held)
    written = sorted(p for p in out.rglob("*.dcm"))
    assert len(written) == 2
    for path in written:
        data = path.read_bytes()
        assert not [m for m in phi_markers() if m in data]


def test_api_defaults_and_errors(tmp_path):
    paths = write_series(make_series(1, "CT"), tmp_path / "in")
    with pytest.raises(ConfigError, match="upload_dir"):
        deidentify_dicom_files(dicom_urls=paths)
    with pytest.raises(UnsupportedSchemeError, match="'s3'"):
        deidentify_dicom_files(dicom_urls=["s3://bucket/x.dcm"], upload_dir=tmp_path / "o")
    # file:// URLs work; no save conditions means everything passes; tags untouched on request.
    reports = deidentify_dicom_files(
        dicom_urls=[paths[0].as_uri()],
        redact_dicom_tags=False,
        upload_dir=tmp_path / "o",
        data_dir=tmp_path / "d",
    )
    assert reports[0]["save_condition"] is True and reports[0]["save_conditions_evaluations"] == []
    assert reports[0]["StudyInstanceUID_deid"] == reports[0]["StudyInstanceUID"]
    assert dcmread(reports[0]["url_deid"]).PatientName == dcmread(paths[0]).PatientName


def test_uids_consistent_between_runs_and_with_the_same_secret(tmp_path):
    paths = write_series(make_series(2, "CT"), tmp_path / "in")
    first = deidentify_dicom_files(
        dicom_urls=paths, upload_dir=tmp_path / "o1", data_dir=tmp_path / "d"
    )
    second = deidentify_dicom_files(
        dicom_urls=paths[:1], upload_dir=tmp_path / "o2", data_dir=tmp_path / "d"
    )
    other = deidentify_dicom_files(
        dicom_urls=paths[:1], upload_dir=tmp_path / "o3", data_dir=tmp_path / "d2"
    )
    assert (
        first[0]["SeriesInstanceUID_deid"]
        == first[1]["SeriesInstanceUID_deid"]
        == second[0]["SeriesInstanceUID_deid"]
    )
    assert other[0]["SeriesInstanceUID_deid"] != first[0]["SeriesInstanceUID_deid"]


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deid_node.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_cli_writes_files_and_report(corpus, tmp_path):
    root, passing, failing, mixed = corpus
    config = tmp_path / "c.toml"
    config.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n[deid]\nredact_pixels_mode = "REDACT_ALL_TEXT"\n'
        '[[save_conditions]]\ntype = "IN"\nvalue = ["CT", "MR"]\ndicom_tag = "Modality"\n'
    )
    out = tmp_path / "out"
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli(
        "deidentify",
        str(root),
        "--out",
        str(out),
        "--config",
        str(config),
        "--redact-pixels-mode",
        "REDACT_NO_TEXT",
        "--workers",
        "2",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "series passed 2, failed 2" in result.stderr
    )  # CT and MR pass; US and the truncated file fail
    assert "non-DICOM skipped 1" in result.stderr
    # The report goes to ./deid-report.json by default, readable by its owner only, and never
    # into the folder that gets shared.
    report = work / "deid-report.json"
    assert report.stat().st_mode & 0o777 == 0o600
    assert not [p for p in out.rglob("*") if p.suffix == ".json"]
    reports = json.loads(report.read_text())
    assert len(reports) == 8
    written = [r for r in reports if r["url_deid"]]
    assert len(written) == len(passing) + len(mixed)
    assert all(r["url"].startswith(str(root)) for r in reports)
    for r in written:
        assert (out / r["StudyInstanceUID_deid"] / r["SeriesInstanceUID_deid"]).is_dir()
        # --redact-pixels-mode overrides the config: pixels untouched.
        assert r["pixels"]["changed"] is False


def test_cli_bad_arguments(tmp_path):
    assert (
        run_cli(
            "deidentify",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "0",
            cwd=tmp_path,
        ).returncode
        == 2
    )
    assert (
        run_cli(
            "deidentify",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--redact-pixels-mode",
            "X",
            cwd=tmp_path,
        ).returncode
        == 2
    )
    (tmp_path / "deid-report.json").write_text("[]  earlier run")
    missing = run_cli(
        "deidentify", str(tmp_path), str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
        cwd=tmp_path,
    )  # fmt: skip
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr
    # A mistyped path stops the run before anything: the earlier report stays.
    assert (tmp_path / "deid-report.json").read_text() == "[]  earlier run"
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[deid]\nredact_pixels_mode = 'SOME'\n")
    result = run_cli(
        "deidentify",
        str(tmp_path),
        "--out",
        str(tmp_path / "o"),
        "--config",
        str(bad_config),
        cwd=tmp_path,
    )
    assert result.returncode == 1 and "deid.redact_pixels_mode" in result.stderr


@pytest.mark.parametrize("implicit", [False, True])
def test_untouched_large_pixel_data_is_streamed_byte_identical(tmp_path, implicit):
    """REDACT_NO_TEXT copies a large PixelData value from file to file instead of loading it."""
    import numpy as np
    from pydicom.uid import ImplicitVRLittleEndian

    from deid_node.pipeline import STREAM_VALUES_ABOVE, _detach_pixel_data

    frames = np.random.default_rng(7).integers(0, 4000, size=(12, 256, 256), dtype=np.uint16)
    ds = make_series(1, "CT", image_type="DERIVED\\SECONDARY", rows=256, columns=256)[0]
    ds.NumberOfFrames = 12
    ds.PixelData = frames.tobytes()
    assert len(ds.PixelData) > STREAM_VALUES_ABOVE
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "big.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    assert _detach_pixel_data(dcmread(path, defer_size=STREAM_VALUES_ABOVE)) is not None
    reports = deidentify_dicom_files(
        dicom_urls=[path], upload_dir=tmp_path / "o", data_dir=tmp_path / "d"
    )
    out = dcmread(reports[0]["url_deid"])
    assert out.PixelData == frames.tobytes()
    assert out.NumberOfFrames == 12 and out.PatientIdentityRemoved == "YES"
    assert out.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert np.array_equal(out.pixel_array, frames)
    data = Path(reports[0]["url_deid"]).read_bytes()
    assert not [m for m in phi_markers() if m in data]


def test_a_uid_that_would_escape_the_output_folder_is_quarantined(tmp_path):
    ds = make_series(1, "CT")[0]
    ds.StudyInstanceUID = str(tmp_path / "escaped")  # an absolute path posing as a UID
    path = tmp_path / "in" / "x.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    reports = deidentify_dicom_files(
        dicom_urls=[path],
        redact_dicom_tags=False,
        upload_dir=tmp_path / "o",
        data_dir=tmp_path / "d",
    )
    assert reports[0]["url_deid"] is None and "malformed" in reports[0]["error"]
    assert not (tmp_path / "escaped").exists()
    assert not list((tmp_path / "o").rglob("*.dcm"))


# -- one bad input never takes others down, never overwrites another ---------------------------


def write_deeply_nested(path: Path, depth: int) -> None:
    """A CT file whose ContentSequence nests `depth` items deep (raw bytes: pydicom's own
    writer would need a raised recursion limit and seconds)."""
    ds = make_series(1, "CT")[0]
    item = Dataset()
    item.TextValue = "PLACEHOLDER"
    ds.ContentSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    start = data.index(struct.pack("<HH", 0x0040, 0xA730) + b"SQ")
    (length,) = struct.unpack("<I", data[start + 8 : start + 12])
    header = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0" + b"\xff\xff\xff\xff"
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\0\0\0\0"
    seq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"
    nested = header + (item_start + header) * depth + (seq_end + item_end) * depth + seq_end
    path.write_bytes(data[:start] + nested + data[start + 12 + length :])


def write_malformed_vr(path: Path) -> None:
    """PatientName's explicit VR replaced by two bytes that are no VR at all."""
    make_series(1, "CT")[0].save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    at = data.index(b"\x10\x00\x10\x00PN")
    data[at + 4 : at + 6] = b"\x00\xff"
    path.write_bytes(bytes(data))


def test_a_deeply_nested_or_malformed_file_is_refused_and_the_batch_goes_on(tmp_path):
    root = tmp_path / "in"
    good = make_series(2, "CT", image_type="DERIVED\\SECONDARY")
    write_series(good, root / "good")
    write_deeply_nested(root / "deep.dcm", 2000)
    write_malformed_vr(root / "badvr.dcm")
    with pytest.raises(RecursionError):
        dcmread(root / "deep.dcm")  # the fault is real: pydicom alone cannot read it
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli(
        "deidentify", str(root), "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "d"),
        "--workers", "2", cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    reports = json.loads((work / "deid-report.json").read_text())
    assert len(reports) == 4
    deep = [r for r in reports if r.get("error") and "RecursionError" in r["error"]]
    assert len(deep) == 1 and deep[0]["url_deid"] is None
    written = [r for r in reports if r["url_deid"]]
    assert {r["SeriesInstanceUID"] for r in written} >= {good[0].SeriesInstanceUID}
    assert len([r for r in written if r["SeriesInstanceUID"] == good[0].SeriesInstanceUID]) == 2
    # The malformed file is either refused with a reason or de-identified; never a leak.
    assert len([r for r in reports if r["url_deid"] or r.get("error")]) == 4
    for path in (tmp_path / "out").rglob("*.dcm"):
        assert not [m for m in phi_markers() if m in path.read_bytes()]


def test_duplicate_sop_instance_uids_never_overwrite_each_other(tmp_path):
    first = make_series(1, "CT", image_type="DERIVED\\SECONDARY")[0]
    other = make_series(
        1, "CT", image_type="DERIVED\\SECONDARY", series_uid=first.SeriesInstanceUID
    )[0]
    other.SOPInstanceUID = first.SOPInstanceUID  # same UID, different content
    other.InstanceNumber = 99
    root = tmp_path / "in"
    root.mkdir()
    first.save_as(root / "a.dcm", enforce_file_format=True)
    other.save_as(root / "b.dcm", enforce_file_format=True)
    (root / "c.dcm").write_bytes((root / "a.dcm").read_bytes())  # the same file twice
    reports = deidentify_dicom_files(
        dicom_urls=[root], upload_dir=tmp_path / "o", data_dir=tmp_path / "d", workers=2
    )
    by_url = {r["url"]: r for r in reports}
    assert by_url[f"{root}#1"]["url_deid"] and not by_url[f"{root}#1"].get("error")
    assert by_url[f"{root}#2"]["error"].startswith("duplicate SOPInstanceUID: different content")
    assert by_url[f"{root}#3"]["error"].startswith("duplicate SOPInstanceUID: the same file")
    assert by_url[f"{root}#2"]["url_deid"] is None and by_url[f"{root}#3"]["url_deid"] is None
    # The refusals do not hold the series back, and the one output is the first input's.
    assert all(r["save_condition_series_agg"] for r in reports)
    outputs = list((tmp_path / "o").rglob("*"))
    assert [p for p in outputs if p.is_file()] == [Path(by_url[f"{root}#1"]["url_deid"])]
    assert dcmread(by_url[f"{root}#1"]["url_deid"]).InstanceNumber == 1


def test_a_file_without_preamble_or_file_meta_is_deidentified(tmp_path):
    from pydicom.filewriter import dcmwrite

    ds = make_series(1, "CT", image_type="DERIVED\\SECONDARY")[0]
    del ds.file_meta
    path = tmp_path / "raw_dump"
    dcmwrite(path, ds, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    assert path.read_bytes()[128:132] != b"DICM"
    (tmp_path / "junk.bin").write_bytes(b"\0" * 300)  # parses as nothing: skipped
    reports = deidentify_dicom_files(
        dicom_urls=[path, tmp_path / "junk.bin"], upload_dir=tmp_path / "o", data_dir=tmp_path / "d"
    )
    assert len(reports) == 1 and reports[0]["url"] == str(path)
    out = dcmread(reports[0]["url_deid"])  # a Part 10 file now
    assert out.PatientIdentityRemoved == "YES" and out.file_meta.TransferSyntaxUID
    assert not [m for m in phi_markers() if m in Path(reports[0]["url_deid"]).read_bytes()]


def make_encapsulated_pdf(series: Dataset) -> Dataset:
    ds = make_series(
        1, "OT", study_uid=series.StudyInstanceUID, series_uid=series.SeriesInstanceUID
    )[0]
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
    ds.EncapsulatedDocument = b"%PDF-1.4 Zyxwortha Quilliam discharge letter\n%%EOF\n"
    return ds


@pytest.mark.parametrize("setting", ["quarantine", "remove"])
def test_encapsulated_documents_are_quarantined_or_removed(tmp_path, setting):
    from deid_node.config import Config, DeidConfig

    series = make_series(2, "CT", image_type="DERIVED\\SECONDARY")
    paths = write_series([*series, make_encapsulated_pdf(series[0])], tmp_path / "in")
    reports = deidentify_dicom_files(
        dicom_urls=paths,
        upload_dir=tmp_path / "o",
        data_dir=tmp_path / "d",
        config=Config(deid=DeidConfig(encapsulated_documents=setting)),
    )
    pdf = reports[2]
    assert pdf["url_deid"] is None
    images = reports[:2]
    if setting == "quarantine":
        assert pdf["error"] == "encapsulated document"
        # policy "all": the document holds its series back, and the images say why.
        assert all(r["url_deid"] is None and 'policy "all"' in r["withheld"] for r in images)
    else:
        assert "removed" in pdf["removed"] and not pdf.get("error")
        assert all(r["url_deid"] for r in images)
    assert not [p for p in (tmp_path / "o").rglob("*.dcm") if b"%PDF" in p.read_bytes()]


def test_the_report_never_goes_into_out_and_names_only_what_was_passed(tmp_path):
    root = tmp_path / "Zyxwortha_Quilliam"  # folders are often named after the patient
    write_series(make_series(2, "CT"), root / "Zyxwortha_Quilliam_CT")
    out = tmp_path / "out"
    inside = run_cli("deidentify", str(root), "--out", str(out), "--report", str(out / "r.json"))
    assert inside.returncode == 1 and "inside --out" in inside.stderr
    assert not out.exists() or not list(out.rglob("*"))
    report = tmp_path / "private" / "r.json"
    result = run_cli(
        "deidentify", str(root), "--out", str(out), "--report", str(report),
        "--data-dir", str(tmp_path / "d"), "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert report.stat().st_mode & 0o777 == 0o600
    text = report.read_text()
    assert text.count("Zyxwortha_Quilliam_CT") == 0 and f"{root}#1" in text and f"{root}#2" in text


def test_files_are_published_only_once_their_series_is_judged(tmp_path):
    """Each file is read once, in a worker, and de-identified into a staging folder inside
    --out: only files of a series that may leave are moved to their output names, and the
    staging folder is gone after the run, also when the run stops half-way."""
    from deid_node.api import build_settings, worker_pool
    from deid_node.batch import run_batch
    from deid_node.config import DeidConfig, PixelsConfig
    from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy

    root = tmp_path / "in"
    write_series(make_series(2, "CT", image_type="DERIVED\\SECONDARY"), root / "a")
    mixed = make_series(2, "MR", image_type="DERIVED\\SECONDARY")
    mixed[1].ImageType = ["ORIGINAL", "PRIMARY"]  # fails CRITERIA: holds its series back
    write_series(mixed, root / "b")
    settings = build_settings(
        # Headers only: publishing is what is tested (OCR took most of this test's 8 s).
        deid=DeidConfig(redact_pixels_mode=DeidentifyRedactTextMode.REDACT_NO_TEXT),
        pixels=PixelsConfig(),
        conditions=tuple(CRITERIA),
        policy=SeriesPolicy.ALL,
        data_dir=tmp_path / "d",
    )

    def published(out: Path) -> list[Path]:
        return [
            p
            for p in out.rglob("*.dcm")
            if not any(part.startswith(".deid-node-staging-") for part in p.parts)
        ]

    for workers in (1, 2):
        out = tmp_path / f"o{workers}"
        seen: list[tuple[list[dict], list[Path], list[Path]]] = []

        def on_series(reports, out=out, seen=seen):
            staged = [p for p in out.rglob("*.dcm") if p not in published(out)]
            seen.append((reports, published(out), staged))

        with worker_pool(workers) as executor:
            result = run_batch([root], out, settings, executor=executor, on_series=on_series)
        assert (result.series_passed, result.series_failed) == (1, 1)
        # When the first series is reported, every file has been de-identified: the other
        # series' files wait in the staging folder, none under an output name.
        first_reports, first_published, first_staged = seen[0]
        assert sorted(first_published) == sorted(
            Path(r["url_deid"]) for r in first_reports if r["url_deid"]
        )
        assert len(first_published) + len(first_staged) >= 3  # the failing file is not staged
        sent = [Path(r["url_deid"]) for reports, _, _ in seen for r in reports if r["url_deid"]]
        assert sorted(published(out)) == sorted(sent) and len(sent) == 2
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []

    def stop(_reports):
        raise KeyboardInterrupt

    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        run_batch([root], out, settings, on_series=stop)
    assert len(published(out)) <= 2  # at most the first series, which was judged
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
