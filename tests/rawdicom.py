"""A DICOM peer at the byte level, for what real tools never send: an A-ASSOCIATE-RQ written by
hand (PS3.8 9.3.2), then PDUs with any declared length. Every read has a timeout."""

from __future__ import annotations

import socket
import struct

VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.9999.1"

PDU_NAMES = {0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ", 0x04: "P-DATA-TF", 0x07: "A-ABORT"}


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def associate_rq(
    called: str = "DEID_NODE", calling: str = "RAWPEER", abstract: str = CT_STORAGE
) -> bytes:
    """An A-ASSOCIATE-RQ proposing `abstract` with Implicit VR Little Endian (context 1)."""
    context = struct.pack(">BBBB", 1, 0, 0, 0)
    context += _item(0x30, abstract.encode()) + _item(0x40, IMPLICIT_LE.encode())
    user = _item(0x51, struct.pack(">L", 16384)) + _item(0x52, IMPLEMENTATION_UID.encode())
    variable = _item(0x10, APPLICATION_CONTEXT.encode()) + _item(0x20, context) + _item(0x50, user)
    fixed = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body = fixed + b"\0" * 32 + variable
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def pdata_tf(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU holding one PDV (control: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return pdu_header(0x04, len(pdv)) + pdv


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int | None, bytes]:
    """The next PDU's type and body; (None, b"") when the peer closed the connection."""
    sock.settimeout(timeout)
    header = _read(sock, 6)
    if len(header) < 6:
        return None, b""
    pdu_type, _, length = struct.unpack(">BBL", header)
    return pdu_type, _read(sock, length)


def closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the peer closes the connection (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _read(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)
