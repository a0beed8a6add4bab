"""The pixel redaction modes (Encord's DeidentifyRedactTextMode), the series policy and the name
of the implicit project."""

from __future__ import annotations

import enum


class DeidentifyRedactTextMode(enum.StrEnum):
    REDACT_ALL_TEXT = "REDACT_ALL_TEXT"
    REDACT_SENSITIVE_TEXT = "REDACT_SENSITIVE_TEXT"
    REDACT_NO_TEXT = "REDACT_NO_TEXT"

    def __str__(self) -> str:
        return self.value


class SeriesPolicy(enum.StrEnum):
    ALL = "all"  # forward only if every instance of the series passes
    PER_INSTANCE = "per_instance"  # forward the instances that pass

    def __str__(self) -> str:
        return self.value


# The project every config without [[projects]] has: the top-level sections, the node's AE title,
# every destination, and the installation secret (data_dir/secret.key).
DEFAULT_PROJECT = "default"
