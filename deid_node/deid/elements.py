"""Element values as text, and the VR groups and keyword look-ups that the identifying values
(`deid.identifiers`), the residual scan (`deid.residual`) and the profile (`deid.tags`) share.

A leaf of `deid`: it imports nothing of ours.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})


@cache
def tag_of(keyword: str) -> int:
    """The tag of a dictionary keyword, looked up once; KeyError for an unknown keyword."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


def element_values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def value_text(value: Any) -> str:
    """A value as text: bytes read as latin-1 (every byte a character), anything else str()."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return str(value)
