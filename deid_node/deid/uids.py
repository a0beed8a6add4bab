"""UID and pseudonym mapping: every replacement value is an HMAC of the original under one secret.

The secret lives in `data_dir/secret.key` and never leaves the node; the same secret gives the same
UIDs, patient pseudonyms and date shifts after a restart, so series sent in pieces stay linked.
Nothing here logs or raises with an original value.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from deid_node.errors import ConfigError, DeidentificationError

SECRET_FILE = "secret.key"
SECRET_BYTES = 32
MAX_SHIFT_DAYS = 365

# Domain separation: the same original string gives unrelated values for each purpose.
_UID = b"uid\x00"
_PATIENT = b"patient-id\x00"
_SHIFT = b"date-shift\x00"


def load_or_create_secret(data_dir: Path, name: str = "default") -> bytes:
    """Read a secret, creating it (0600, directory 0700) with 32 random bytes if absent: the
    installation secret data_dir/secret.key for "default" (the implicit project's, from before
    projects existed), else data_dir/secrets/<name>.key, a project's own (or one shared by the
    projects that name it in `secret_name`).

    Creation is atomic and race-free: the key is written to a private temporary file and linked
    into place, so a concurrent start either wins or reads the winner's key.
    """
    data_dir = Path(data_dir)
    folder = data_dir if name == "default" else data_dir / "secrets"
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / (SECRET_FILE if name == "default" else f"{name}.key")
    if not path.exists():
        _create_secret(path)
    return _read_secret(path)


def _create_secret(path: Path) -> None:
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process created it first; use theirs
    finally:
        tmp.unlink()


def _read_secret(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"{path}: permissions {mode:04o} let others read the pseudonymisation key; "
            "chmod 600 it (or remove it to start a new, unlinked pseudonym space)"
        )
    secret = path.read_bytes()
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"{path}: expected {SECRET_BYTES} bytes, found {len(secret)}")
    return secret


class Pseudonymizer:
    """Deterministic replacement values derived from one secret (and an optional lookup table)."""

    def __init__(
        self, secret: bytes, patient_id_prefix: str = "DEID", lookup_table: Path | None = None
    ) -> None:
        if len(secret) < 16:
            raise ConfigError("pseudonymisation secret: must be at least 16 bytes")
        if len(patient_id_prefix) > 48 or "\\" in patient_id_prefix:
            raise ConfigError(
                "deid.patient_id_prefix: at most 48 characters without backslashes "
                "(prefix + 16 hex digits must fit a DICOM LO)"
            )
        self._secret = secret
        self._prefix = patient_id_prefix
        self._table = _load_lookup_table(lookup_table) if lookup_table is not None else None
        self._uids: dict[str, str] = {}

    def _mac(self, domain: bytes, value: str) -> bytes:
        return hmac.new(self._secret, domain + value.encode("utf-8"), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """A "2.25.<int>" UID (at most 44 characters) from the first 128 bits of the HMAC."""
        original = original.strip(" \x00")
        cached = self._uids.get(original)
        if cached is None:
            cached = f"2.25.{int.from_bytes(self._mac(_UID, original)[:16], 'big')}"
            if len(self._uids) < 100_000:
                self._uids[original] = cached
        return cached

    def patient_id(self, original_id: str) -> str:
        """The research ID: the lookup table's value, else prefix + 16 hex digits of the HMAC."""
        original_id = original_id.strip(" \x00")
        if self._table is not None:
            try:
                return self._table[original_id]
            except KeyError:
                raise DeidentificationError(
                    "patient ID not found in the lookup table; add it or remove deid.lookup_table"
                ) from None
        return f"{self._prefix}{self._mac(_PATIENT, original_id)[:8].hex().upper()}"

    def patient_name(self, original_id: str) -> str:
        """The same pseudonym as patient_id, made safe for a PN value (no ^ = \\ separators)."""
        name = self.patient_id(original_id)
        for separator in "^=\\":
            name = name.replace(separator, " ")
        return name

    def date_shift_days(self, original_id: str) -> int:
        """A per-patient shift in [-365, -1] U [1, 365] days; never zero, so dates always move."""
        value = int.from_bytes(self._mac(_SHIFT, original_id.strip(" \x00"))[:8], "big")
        magnitude = value % MAX_SHIFT_DAYS + 1
        return -magnitude if (value >> 32) & 1 else magnitude


def _load_lookup_table(path: Path) -> dict[str, str]:
    """Read "original_id,research_id" rows (an optional header of exactly those names)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"deid.lookup_table: cannot read {path}: {exc.strerror}") from None
    table: dict[str, str] = {}
    for number, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        cells = [cell.strip() for cell in row]
        if number == 1 and [c.lower() for c in cells] == ["original_id", "research_id"]:
            continue
        if len(cells) != 2 or not cells[0] or not cells[1]:
            raise ConfigError(
                f"deid.lookup_table: {path} line {number}: expected two non-empty columns "
                "original_id,research_id"
            )
        original, research = cells
        if len(research) > 64 or "\\" in research:
            raise ConfigError(
                f"deid.lookup_table: {path} line {number}: research_id must be at most "
                "64 characters without backslashes (DICOM LO)"
            )
        if original in table:
            raise ConfigError(f"deid.lookup_table: {path} line {number}: duplicate original_id")
        table[original] = research
    return table
