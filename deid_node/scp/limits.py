"""Limits on what a peer may send, checked on the bytes as they arrive, before they land.

`StreamGuard` follows the PDUs of one connection (PS3.8 9.3) and the PDVs inside P-DATA-TF
PDUs, fed chunk by chunk by the transport before pynetdicom sees the bytes. It refuses, by
raising `Refusal`:
- a PDU longer than we accept (P-DATA-TF: `node.max_pdu_kb`; association PDUs: 256 KiB),
  right after its 6-byte header, before its body is read;
- an association past `node.max_association_mb`;
- a dataset past `node.max_instance_mb`, and any dataset while free disk is below
  `node.min_free_disk_mb` (checked when a dataset starts and every 4 MiB of it).
The bytes of a refused chunk are never handed on, so pynetdicom writes at most the limit.

`pixel_size_problem` checks the attributes of a received header against its Pixel Data.
No pynetdicom or socket here: plain functions over bytes and numbers.
"""

from __future__ import annotations

import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deid_node.deid.pixelsize import declared_decoded_bytes

MB = 1 << 20

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))
# Association PDUs (request, release, abort) carry no data set: a generous bound. An A-ASSOCIATE-RQ
# with 128 presentation contexts of 10 transfer syntaxes each and a user identity is < 128 KiB.
MAX_ASSOCIATION_PDU_BYTES = 256 * 1024
DISK_CHECK_EVERY_BYTES = 4 * MB

# A-ABORT reasons (source 2, service provider) used when we cut an association.
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_INVALID_PDU_PARAMETER = 0x06


class Refusal(Exception):
    """The peer went past a limit: the association is aborted. `reason` names the config key."""

    def __init__(self, reason: str, abort_reason: int = ABORT_REASON_NOT_SPECIFIED, **fields: Any):
        super().__init__(reason)
        self.reason = reason
        self.abort_reason = abort_reason
        self.fields = fields


@dataclass(frozen=True)
class StreamLimits:
    max_pdu_bytes: int
    max_association_bytes: int  # 0: no limit
    max_instance_bytes: int
    min_free_disk_bytes: int
    data_dir: Path


class StreamGuard:
    """Follows one connection's byte stream; `feed` raises Refusal before a limit is passed."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self.received = 0  # bytes of the whole connection
        self.dataset_bytes = 0  # of the data set being received
        # Set by the last fragment of a message; cleared when we answer (see transport).
        self.message_complete = False
        self._pdu_header = bytearray()
        self._pdu_type = 0
        self._pdu_left = 0
        self._pdv_header = bytearray()
        self._pdv_left = 0
        self._pdv_dataset = False
        self._pdv_last = False
        self._next_disk_check = 0

    @property
    def at_pdu_boundary(self) -> bool:
        return self._pdu_left == 0 and not self._pdu_header

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self.received += len(view)
        cap = self.limits.max_association_bytes
        if cap and self.received > cap:
            raise Refusal("association larger than node.max_association_mb")
        at, end = 0, len(view)
        while at < end:
            if self._pdu_left == 0:
                take = min(6 - len(self._pdu_header), end - at)
                self._pdu_header += view[at : at + take]
                at += take
                if len(self._pdu_header) == 6:
                    self._start_pdu(bytes(self._pdu_header))
                    self._pdu_header.clear()
                continue
            take = min(self._pdu_left, end - at)
            if self._pdu_type == P_DATA_TF:
                self._feed_pdvs(view[at : at + take])
            self._pdu_left -= take
            at += take

    def _start_pdu(self, header: bytes) -> None:
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in KNOWN_PDU_TYPES:
            return  # pynetdicom answers an unknown PDU type itself (A-ABORT)
        limit = self.limits.max_pdu_bytes if pdu_type == P_DATA_TF else MAX_ASSOCIATION_PDU_BYTES
        if length > limit:
            key = "node.max_pdu_kb" if pdu_type == P_DATA_TF else "the association PDU limit"
            raise Refusal(
                f"PDU longer than {key}",
                ABORT_INVALID_PDU_PARAMETER,
                pdu_type=pdu_type,
                pdu_length=length,
            )
        self._pdu_type, self._pdu_left = pdu_type, length
        self._pdv_header.clear()
        self._pdv_left = 0

    def _feed_pdvs(self, view: memoryview) -> None:
        at, end = 0, len(view)
        while at < end:
            if self._pdv_left == 0:
                take = min(6 - len(self._pdv_header), end - at)
                self._pdv_header += view[at : at + take]
                at += take
                if len(self._pdv_header) == 6:
                    self._start_pdv(bytes(self._pdv_header))
                    self._pdv_header.clear()
                continue
            take = min(self._pdv_left, end - at)
            if self._pdv_dataset:
                self._count_dataset(take)
            self._pdv_left -= take
            at += take
            if self._pdv_left == 0 and self._pdv_last:
                self.message_complete = True

    def _start_pdv(self, header: bytes) -> None:
        item_length, _context_id, control = struct.unpack(">LBB", header)
        self._pdv_dataset = not control & 0x01
        self._pdv_last = bool(control & 0x02)
        if not self._pdv_dataset:
            # A command fragment: a new message; its data set (if any) starts from zero.
            self.dataset_bytes = 0
            self._next_disk_check = 0
        self._pdv_left = max(0, item_length - 2)
        if self._pdv_left == 0 and self._pdv_last:
            self.message_complete = True

    def _count_dataset(self, count: int) -> None:
        self.dataset_bytes += count
        if self.dataset_bytes > self.limits.max_instance_bytes:
            raise Refusal(
                "instance larger than node.max_instance_mb", dataset_bytes=self.dataset_bytes
            )
        if self.dataset_bytes > self._next_disk_check:
            self._next_disk_check = self.dataset_bytes + DISK_CHECK_EVERY_BYTES
            if shutil.disk_usage(self.limits.data_dir).free < self.limits.min_free_disk_bytes:
                raise Refusal("free disk below node.min_free_disk_mb")


def associate_rq_calling_ae(pdu: bytes) -> str:
    """The calling AE title of an A-ASSOCIATE-RQ PDU (bytes 26-41), for the log."""
    return pdu[26:42].decode("ascii", errors="replace").strip()


def associate_rj(source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU, rejected-transient (PS3.8 9.3.4)."""
    return struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x02, source, reason)


