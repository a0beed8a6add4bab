"""Count dciodvfy Errors before and after header de-identification on real DICOM files.

The files are pydicom's own test files and the pydicom-data package's (written by vendors and
toolkits, not by us). For each file that pydicom reads and that has a SOP Class, the original and
its de-identified copy (`deidentify_tags`, basic profile or with `--options all`) are checked by
dciodvfy; an Error line of the output that the original's output does not hold is a new Error.

    .venv/bin/python scripts/dciodvfy_compare.py [--options all] [--show-new] [--limit N]

Prints one line per file with new Errors and a summary; exits 1 when any Error is new. Files
that dciodvfy cannot read to the end (truncated test files: "read failed") are counted apart:
their copy is the part pydicom could read, so dciodvfy checks more of it than of the original.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pydicom.data
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from deid_node.config import PROFILE_OPTIONS, DeidConfig
from deid_node.deid.tags import deidentify_tags
from deid_node.deid.uids import Pseudonymizer

# dciodvfy quotes values and prints UIDs; a new Error is compared by its
# message with those parts masked, so that a changed value does not count twice.
_VALUE = re.compile(r"\"[^\"]*\"|\b\d+(?:\.\d+)+\b|(?<=UID )\d+\b")


def corpus() -> list[Path]:
    """pydicom's test files and the pydicom-data package's files, sorted."""
    paths = [p for p in Path(pydicom.data.__file__).parent.joinpath("test_files").rglob("*")]
    try:
        for file in importlib.metadata.files("pydicom-data") or []:
            if str(file).startswith("data_store/data/"):
                paths.append(Path(str(file.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    return sorted(p for p in paths if p.is_file())


def errors(path: Path) -> list[str]:
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, errors="replace"
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def masked(line: str) -> str:
    return _VALUE.sub("<>", line)


def deidentified_copy(src: Path, dst: Path, options: tuple[str, ...]) -> str | None:
    """Write the de-identified copy; None when done, else why not."""
    try:
        ds = dcmread(src)
    except Exception as exc:
        return f"unreadable ({type(exc).__name__})"
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
        return "no SOP Class or Instance UID"
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        syntax = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    try:
        deidentify_tags(ds, DeidConfig(profile_options=options), Pseudonymizer(b"s" * 32))
        ds.save_as(dst, enforce_file_format=True)
    except Exception as exc:
        return f"de-identification failed ({type(exc).__name__})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", choices=["basic", "all"], default="basic")
    parser.add_argument("--show-new", action="store_true", help="print each new Error")
    parser.add_argument("--limit", type=int, default=0, help="check only the first N files")
    args = parser.parse_args()
    options: tuple[str, ...] = ()
    if args.options == "all":
        # every option but Modified Dates (Full Dates wins over it anyway)
        options = tuple(o for o in PROFILE_OPTIONS if "Modified Dates" not in o)
    files = corpus()[: args.limit or None]
    skipped: Counter[str] = Counter()
    checked = before_total = after_total = new_total = files_with_new = 0
    truncated: list[str] = []
    new_kinds: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "deid.dcm"
        for src in files:
            why = deidentified_copy(src, out, options)
            if why:
                skipped[why] += 1
                continue
            before = errors(src)
            after = errors(out)
            if any("read failed" in line for line in before):
                truncated.append(src.name)
                continue
            checked += 1
            before_total += len(before)
            after_total += len(after)
            known = Counter(masked(line) for line in before)
            new = []
            for line in after:
                key = masked(line)
                if known[key]:
                    known[key] -= 1
                else:
                    new.append(line)
            if new:
                files_with_new += 1
                new_total += len(new)
                print(f"{src.name}: {len(before)} -> {len(after)} Errors, {len(new)} new")
                for line in new:
                    new_kinds[masked(line)] += 1
                    if args.show_new:
                        print(f"    {line}")
    print(
        f"options={args.options} files={len(files)} checked={checked} "
        f"errors_before={before_total} errors_after={after_total} "
        f"new_errors={new_total} files_with_new_errors={files_with_new}"
    )
    if truncated:
        print(f"not compared, dciodvfy cannot read the original: {', '.join(truncated)}")
    for why, count in sorted(skipped.items()):
        print(f"skipped {count}: {why}")
    for kind, count in new_kinds.most_common(40):
        print(f"{count:4d} {kind}")
    return 1 if new_total else 0


if __name__ == "__main__":
    sys.exit(main())
