"""Batch CLI and Python API: same pipeline as the node, Encord's names and report format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dicomgen import make_series, phi_markers, write_series
from pydicom import dcmread

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
    truncated = [r for r in reports if r["url"].endswith("truncated.dcm")]
    assert len(truncated) == 1 and truncated[0]["error"] and truncated[0]["url_deid"] is None
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
    )
    assert result.returncode == 0, result.stderr
    assert (
        "series passed 2, failed 2" in result.stderr
    )  # CT and MR pass; US and the truncated file fail
    assert "non-DICOM skipped 1" in result.stderr
    reports = json.loads((out / "report.json").read_text())
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
            "deidentify", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"
        ).returncode
        == 2
    )
    assert (
        run_cli(
            "deidentify", str(tmp_path), "--out", str(tmp_path / "o"), "--redact-pixels-mode", "X"
        ).returncode
        == 2
    )
    missing = run_cli("deidentify", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 1 and "no such file or folder" in missing.stderr
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[deid]\nredact_pixels_mode = 'SOME'\n")
    result = run_cli(
        "deidentify", str(tmp_path), "--out", str(tmp_path / "o"), "--config", str(bad_config)
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
