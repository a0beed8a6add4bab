"""A representative subset of real files through the batch pipeline: nothing identifying leaves
the header, nothing innocent is quarantined, no file overwrites another.

The files are pydicom's and pydicom-data's test files, nibabel's DICOM test files and the
deid-data package's (vendors' quirks, character sets, compressed syntaxes, SR, SEG, RT,
waveforms, enhanced MR/CT, ultrasound, files without a preamble). The search for leaks and the
corpus are scripts/privacy_realfiles.py's, which measures every file of these packages for
docs/privacy.md; here each chosen file is its own case.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from deid_node import deidentify_dicom_files

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "privacy_realfiles.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("privacy_realfiles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("privacy_realfiles", module)
    spec.loader.exec_module(module)
    return module


pr = _load_script()

# Why each file is here.
SUBSET = {
    "pydicom": [
        "MR_small.dcm",  # InstitutionName "TOSHIBA" inside Manufacturer "TOSHIBA_MEC"
        "CT_small.dcm",
        "rtplan.dcm",  # StationName equal to the model name
        "rtstruct.dcm",
        "rtdose.dcm",
        "test-SR.dcm",  # SR: codes, names of observers
        "reportsi.dcm",
        "waveform_ecg.dcm",  # waveform; PatientName already "Anonymous"
        "liver_1frame.dcm",  # SEG
        "ExplVR_LitEndNoMeta.dcm",  # no preamble, no file meta
        "ExplVR_BigEndNoMeta.dcm",
        "examples_palette.dcm",
        "SC_rgb_small_odd_big_endian.dcm",
        "JPEG2000.dcm",
        "SC_rgb_rle.dcm",
        "examples_overlay.dcm",
        "chrH31.dcm",  # character sets: Japanese, Korean, Greek, Russian, Hebrew, Arabic
        "chrKoreanMulti.dcm",
        "chrGreek.dcm",
        "chrRuss.dcm",
        "chrJapMulti.dcm",
        "chrX1.dcm",
    ],
    "pydicom-data": [
        "eCT_Supplemental.dcm",  # enhanced CT; an accession number that is a substring of dates
        "emri_small.dcm",  # enhanced MR
        "mlut_18.dcm",
        "gdcm-US-ALOKA-16.dcm",
        "explicit_VR-UN.dcm",
        "MR-SIEMENS-DICOM-WithOverlays.dcm",
        "OBXXXX1A.dcm",
        "liver.dcm",
    ],
    "nibabel": ["0.dcm", "csa_slice_norm.dcm", "philips_mprage.dcm"],  # CSA headers; Philips
    "deid-data": [
        "ctbrain1.dcm",
        "RGB_IMAGE.dcm",  # ultrasound: a patient named like a DICOM defined term
        "GREYSCALE_IMAGE.dcm",
        "image1.dcm",
        "cat.dcm",  # a non-human subject
    ],
}
CASES = [(source, name) for source, names in SUBSET.items() for name in names]
# Known gaps in IOD conformance (issue 11 item 5), measured in docs/privacy.md: strict, so that
# the test says so when they are closed.
DCIODVFY_GAPS: dict[tuple[str, str], str] = {}  # none left (philips_mprage and cat closed)
DCIODVFY_CASES = [
    pytest.param(*case, marks=pytest.mark.xfail(strict=True, reason=DCIODVFY_GAPS[case]))
    if case in DCIODVFY_GAPS
    else case
    for case in CASES
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[tuple[str, str], Path]:
    work = tmp_path_factory.mktemp("unpacked")
    found: dict[tuple[str, str], Path] = {}
    for source, names in SUBSET.items():
        files = pr.source_files(source, work)
        for name in names:
            match = [p for p in files if p.name == name]
            if match:
                found[(source, name)] = match[0]
    return found


@pytest.fixture(scope="module")
def settings():
    return pr.measurement_settings()


def _measure(corpus, settings, tmp_path, source, name, *, dciodvfy=False):
    if (source, name) not in corpus:
        pytest.skip(f"{name} not found: install the test extra ({source})")
    path = corpus[(source, name)]
    ds = pr.classify(path)
    assert not isinstance(ds, str), f"{name}: {ds}"
    stats = pr.SourceStats()
    pr.measure_file(path, ds, tmp_path / "out", settings, stats, dciodvfy, name)
    return stats


@pytest.mark.parametrize(("source", "name"), CASES)
def test_no_leak_and_no_false_quarantine(corpus, settings, tmp_path, source, name):
    stats = _measure(corpus, settings, tmp_path, source, name)
    assert stats.false_quarantines == 0 and stats.invalid_inputs == 0, stats.details
    assert stats.written == 1
    assert stats.leaks == 0, stats.details  # attribute keywords only, never values


@pytest.mark.parametrize(("source", "name"), DCIODVFY_CASES)
def test_no_new_dciodvfy_error(corpus, settings, tmp_path, source, name):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (make system-deps)")
    stats = _measure(corpus, settings, tmp_path, source, name, dciodvfy=True)
    assert stats.new_errors == 0, stats.details


def test_the_search_finds_what_is_left(corpus, settings, tmp_path):
    """The measurement can fail: with the header untouched it finds the identifying values."""
    path = corpus[("pydicom", "CT_small.dcm")]
    untouched = pr.measurement_settings(redact_tags=False)
    stats = pr.SourceStats()
    pr.measure_file(path, pr.classify(path), tmp_path / "o", untouched, stats, False, "CT_small")
    assert stats.leaks >= 5
    assert {"PatientName", "PatientID"} <= set(stats.details[0]["leaks"])


def test_real_files_sharing_a_sop_instance_uid_never_overwrite_each_other(corpus, tmp_path):
    """pydicom's MR_small in nine syntaxes shares one SOPInstanceUID: one output, eight refusals."""
    root = tmp_path / "in"
    root.mkdir()
    mr_small = corpus[("pydicom", "MR_small.dcm")].parent
    variants = sorted(mr_small.glob("MR_small*.dcm"))
    assert len(variants) >= 5
    for path in variants:
        shutil.copy(path, root / path.name)
    shutil.copy(variants[0], root / "zz_again.dcm")  # the same file twice
    reports = deidentify_dicom_files(
        dicom_urls=[root], upload_dir=tmp_path / "out", data_dir=tmp_path / "d", workers=2
    )
    assert len(reports) == len(variants) + 1
    written = [r for r in reports if r["url_deid"]]
    refused = [r for r in reports if not r["url_deid"]]
    assert len(written) == 1
    assert all(r["error"].startswith("duplicate SOPInstanceUID") for r in refused)
    assert sum("the same file" in r["error"] for r in refused) == 1
    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert outputs == [Path(written[0]["url_deid"])]  # no stray temporary file either
