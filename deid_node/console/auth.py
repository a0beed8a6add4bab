"""Console users and sessions: the users file (scrypt hashes), login sessions, CSRF tokens, roles.

The users file is TOML written by `deid-node console add-user`, read again at each login so
that a user added while the node runs can log in at once:

    [users.alice]
    role = "operator"
    hash = "scrypt$16384$8$1$<salt hex>$<hash hex>"

    [tokens.backup-script]        # `deid-node console add-token`: the token is shown once
    role = "viewer"
    sha256 = "<hex of the token's SHA-256>"

Sessions live in the node's memory (a restart logs everybody out); each has its own CSRF token,
sent back in every form and in the X-CSRF-Token header of API calls that change something.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from deid_node.errors import ConfigError

Role = Literal["viewer", "operator"]
# What a refused login was refused for: see the limits below.
Refusal = Literal["name_and_address", "address", "node"]
ROLES: tuple[Role, ...] = ("viewer", "operator")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SESSION_SECONDS = 8 * 3600
# Failed logins are counted per (name, client address): somebody guessing an operator's name
# from another machine locks only themselves out of it, never the operator. Past MAX_FAILURES
# of one (name, address) within LOCK_SECONDS that pair is refused until the oldest of them is
# LOCK_SECONDS old; past MAX_ADDRESS_FAILURES of one address (any names: one host spraying
# names) that address is.
MAX_FAILURES = 5
MAX_ADDRESS_FAILURES = 20
LOCK_SECONDS = 15 * 60
# The bound of the whole node (many addresses guessing at once): past GLOBAL_MAX_FAILURES failed
# logins within GLOBAL_WINDOW_SECONDS, an address with a failure of its own in LOCK_SECONDS is
# refused until the rate falls back; an address without one (the operator's) is still checked.
# An attacker then gets one guess per address, not one per request; IPv6 addresses count by /64
# (one host holds a whole /64).
GLOBAL_MAX_FAILURES = 30
GLOBAL_WINDOW_SECONDS = 60
# Failures remembered at most (memory bound under a flood of fresh addresses).
FAILURES_KEPT = 10_000
# scrypt parameters (RFC 7914's interactive-login figures): ~16 MiB and tens of ms per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        computed = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p)
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed, bytes.fromhex(digest))


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    hash: str


def _read(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"console.users_file: cannot read {path}: {exc}") from None


@dataclass(frozen=True)
class Token:
    name: str
    role: Role
    sha256: str


def load_tokens(path: Path) -> dict[str, Token]:
    tokens = {}
    for name, entry in (_read(path).get("tokens") or {}).items():
        if not isinstance(entry, dict) or entry.get("role") not in ROLES or "sha256" not in entry:
            raise ConfigError(f"console.users_file: {path}: token {name!r} needs a role and sha256")
        tokens[name] = Token(name, entry["role"], str(entry["sha256"]))
    return tokens


def load_users(path: Path) -> dict[str, User]:
    """The users file; empty when it does not exist yet (nobody can log in: add a user)."""
    raw = _read(path)
    users = {}
    for name, entry in (raw.get("users") or {}).items():
        if not isinstance(entry, dict) or entry.get("role") not in ROLES or "hash" not in entry:
            raise ConfigError(f"console.users_file: {path}: user {name!r} needs a role and a hash")
        users[name] = User(name, entry["role"], str(entry["hash"]))
    return users


def add_user(path: Path, name: str, role: str, password: str) -> None:
    """Add or replace a user; the file is written owner-only, atomically."""
    if not NAME_RE.match(name):
        raise ConfigError("console add-user: NAME must be 1-64 of A-Z a-z 0-9 _ . -")
    if role not in ROLES:
        raise ConfigError(f"console add-user: --role must be one of {', '.join(ROLES)}")
    if len(password) < 8:
        raise ConfigError("console add-user: the password needs at least 8 characters")
    users = load_users(path)
    users[name] = User(name, role, hash_password(password))  # type: ignore[arg-type]
    _write(path, users, load_tokens(path))


def add_token(path: Path, name: str, role: str) -> str:
    """Add or replace an API token; returns it (only its SHA-256 is kept)."""
    if not NAME_RE.match(name):
        raise ConfigError("console add-token: NAME must be 1-64 of A-Z a-z 0-9 _ . -")
    if role not in ROLES:
        raise ConfigError(f"console add-token: --role must be one of {', '.join(ROLES)}")
    token = "dn_" + secrets.token_urlsafe(32)
    tokens = load_tokens(path)
    tokens[name] = Token(name, role, _token_hash(token))  # type: ignore[arg-type]
    _write(path, load_users(path), tokens)
    return token


def _token_hash(token: str) -> str:
    # A random 256-bit token needs no slow hash: SHA-256 cannot be searched back.
    return hashlib.sha256(token.encode()).hexdigest()


def _write(path: Path, users: dict[str, User], tokens: dict[str, Token]) -> None:
    lines = ["# deid-node console users and API tokens: written by `deid-node console`.", ""]
    for user in users.values():
        lines += [f"[users.{user.name}]", f'role = "{user.role}"', f'hash = "{user.hash}"', ""]
    for tok in tokens.values():
        lines += [f"[tokens.{tok.name}]", f'role = "{tok.role}"', f'sha256 = "{tok.sha256}"', ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write("\n".join(lines))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Session:
    user: str
    role: Role
    csrf: str
    expires: float
    bearer: bool = False  # an API token: no cookie, so no CSRF to guard against

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


class Sessions:
    """Logged-in sessions by their cookie value, and the failed logins that throttle new ones."""

    def __init__(
        self,
        users_file: Path,
        *,
        max_failures: int = MAX_FAILURES,
        max_address_failures: int = MAX_ADDRESS_FAILURES,
        global_max_failures: int = GLOBAL_MAX_FAILURES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.users_file = users_file
        self.max_failures = max_failures
        self.max_address_failures = max_address_failures
        self.global_max_failures = global_max_failures
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        # (when, name, address key) of each failed login, oldest first.
        self._failures: deque[tuple[float, str, str]] = deque(maxlen=FAILURES_KEPT)
        self._lock = threading.Lock()

    def refusal(self, name: str, address: str | None) -> Refusal | None:
        """Why a login of `name` from `address` is refused without a password check, or None."""
        now, where = self._clock(), address_key(address)
        with self._lock:
            while self._failures and self._failures[0][0] <= now - LOCK_SECONDS:
                self._failures.popleft()
            pair = from_address = last_minute = 0
            for at, who, key in self._failures:
                if key == where:
                    from_address += 1
                    pair += who == name
                last_minute += at > now - GLOBAL_WINDOW_SECONDS
        if pair >= self.max_failures:
            return "name_and_address"
        if from_address >= self.max_address_failures:
            return "address"
        if last_minute >= self.global_max_failures and from_address:
            return "node"
        return None

    def known(self, name: str) -> bool:
        return name in load_users(self.users_file)

    def login(self, name: str, password: str, address: str | None = None) -> str | None:
        """A new session id when the name and password match, else None (a failure counted
        against this name and client address)."""
        user = load_users(self.users_file).get(name)
        # A check of the same cost when the user does not exist: no timing hint of who does.
        stored = user.hash if user else hash_password(secrets.token_hex(8))
        if not verify_password(password, stored) or user is None:
            with self._lock:
                self._failures.append((self._clock(), name[:64], address_key(address)))
            return None
        sid = secrets.token_urlsafe(32)
        where = address_key(address)
        with self._lock:
            # The operator's own mistypes from here are forgiven; nobody else's count.
            kept = [f for f in self._failures if not (f[1] == user.name and f[2] == where)]
            self._failures = deque(kept, maxlen=FAILURES_KEPT)
            self._sessions[sid] = Session(
                user.name, user.role, secrets.token_urlsafe(32), self._clock() + SESSION_SECONDS
            )
        return sid

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._sessions.get(sid)
            if session is not None and session.expires < self._clock():
                del self._sessions[sid]
                return None
            return session

    def from_bearer(self, authorization: str | None) -> Session | None:
        """The session of an `Authorization: Bearer TOKEN` header, or None."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = _token_hash(authorization[7:].strip())
        for tok in load_tokens(self.users_file).values():
            if hmac.compare_digest(tok.sha256, digest):
                return Session(f"token:{tok.name}", tok.role, "", time.time() + 60, bearer=True)
        return None

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


def csrf_ok(session: Session, token: str | None) -> bool:
    if session.bearer:
        return True
    return bool(token) and bool(session.csrf) and hmac.compare_digest(session.csrf, str(token))


def address_key(address: str | None) -> str:
    """The client address failures are counted under: an IPv6 address by its /64."""
    if not address:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)
