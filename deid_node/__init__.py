"""deid-node: a DICOM de-identification node, batch CLI and Python API (Encord-compatible names)."""

from deid_node.api import deidentify_dicom_files
from deid_node.conditions import (
    SaveDeidentifiedDicomCondition,
    SaveDeidentifiedDicomConditionEquals,
    SaveDeidentifiedDicomConditionExists,
    SaveDeidentifiedDicomConditionIn,
    SaveDeidentifiedDicomConditionNotExists,
    SaveDeidentifiedDicomConditionNotIn,
    SaveDeidentifiedDicomConditionNotSubstr,
    SaveDeidentifiedDicomConditionRegex,
    SaveDeidentifiedDicomConditionSubstr,
    SaveDeidentifiedDicomConditionType,
)
from deid_node.modes import DeidentifyRedactTextMode

__version__ = "0.1.0"

__all__ = [
    "DeidentifyRedactTextMode",
    "SaveDeidentifiedDicomCondition",
    "SaveDeidentifiedDicomConditionEquals",
    "SaveDeidentifiedDicomConditionExists",
    "SaveDeidentifiedDicomConditionIn",
    "SaveDeidentifiedDicomConditionNotExists",
    "SaveDeidentifiedDicomConditionNotIn",
    "SaveDeidentifiedDicomConditionNotSubstr",
    "SaveDeidentifiedDicomConditionRegex",
    "SaveDeidentifiedDicomConditionSubstr",
    "SaveDeidentifiedDicomConditionType",
    "deidentify_dicom_files",
]
