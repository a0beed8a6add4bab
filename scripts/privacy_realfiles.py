"""Measure header de-identification on real DICOM files that others wrote and PyPI packages ship.

Sources: pydicom's own test files, the pydicom-data package, nibabel's DICOM test files and the
deid-data package (the `test` extra installs them). Every file goes alone through the batch
pipeline (`run_batch`, series policy per_instance, REDACT_NO_TEXT: this measures the header;
burned-in text is issue 12's table) and is counted per source:

- files: what the source holds; unreadable (pydicom cannot read it at all, or it is no DICOM
  instance: no SOP Class/Instance UID) are counted apart and not run.
- leaks: the output (pixel data left out) searched byte for byte for every identifying value of
  the input: the node's own list plus, found independently here, the raw values of every
  PS3.15 Table E.1-1 attribute whose basic-profile action is X, Z, D or U (all depths, any VR).
  Private, curve and overlay data are not searched for. Values that are no evidence are
  left out: shorter than 4 characters, one repeated
  character, the node's own dummies, well-known UIDs, and values the input also holds in an
  attribute the profile keeps (a vendor name stored as InstitutionName and Manufacturer).
  Name components are matched on word boundaries only (MARY is not in PRIMARY), numbers and
  UIDs as whole numbers; other values as substrings, ignoring case.
- quarantined: files the node refused, by reason (encapsulated documents are expected; any
  other reason on these innocent files is a false quarantine).
- new dciodvfy Errors: Error lines of the output that the input's dciodvfy output lacks
  (values masked), when dciodvfy is installed.

    .venv/bin/python scripts/privacy_realfiles.py [--sources pydicom,nibabel] [--no-dciodvfy]
        [--markdown docs/privacy-table.md] [--json out.json] [--details]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.metadata
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom.data
from pydicom import Dataset, dcmread
from pydicom.uid import UID_dictionary

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deid_node.batch import run_batch  # noqa: E402
from deid_node.config import DeidConfig, PixelsConfig  # noqa: E402
from deid_node.log import configure_logging  # noqa: E402
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy  # noqa: E402
from deid_node.pipeline import PipelineSettings  # noqa: E402

TABLE = REPO / "deid_node" / "deid" / "data" / "ps3.15-table-e.1-1.csv"
# What the node writes itself (D dummies): found in an output, they are not the input's.
NODE_DUMMIES = frozenset(
    {"ANONYMOUS", "19000101", "19000101000000", "000000", "000D", "urn:anonymous", "YES", "NO"}
)
EXPECTED_QUARANTINES = ("encapsulated document",)
# Refusals of inputs that are no complete instance: a series cannot be formed without its UID.
INVALID_INPUT = ("missing SeriesInstanceUID or SOPInstanceUID",)
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
SOURCES = ("pydicom", "pydicom-data", "nibabel", "deid-data")
SECRET = b"privacy_realfiles fixed secret 1"


# -- the corpus ---------------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds without importing (nibabel imports a lot)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def source_files(source: str, work: Path) -> list[Path]:
    """The files of one source, sorted; gzip and zip members unpacked into `work`."""
    roots: list[Path] = []
    if source == "pydicom":
        data = Path(pydicom.data.__file__).parent
        roots = [data / "test_files", data / "charset_files"]
    elif source == "pydicom-data":
        try:
            files = importlib.metadata.files("pydicom-data") or []
        except importlib.metadata.PackageNotFoundError:
            return []
        return sorted(
            p
            for p in (Path(str(f.locate())) for f in files if str(f).startswith("data_store/data/"))
            if p.is_file() and p.suffix not in (".py", ".pyc")
        )
    elif source == "nibabel":
        base = _package_dir("nibabel")
        roots = [base / "nicom" / "tests" / "data"] if base else []
    elif source == "deid-data":
        base = _package_dir("deid_data")
        roots = [base / "data"] if base else []
    else:
        raise SystemExit(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    out: list[Path] = []
    for root in (r for r in roots if r.is_dir()):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            out.extend(_unpacked(path, root, work / source))
    return out


def _unpacked(path: Path, root: Path, work: Path) -> list[Path]:
    if path.suffix in (".py", ".pyc", ".md", ".txt", ".bin", ".json", ".dump", ".icc"):
        return []
    target = work / root.name / path.relative_to(root).with_suffix("")
    if path.suffix == ".gz":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gzip.decompress(path.read_bytes()))
        return [target]
    if path.suffix == ".zip":
        members = []
        with zipfile.ZipFile(path) as archive:
            for member in sorted(archive.namelist()):
                if not member.endswith("/"):
                    (target / member).parent.mkdir(parents=True, exist_ok=True)
                    (target / member).write_bytes(archive.read(member))
                    members.append(target / member)
        return members
    return [path]


# -- identifying values of an input -------------------------------------------------------------


def _load_table() -> list[tuple[re.Pattern[str], str]]:
    rules = []
    with TABLE.open(newline="") as handle:
        for row in csv.DictReader(handle):
            action = row["basic"].strip()
            if not action or action in ("K", "C"):
                continue
            tag = row["tag"].strip("()").replace(",", "").upper()
            if not re.fullmatch(r"[0-9A-FX]{8}", tag) or tag[:2] in ("50", "60"):
                # Private tags (odd groups) hold vendors' technical values as much as names;
                # curves and overlays are bitmaps: burned-in data, measured in issue 12.
                continue
            rules.append((re.compile(tag.replace("X", "[0-9A-F]") + "$"), action))
    return rules


_RULES = _load_table()


def profile_action(tag: int) -> str | None:
    text = f"{tag:08X}"
    for pattern, action in _RULES:
        if pattern.match(text):
            return action
    return None


@dataclass(frozen=True)
class Needle:
    value: bytes
    kind: str  # the attribute's keyword (or "node list")
    word: bool = False  # match on word boundaries only (name components)


def _walk(ds: Dataset) -> Iterator[Any]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk(item)


def _strings(elem: Any) -> list[str]:
    value = elem.value
    if value is None:
        return []
    values = (
        list(value)
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"
        else [value]
    )
    return [str(v).strip(" \0") for v in values if not isinstance(v, bytes | Dataset)]


def _worth_searching(text: str) -> bool:
    return len(text) >= 4 and len(set(text)) > 1 and text.upper() not in NODE_DUMMIES


def identifying_needles(ds: Dataset) -> list[Needle]:
    """What must not be in the output, found independently of the node (plus its own list)."""
    kept: set[str] = set()
    needles: dict[bytes, Needle] = {}

    def add(text: str | bytes, kind: str, word: bool = False) -> None:
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "ignore")
        if raw and raw not in needles:
            needles[raw] = Needle(raw, kind, word)

    for elem in _walk(ds):
        if elem.tag.group == 0x7FE0 or elem.keyword in PIXEL_KEYWORDS:
            continue
        action = profile_action(int(elem.tag))
        if action is None:
            if elem.VR not in ("SQ", "OB", "OW", "UN"):
                for text in _strings(elem):
                    kept.add(text)
                    kept.update(p for p in re.split(r"[\^= ]+", text) if p)
            continue
        kind = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        if elem.VR in ("OB", "OW", "UN", "OF", "OD", "OL", "OV"):
            raw = bytes(elem.value or b"") if isinstance(elem.value, bytes) else b""
            if len(raw.strip(b" \0")) >= 8 and len(set(raw)) > 2:
                add(raw.strip(b" \0"), kind)
            continue
        if elem.VR == "SQ":
            continue
        for text in _strings(elem):
            if action.startswith("U") or elem.VR == "UI":
                if len(text) >= 10 and text not in UID_dictionary:
                    add(text, kind)
                continue
            if _worth_searching(text):
                add(text, kind)
            if elem.VR == "PN":
                for part in re.split(r"[\^= ]+", text):
                    if len(part) >= 3 and part.isalpha() and part.upper() not in NODE_DUMMIES:
                        add(part, kind, word=True)
    try:
        from deid_node.deid.tags import identifying_values

        for value in identifying_values(ds, DeidConfig()):
            text = str(value).strip()
            if _worth_searching(text):
                add(text, f"node list ({getattr(value, 'kind', '?')})", word=text.isalpha())
    except Exception as exc:  # noqa: BLE001 - the measurement goes on with its own list
        print(f"node identifying_values failed: {type(exc).__name__}", file=sys.stderr)
    # "TOSHIBA" as InstitutionName is no evidence when Manufacturer is "TOSHIBA_MEC".
    kept_text = "\n".join(k.upper() for k in kept)
    return [
        n for n in needles.values() if n.value.decode("utf-8", "ignore").upper() not in kept_text
    ]


def output_bytes(path: Path) -> bytes:
    """The output's bytes without its pixel data (burned-in text is measured elsewhere)."""
    ds = dcmread(path)
    for keyword in PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def find_leaks(needles: Iterable[Needle], data: bytes) -> list[Needle]:
    folded = data.upper()
    leaks = []
    for needle in needles:
        value = needle.value.upper()
        if needle.word:
            pattern = rb"(?<![A-Za-z0-9])" + re.escape(value) + rb"(?![A-Za-z0-9])"
        elif re.fullmatch(rb"[0-9.]+", value):
            # Numbers and UIDs as whole numbers: an ID "0010" is not in the date "19000101",
            # nor an organisation's UID root in every UID it issued.
            pattern = rb"(?<![0-9.])" + re.escape(value) + rb"(?![0-9.])"
        else:
            pattern = re.escape(value)
        if re.search(pattern, folded):
            leaks.append(needle)
    return leaks


