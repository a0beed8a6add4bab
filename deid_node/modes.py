"""Names and enums that config, conditions, deid and ocr share (a leaf module: it imports none of
them): the pixel redaction modes (Encord's DeidentifyRedactTextMode), the series policy, the name
of the implicit project, the de-identification profile options and the OCR engines."""

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

# PS3.15 Table E.1-1's options, as `[deid] profile_options` names them.
PROFILE_OPTIONS = (
    "Retain Safe Private",
    "Retain UIDs",
    "Retain Device Identity",
    "Retain Institution Identity",
    "Retain Patient Characteristics",
    "Retain Longitudinal Temporal Information Full Dates",
    "Retain Longitudinal Temporal Information Modified Dates",
    "Clean Descriptors",
    "Clean Structured Content",
    "Clean Graphics",
)
OCR_ENGINES = ("rapidocr", "easyocr")
