"""DICOM files in and out: reading (also files without a Part 10 preamble), the header alone,
and writing with native pixel data streamed or written in one piece after the header."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset, validate_file_meta
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from deid_node.errors import InputError

# A UID as it may safely name a folder: dot-separated digit components, at most 64 characters
# (PS3.5 9.1). Leading zeros, which some modalities send, are tolerated; empty components
# ("..", a leading or trailing dot) are not.
UID_PATTERN = re.compile(r"^(?=.{1,64}$)[0-9]+(\.[0-9]+)*$")

# Values larger than this are not read into memory when pixels stay untouched.
STREAM_VALUES_ABOVE = 1 << 20
PIXEL_DATA_TAG = 0x7FE00010


def read_dicom(path: Path, **kwargs: Any) -> Dataset:
    """dcmread, also for files without a Part 10 preamble and file meta (old archives, raw
    dataset dumps) when they parse as a DICOM dataset with SOP Class and Instance UIDs; their
    file meta is then made up from what was read, so that they are written as Part 10 files."""
    try:
        return dcmread(path, **kwargs)
    except InvalidDicomError:
        if not _starts_like_a_data_set(path):
            raise
    # Forced parsing of a file that only starts like a data set: large values stay on disk
    # (a garbage length must not become a gigabyte read).
    kwargs["defer_size"] = kwargs.get("defer_size") or STREAM_VALUES_ABOVE
    ds = dcmread(path, force=True, **kwargs)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if not (UID_PATTERN.match(sop_class) and UID_PATTERN.match(sop_instance)):
        raise InvalidDicomError("no DICM prefix, and no SOP Class and Instance UIDs")
    meta = ds.file_meta if isinstance(getattr(ds, "file_meta", None), FileMetaDataset) else None
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    return ds


def _starts_like_a_data_set(path: Path) -> bool:
    """A raw data set starts with a tag of a low group (0002 file meta, 0008 identification...),
    little or big endian: anything else (a PDF, a video, a text) is not parsed by force."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    if len(head) < 4:
        return False
    return min(struct.unpack("<H", head[:2])[0], struct.unpack(">H", head[:2])[0]) <= 0x0020 and (
        head[:2] != b"\0\0"
    )


def read_header(path: Path) -> Dataset:
    """Read a file's header without pixel data; a clear InputError when it cannot be read.

    Any failure counts (a sequence nested thousands deep raises RecursionError, a malformed
    value anything): it refuses this file, never the batch. Only the error's type is kept, as
    library messages can quote values.
    """
    try:
        ds = read_dicom(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - see above
        raise InputError(f"not a readable DICOM file: {type(exc).__name__}") from None
    return ds


@dataclass(frozen=True)
class _StreamedElement:
    """A native PixelData value left in the source file, to be copied after the header."""

    offset: int
    length: int
    vr: str
    implicit_vr: bool


def _detach_pixel_data(ds: Dataset) -> _StreamedElement | None:
    """Take a deferred, native PixelData out of `ds` if it can be streamed; else leave it."""
    raw = ds._dict.get(PIXEL_DATA_TAG)  # noqa: SLF001 - the raw element, not its value
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if (
        not isinstance(raw, RawDataElement)
        or raw.value is not None  # small enough to have been read: the usual path
        or raw.length in (None, 0xFFFFFFFF)  # encapsulated: not streamed
        or syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        or max(ds.keys()) != PIXEL_DATA_TAG  # something after it (padding, signatures)
    ):
        return None
    streamed = _StreamedElement(
        raw.value_tell, raw.length, raw.VR or "OW", syntax == ImplicitVRLittleEndian
    )
    del ds[PIXEL_DATA_TAG]
    return streamed


def _detach_pixel_bytes(ds: Dataset) -> tuple[_StreamedElement, bytes] | None:
    """Take a native PixelData held in memory, the last element, out of `ds`: written after the
    header in one write, where pydicom's writer copies it through two buffers (a third of the
    time to write a 512 KB CT)."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if (
        PIXEL_DATA_TAG not in ds
        or syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        or max(ds.keys()) != PIXEL_DATA_TAG
    ):
        return None
    elem = ds[PIXEL_DATA_TAG]
    value = elem.value
    if (
        not isinstance(value, bytes)
        or len(value) % 2
        or elem.is_undefined_length
        or (syntax == ExplicitVRLittleEndian and elem.VR not in ("OB", "OW"))
    ):
        return None
    del ds[PIXEL_DATA_TAG]
    return _StreamedElement(0, len(value), elem.VR, syntax == ImplicitVRLittleEndian), value


def _save(ds: Dataset, handle: Any, src: Path, streamed: _StreamedElement | None) -> None:
    in_memory = _detach_pixel_bytes(ds) if streamed is None else None
    _write_part10(ds, handle)
    if in_memory is not None:
        handle.write(_element_header(in_memory[0]))
        handle.write(in_memory[1])
        return
    if streamed is None:
        return
    # PixelData is the last element: append its header and copy its value from the source.
    handle.write(_element_header(streamed))
    with src.open("rb") as source:
        source.seek(streamed.offset)
        remaining = streamed.length
        while remaining:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                raise InputError("pixel data shorter than its declared length")
            handle.write(chunk)
            remaining -= len(chunk)


def _write_part10(ds: Dataset, handle: Any) -> None:
    """`ds.save_as(handle, enforce_file_format=True)`, the same bytes, without the deep copy of
    the file meta that dcmwrite makes to leave the caller's untouched (a third of the time to
    write a CT header): `ds` is the pipeline's own, written once. Transfer syntaxes other than
    the common little-endian ones, and what dcmwrite would refuse, go through dcmwrite itself.
    """
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if isinstance(meta, FileMetaDataset) else None
    if (
        syntax is None
        or not isinstance(syntax, UID)
        or syntax.is_private
        or not syntax.is_transfer_syntax
        or not syntax.is_little_endian
        or syntax == DeflatedExplicitVRLittleEndian
        or any(tag >> 16 in (0, 2) for tag in ds._dict)  # noqa: SLF001 - dcmwrite's own check
        or not isinstance(ds.get("SOPClassUID"), str)
        or not isinstance(ds.get("SOPInstanceUID"), str)
    ):
        ds.save_as(handle, enforce_file_format=True)
        return
    # dcmwrite's steps for a file meta with a transfer syntax, in its order.
    if ds.SOPClassUID and meta.get("MediaStorageSOPClassUID") != ds.SOPClassUID:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if ds.SOPInstanceUID and meta.get("MediaStorageSOPInstanceUID") != ds.SOPInstanceUID:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    validate_file_meta(meta, enforce_standard=True)
    preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    if len(preamble) != 128:
        raise ValueError("the preamble must be 128 bytes long")
    if PIXEL_DATA_TAG in ds:
        ds[PIXEL_DATA_TAG].is_undefined_length = syntax.is_compressed
    fp = DicomFileLike(handle)
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, True
    fp.write(preamble)
    fp.write(b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    write_dataset(fp, ds)


def _element_header(element: _StreamedElement) -> bytes:
    """The tag, VR (explicit VR) and length of a PixelData element, little endian."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    if element.implicit_vr:
        return tag + struct.pack("<I", element.length)
    return tag + element.vr.encode() + b"\x00\x00" + struct.pack("<I", element.length)