# -- dciodvfy -------------------------------------------------------------------------------------

_VALUE = re.compile(r"\"[^\"]*\"|\b\d+(?:\.\d+)+\b|(?<=UID )\d+\b")


def dciodvfy_errors(path: Path) -> Counter[str]:
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, errors="replace"
    )
    return Counter(
        _VALUE.sub("<>", line)
        for line in (run.stdout + run.stderr).splitlines()
        if line.startswith("Error")
    )


# -- the run --------------------------------------------------------------------------------------


@dataclass
class SourceStats:
    files: int = 0
    unreadable: int = 0
    not_instances: int = 0
    run: int = 0
    written: int = 0
    leaks: int = 0
    files_leaking: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    left_out: Counter[str] = field(default_factory=Counter)
    new_errors: int = 0
    not_compared: int = 0
    files_new_errors: int = 0
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def false_quarantines(self) -> int:
        expected = EXPECTED_QUARANTINES + INVALID_INPUT
        return sum(n for r, n in self.quarantined.items() if not r.startswith(expected))

    @property
    def invalid_inputs(self) -> int:
        return sum(n for r, n in self.quarantined.items() if r.startswith(INVALID_INPUT))

    @property
    def expected_quarantines(self) -> int:
        return sum(n for r, n in self.quarantined.items() if r.startswith(EXPECTED_QUARANTINES))


