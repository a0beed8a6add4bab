"""Send de-identified instances to a DICOMweb destination by STOW-RS (PS3.18 10.5).

Instances go in bounded multipart/related; type="application/dicom" requests to
{url}/studies, one HTTP client (connection reuse, TLS verified) per destination. The response
is mapped to the same per-instance outcomes as C-STORE: an instance in ReferencedSOPSequence
(or every instance of a 200 without a body) is stored; one in FailedSOPSequence is refused for
good or retried according to its FailureReason, with the same rules as a C-STORE status. A
request the server refuses as a whole for what it contains (400, 409, 413, 415, 422) is sent
again one instance per request, so that only the instance at fault is refused for good.
Authentication, permission and throttling answers (401, 403, 404, 405, 407, 408, 429) and 5xx
are transient: the bytes may be taken once the server or its configuration is fixed. A
connection that cannot be opened means the destination is down (the node then probes it).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import ssl
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from deid_node.config import DestinationConfig
from deid_node.errors import DestinationUnreachableError, ForwardError
from deid_node.forward import OnRefused, OnStored, Outgoing, is_permanent

# A request carries at most this many bytes of instances (one larger instance goes alone).
MAX_REQUEST_BYTES = 64 * 2**20
# Answers about the request as a whole that the same bytes sent again would get again.
_REFUSED_REQUEST = {400, 409, 413, 415, 422}
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

_clients: dict[DestinationConfig, httpx.Client] = {}
_clients_lock = threading.Lock()


def _client(dest: DestinationConfig) -> httpx.Client:
    """One client per destination, kept for connection reuse (thread-safe in httpx)."""
    with _clients_lock:
        client = _clients.get(dest)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if dest.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(dest.ca_file))
                verify.minimum_version = ssl.TLSVersion.TLSv1_2
            client = httpx.Client(
                verify=verify,
                timeout=httpx.Timeout(dest.timeout_seconds),
                limits=httpx.Limits(max_connections=2, max_keepalive_connections=1),
                follow_redirects=False,
            )
            _clients[dest] = client
        return client


@atexit.register
def close_clients() -> None:
    with _clients_lock:
        for client in _clients.values():
            client.close()
        _clients.clear()


def _auth_headers(dest: DestinationConfig) -> dict[str, str]:
    """The credentials, read now from the environment or the token file (never logged)."""
    if dest.auth == "basic":
        password = os.environ.get(dest.password_env)
        if password is None:
            raise ForwardError(f"{dest.name}: environment variable {dest.password_env} is not set")
        pair = base64.b64encode(f"{dest.username}:{password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {pair}"}
    if dest.auth == "bearer":
        if dest.token_file is not None:
            try:
                token = dest.token_file.read_text().strip()
            except OSError as exc:
                raise ForwardError(f"{dest.name}: cannot read token_file: {exc.strerror}") from None
        else:
            token = os.environ.get(dest.token_env, "").strip()
            if not token:
                raise ForwardError(f"{dest.name}: environment variable {dest.token_env} is not set")
        return {"Authorization": f"Bearer {token}"}
    return {}


def instance_url(dest: DestinationConfig, item: Outgoing) -> str:
    return (
        f"{dest.base_url}/studies/{item.study_uid}/series/{item.series_uid}"
        f"/instances/{item.sop_uid}"
    )


def stow(
    dest: DestinationConfig, items: Sequence[Outgoing], on_stored: OnStored, on_refused: OnRefused
) -> None:
    """Send every item (contract of forward.send_batch): on_stored for each one stored,
    on_refused for each refused for good; DestinationUnreachableError when no connection could
    be opened, ForwardError for any transient failure once the rest was offered."""
    headers = _auth_headers(dest)
    transient: list[str] = []
    for chunk in _chunks(dest, items):
        transient += _post(dest, chunk, headers, on_stored, on_refused)
    if transient:
        raise ForwardError(
            f"{dest.name}: {len(transient)} instance(s) not stored: "
            + ", ".join(sorted(set(transient))[:3])
        )


def _chunks(dest: DestinationConfig, items: Sequence[Outgoing]) -> Iterator[list[Outgoing]]:
    chunk: list[Outgoing] = []
    size = 0
    for item in items:
        length = item.path.stat().st_size
        if chunk and (
            len(chunk) >= dest.instances_per_request or size + length > MAX_REQUEST_BYTES
        ):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += length
    if chunk:
        yield chunk


def _post(
    dest: DestinationConfig,
    chunk: list[Outgoing],
    headers: dict[str, str],
    on_stored: OnStored,
    on_refused: OnRefused,
) -> list[str]:
    """One STOW-RS request; returns the reasons of the instances to retry (transient)."""
    boundary = uuid.uuid4().hex
    body = bytearray()
    for item in chunk:
        body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body += item.path.read_bytes()
        body += b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request_headers = {
        **headers,
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json, application/json",
    }
    try:
        response = _client(dest).post(
            f"{dest.base_url}/studies", content=bytes(body), headers=request_headers
        )
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        # The reason (refused, timed out, certificate not verified) names no patient value.
        reason = str(exc)[:200] or type(exc).__name__
        raise DestinationUnreachableError(
            f"{dest.name}: cannot connect to {dest.base_url}: {reason}"
        ) from None
    except httpx.HTTPError as exc:
        raise ForwardError(f"{dest.name}: STOW-RS request failed ({type(exc).__name__})") from None
    code = response.status_code
    if code not in (200, 202) and code not in _REFUSED_REQUEST:
        raise ForwardError(f"{dest.name}: HTTP {code} to STOW-RS")
    failed, referenced = _outcomes(response)
    transient: list[str] = []
    unlisted: list[Outgoing] = []
    for item in chunk:
        if item.sop_uid in failed:
            reason = failed[item.sop_uid]
            text = "no FailureReason" if reason is None else f"FailureReason 0x{reason:04X}"
            if reason is not None and is_permanent(reason):
                on_refused(item, reason, text)
            else:
                transient.append(text)
        elif item.sop_uid in referenced or (code == 200 and not failed):
            on_stored(item, instance_url(dest, item), referenced.get(item.sop_uid, 0))
        else:
            unlisted.append(item)
    if code in (200, 202):
        transient += [f"HTTP {code}, instance not in the response"] * len(unlisted)
    elif len(unlisted) > 1:
        # Refused as a whole without naming the instance at fault: each one alone.
        for item in unlisted:
            transient += _post(dest, [item], headers, on_stored, on_refused)
    elif unlisted:
        on_refused(unlisted[0], None, f"HTTP {code} to STOW-RS")
    return transient


def _outcomes(response: httpx.Response) -> tuple[dict[str, int | None], dict[str, int]]:
    """FailedSOPSequence (UID -> FailureReason) and ReferencedSOPSequence (UID -> warning or 0)
    from a DICOM JSON response; empty when the body is none or not JSON."""
    try:
        body: Any = json.loads(response.content) if response.content else {}
    except ValueError:
        return {}, {}
    if isinstance(body, list):
        body = body[0] if body else {}
    if not isinstance(body, dict):
        return {}, {}
    failed = {
        uid: _us(item, _FAILURE_REASON)
        for item in _sequence(body, _FAILED_SOP_SEQUENCE)
        if (uid := _ui(item, _REFERENCED_SOP_INSTANCE_UID))
    }
    referenced = {
        uid: _us(item, _WARNING_REASON) or 0
        for item in _sequence(body, _REFERENCED_SOP_SEQUENCE)
        if (uid := _ui(item, _REFERENCED_SOP_INSTANCE_UID))
    }
    return failed, referenced


def _sequence(body: dict, tag: str) -> list[dict]:
    value = body.get(tag, {})
    items = value.get("Value", []) if isinstance(value, dict) else []
    return [item for item in items if isinstance(item, dict)]


def _ui(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value", []) if isinstance(item.get(tag), dict) else []
    return str(values[0]) if values else None


def _us(item: dict, tag: str) -> int | None:
    value = _ui(item, tag)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def probe(dest: DestinationConfig, timeout: float) -> bool:
    """Whether the server answers HTTP at the base URL now (any status: it is up, as a rejected
    association is for C-ECHO). Never raises for a peer's fault."""
    try:
        headers = _auth_headers(dest)
    except ForwardError:
        headers = {}
    try:
        _client(dest).get(dest.base_url, headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return False
    return True