def a_abort(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (PS3.8 9.3.8)."""
    return struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, reason)


# -- pixel data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelProblem:
    status: int  # the DIMSE status to answer
    reason: str
    fields: dict[str, Any]


PIXEL_TAGS = ["Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "NumberOfFrames", "PixelData"]
DEFLATED = "1.2.840.10008.1.2.1.99"
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def pixel_size_problem(header: Any, file_size: int, max_decoded_bytes: int) -> PixelProblem | None:
    """Check a header read with deferred Pixel Data (`dcmread(defer_size=...)`).

    - decoded size (Rows x Columns x Samples x ceil(BitsAllocated/8) x Frames) above
      `max_decoded_bytes`: 0xA700, whatever the transfer syntax (a small JPEG can declare it);
    - native Pixel Data whose length differs from what its attributes say (one padding byte
      allowed), or that runs past the end of the file: 0xC000.
    """
    element = header.get_item(0x7FE00010, keep_deferred=True)
    if element is None:
        return None
    decoded = declared_decoded_bytes(header)
    if decoded is None:
        return PixelProblem(
            CANNOT_UNDERSTAND,
            "pixel data without valid (positive integer) Rows, Columns, SamplesPerPixel,"
            " BitsAllocated or NumberOfFrames",
            {},
        )
    if max_decoded_bytes and decoded > max_decoded_bytes:
        return PixelProblem(
            OUT_OF_RESOURCES, "decoded size larger than node.max_decoded_mb", {"decoded": decoded}
        )
    length = element.length
    if length == 0xFFFFFFFF:
        return None  # encapsulated: fragments, checked when decoded
    # Valid, as declared_decoded_bytes said: the packed length (BitsAllocated 1 packs 8 a byte).
    bits = int(header.BitsAllocated)
    expected = math.ceil(decoded // math.ceil(bits / 8) * bits / 8)
    if length not in (expected, expected + (expected & 1)):
        return PixelProblem(
            CANNOT_UNDERSTAND,
            "native pixel data length differs from Rows x Columns x SamplesPerPixel x "
            "BitsAllocated x NumberOfFrames",
            {"length": length, "expected": expected},
        )
    syntax = str(getattr(header.file_meta, "TransferSyntaxUID", ""))
    tell = getattr(element, "value_tell", None)
    if syntax != DEFLATED and tell is not None and tell + length > file_size:
        return PixelProblem(
            CANNOT_UNDERSTAND,
            "pixel data runs past the end of the dataset",
            {"length": length, "present": max(0, file_size - tell)},
        )
    return None