def classify(path: Path) -> str | Dataset:
    """'unreadable', 'not an instance', or the dataset (read as pydicom reads it, forced)."""
    try:
        ds = dcmread(path, force=True)
        ds.walk(lambda _ds, _elem: None)  # values read lazily must read too
    except Exception:  # noqa: BLE001
        return "unreadable"
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return "not an instance"
    return ds


def measure_file(
    path: Path,
    ds: Dataset,
    out: Path,
    settings: Any,
    stats: SourceStats,
    dciodvfy: bool,
    label: str,
) -> None:
    stats.run += 1
    result = run_batch([path], out, settings, progress=False)
    detail: dict[str, Any] = {"file": label}
    if not result.reports:
        stats.quarantined["skipped as non-DICOM"] += 1
        detail["quarantined"] = "skipped as non-DICOM"
        stats.details.append(detail)
        return
    report = result.reports[0]
    if report.get("removed"):
        stats.left_out[report["removed"]] += 1
    if not report.get("url_deid"):
        reason = str(report.get("error") or report.get("withheld") or "not written")
        stats.quarantined[reason] += 1
        detail["quarantined"] = reason
        stats.details.append(detail)
        return
    stats.written += 1
    written = Path(report["url_deid"])
    leaks = find_leaks(identifying_needles(ds), output_bytes(written))
    if leaks:
        stats.leaks += len(leaks)
        stats.files_leaking += 1
        detail["leaks"] = sorted({n.kind for n in leaks})
    if dciodvfy:
        before = dciodvfy_errors(path)
        if any("read failed" in line for line in before):
            # A truncated original: its copy holds what pydicom could read, which dciodvfy
            # then checks further than it could check the original. Not compared.
            stats.not_compared += 1
            return
        new = dciodvfy_errors(written) - before
        if new:
            stats.new_errors += sum(new.values())
            stats.files_new_errors += 1
            detail["new_dciodvfy_errors"] = sorted(new)
    if len(detail) > 1:
        stats.details.append(detail)


