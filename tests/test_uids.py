"""UID and pseudonym mapping: deterministic under one secret, stable across restarts."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from deid_node.deid.uids import Pseudonymizer, load_or_create_secret
from deid_node.errors import ConfigError, DeidentificationError

SECRET = bytes(range(32))


def test_secret_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    data_dir = tmp_path / "var" / "node"
    secret = load_or_create_secret(data_dir)
    key = data_dir / "secret.key"
    assert len(secret) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert load_or_create_secret(data_dir) == secret
    assert [p.name for p in data_dir.iterdir()] == ["secret.key"]  # no temporary left behind
    assert load_or_create_secret(tmp_path / "other") != secret


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_secret(tmp_path)
    os.chmod(tmp_path / "secret.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_secret(tmp_path)


def test_truncated_secret_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "secret.key"
    key.write_bytes(b"short")
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="expected 32 bytes"):
        load_or_create_secret(tmp_path)


def test_uid_is_deterministic_valid_and_secret_dependent() -> None:
    keys = Pseudonymizer(SECRET)
    original = "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678"
    uid = keys.uid(original)
    assert re.fullmatch(r"2\.25\.(0|[1-9][0-9]*)", uid)
    assert len(uid) <= 64
    assert keys.uid(original) == uid
    assert keys.uid(original + "\x00") == uid  # UI padding is not part of the value
    assert keys.uid(original[:-1] + "9") != uid
    assert Pseudonymizer(b"x" * 32).uid(original) != uid


def test_same_secret_gives_same_values_after_restart(tmp_path: Path) -> None:
    first = Pseudonymizer(load_or_create_secret(tmp_path))
    second = Pseudonymizer(load_or_create_secret(tmp_path))
    for method in ("uid", "patient_id", "patient_name", "date_shift_days"):
        assert getattr(first, method)("PID-1") == getattr(second, method)("PID-1")


def test_patient_pseudonyms() -> None:
    keys = Pseudonymizer(SECRET, patient_id_prefix="STUDY7-")
    pid = keys.patient_id("PID12345")
    assert re.fullmatch(r"STUDY7-[0-9A-F]{16}", pid)
    assert keys.patient_id("PID12345") == pid
    assert keys.patient_id("PID12346") != pid
    assert "PID12345" not in pid
    assert keys.patient_name("PID12345") == pid


def test_date_shift_is_per_patient_nonzero_and_bounded() -> None:
    keys = Pseudonymizer(SECRET)
    shifts = [keys.date_shift_days(f"P{i}") for i in range(2000)]
    assert all(1 <= abs(s) <= 365 for s in shifts)
    assert min(shifts) < 0 < max(shifts)
    assert len(set(shifts)) > 300
    assert keys.date_shift_days("P7") == shifts[7]


def test_lookup_table_values_and_unknown_id(tmp_path: Path) -> None:
    table = tmp_path / "lookup.csv"
    table.write_text("original_id,research_id\nPID12345,SUBJ-001\n PID999 , SUBJ^002\n")
    keys = Pseudonymizer(SECRET, lookup_table=table)
    assert keys.patient_id("PID12345") == "SUBJ-001"
    assert keys.patient_id("PID999") == "SUBJ^002"
    assert keys.patient_name("PID999") == "SUBJ 002"  # ^ would split a PN into components
    with pytest.raises(DeidentificationError) as excinfo:
        keys.patient_id("SECRETPID4242")
    assert "SECRETPID4242" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("PID1,SUBJ1\nPID1,SUBJ2\n", "line 2: duplicate"),
        ("PID1\n", "line 1: expected two"),
        ("PID1,\n", "line 1: expected two"),
        ("PID1," + "S" * 65 + "\n", "at most 64"),
    ],
)
def test_bad_lookup_table_names_the_line_not_the_value(
    tmp_path: Path, content: str, message: str
) -> None:
    table = tmp_path / "lookup.csv"
    table.write_text(content)
    with pytest.raises(ConfigError, match=message) as excinfo:
        Pseudonymizer(SECRET, lookup_table=table)
    assert "PID1" not in str(excinfo.value)


def test_missing_lookup_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Pseudonymizer(SECRET, lookup_table=tmp_path / "absent.csv")


def test_too_long_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match="patient_id_prefix"):
        Pseudonymizer(SECRET, patient_id_prefix="P" * 49)
