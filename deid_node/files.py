"""Durable file writes shared by the stages: write or adopt a file all-or-nothing, fsync folders.

A file is "on disk" when its bytes are fsynced and the rename that gave it its name is fsynced
in its folder; only then may the node acknowledge, or record it as sent.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


def adopt_durably(src: Path, final: Path) -> Path:
    """Rename an existing file onto `final` (copy across file systems), fsync it and its folder.

    Both fsyncs return before this does, so the caller may acknowledge. The rename comes first:
    on a journalling file system (ext4, XFS) the file's fsync then commits the rename in the
    same journal transaction and the folder's fsync finds nothing left to do, one disk flush
    per received instance instead of two (issue 17). A crash before the caller records the
    file leaves it in its folder without a row: the spool's start-up moves such files aside.
    """
    try:
        os.replace(src, final)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with src.open("rb") as handle:
            write_durably(
                final.with_suffix(".part"), final, lambda dst: shutil.copyfileobj(handle, dst)
            )
        src.unlink()
        return final  # written, fsynced and its folder fsynced by write_durably
    fd = os.open(final, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(final.parent)
    return final


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_durably(
    tmp: Path,
    final: Path,
    data: bytes | Callable[[Any], None],
    *,
    sync_dir: bool = True,
    fsync: bool = True,
) -> None:
    """Write to `tmp`, fsync, rename onto `final`, fsync the folder: all or nothing on disk.

    sync_dir=False leaves the folder's fsync to the caller (`fsync_dirs`, once per series).
    """
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a temporary name planted as a symbolic link is refused, not written through.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir and fsync:
        _fsync_dir(final.parent)


def fsync_dirs(folders: Iterable[Path]) -> None:
    """Make renames into these folders durable (one fsync per folder)."""
    for folder in set(folders):
        _fsync_dir(folder)


def fsync_tree(files: Iterable[Path], root: Path) -> None:
    """After writing `files` under `root` in folders that may be new: fsync every folder from
    each file's up to `root`'s parent, so that the new folders' own entries are durable too."""
    folders: set[Path] = set()
    for path in files:
        folder = path.parent
        while folder != root.parent and folder not in folders:
            folders.add(folder)
            folder = folder.parent
    folders.add(root.parent)
    fsync_dirs(folders)