def measurement_settings(redact_tags: bool = True) -> PipelineSettings:
    """Header only (REDACT_NO_TEXT), each file judged alone, no save conditions. A fixed secret:
    the same pseudonyms and UIDs on every run, so that an input value matching inside a
    pseudonym cannot come and go between runs."""
    return PipelineSettings(
        DeidConfig(
            redact_dicom_tags=redact_tags,
            redact_pixels_mode=DeidentifyRedactTextMode.REDACT_NO_TEXT,
        ),
        PixelsConfig(),
        (),
        SeriesPolicy.PER_INSTANCE,
        SECRET,
        durable=False,
    )


def measure(
    sources: Iterable[str], *, dciodvfy: bool, limit: int | None = None, redact_tags: bool = True
) -> dict[str, SourceStats]:
    results: dict[str, SourceStats] = {}
    with tempfile.TemporaryDirectory(prefix="privacy-realfiles-") as tmp:
        work = Path(tmp)
        settings = measurement_settings(redact_tags)
        for source in sources:
            stats = results[source] = SourceStats()
            files = source_files(source, work / "unpacked")
            for index, path in enumerate(files[:limit] if limit else files):
                stats.files += 1
                label = path.name
                ds = classify(path)
                if ds == "unreadable":
                    stats.unreadable += 1
                    continue
                if ds == "not an instance":
                    stats.not_instances += 1
                    continue
                out = work / "out" / source / str(index)
                measure_file(path, ds, out, settings, stats, dciodvfy, label)
                shutil.rmtree(out, ignore_errors=True)
    return results


def markdown(results: dict[str, SourceStats], dciodvfy: bool) -> str:
    lines = [
        "| source | files | unreadable / not an instance | de-identified | leaks (files) | "
        "false quarantines | refused: no Series/SOP UID | encapsulated documents | "
        "new dciodvfy Errors (files) | truncated, not compared |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    total = SourceStats()
    for source, s in [*results.items(), ("**all**", total)]:
        if s is total:
            for other in results.values():
                for name in ("files", "unreadable", "not_instances", "written", "leaks"):
                    setattr(total, name, getattr(total, name) + getattr(other, name))
                for name in ("files_leaking", "new_errors", "files_new_errors", "not_compared"):
                    setattr(total, name, getattr(total, name) + getattr(other, name))
                total.quarantined.update(other.quarantined)
        errors = f"{s.new_errors} ({s.files_new_errors})" if dciodvfy else "not run"
        lines.append(
            f"| {source} | {s.files} | {s.unreadable} / {s.not_instances} | {s.written} | "
            f"{s.leaks} ({s.files_leaking}) | {s.false_quarantines} | {s.invalid_inputs} | "
            f"{s.expected_quarantines} | {errors} | {s.not_compared} |"
        )
    if total.quarantined:
        lines += ["", "Files not written, by reason (all sources):", ""]
        lines += [f"- {n} x {reason}" for reason, n in total.quarantined.most_common()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--no-dciodvfy", action="store_true")
    parser.add_argument("--limit", type=int, help="at most this many files per source")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="per-file details (file names, no values)")
    parser.add_argument("--details", action="store_true", help="print per-file findings")
    parser.add_argument(
        "--control", action="store_true", help="header left untouched: shows the search finds leaks"
    )
    args = parser.parse_args(argv)
    configure_logging("warning")  # one line per series otherwise
    dciodvfy = not args.no_dciodvfy and shutil.which("dciodvfy") is not None
    started = time.monotonic()
    results = measure(
        args.sources.split(","), dciodvfy=dciodvfy, limit=args.limit, redact_tags=not args.control
    )
    table = markdown(results, dciodvfy)
    print(table)
    print(f"({time.monotonic() - started:.0f} s)")
    if args.details:
        for source, s in results.items():
            for d in s.details:
                print(source, json.dumps(d))
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({src: s.details for src, s in results.items()}, indent=1))
    leaks = sum(s.leaks for s in results.values())
    false_q = sum(s.false_quarantines for s in results.values())
    return 1 if leaks or false_q else 0


if __name__ == "__main__":
    sys.exit(main())
