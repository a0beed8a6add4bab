"""Save conditions: parse them, evaluate them on one dataset, explain the result (Encord's format).

A condition looks at one attribute. Comparisons are case-insensitive. Multi-valued attributes
(ImageType = ORIGINAL\\PRIMARY\\AXIAL) compare per value for IN/NOT_IN/EQUALS, and on the whole
backslash-joined string for SUBSTR/NOT_SUBSTR/REGEX, so that `NOT_SUBSTR PRIMARY` means what
it reads. A missing (or empty) attribute makes every condition false except NOT_EXISTS.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

from deid_node.errors import ConditionError

_TAG_PATTERNS = (
    re.compile(r"^\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)$"),
    re.compile(r"^([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})$"),
)


class SaveDeidentifiedDicomConditionType(enum.StrEnum):
    """Condition types; IN and NOT_SUBSTR are Encord's, the others ours."""

    IN = "IN"
    NOT_SUBSTR = "NOT_SUBSTR"
    NOT_IN = "NOT_IN"
    SUBSTR = "SUBSTR"
    EQUALS = "EQUALS"
    EXISTS = "EXISTS"
    NOT_EXISTS = "NOT_EXISTS"
    REGEX = "REGEX"

    def __str__(self) -> str:
        return self.value


_LIST_TYPES = {SaveDeidentifiedDicomConditionType.IN, SaveDeidentifiedDicomConditionType.NOT_IN}
_NO_VALUE_TYPES = {
    SaveDeidentifiedDicomConditionType.EXISTS,
    SaveDeidentifiedDicomConditionType.NOT_EXISTS,
}


def parse_tag(dicom_tag: str) -> BaseTag:
    """Resolve a keyword (`ImageType`) or a tag (`(0008,0008)`, `00080008`, `0008,0008`)."""
    text = str(dicom_tag).strip()
    for pattern in _TAG_PATTERNS:
        match = pattern.match(text)
        if match:
            return Tag(int(match.group(1), 16), int(match.group(2), 16))
    number = tag_for_keyword(text)
    if number is None:
        raise ConditionError(f"unknown DICOM tag or keyword: {text!r}")
    return Tag(number)


@dataclass(frozen=True)
class SaveDeidentifiedDicomCondition:
    """One save condition. `value` is a string, a list of strings (IN/NOT_IN) or None (EXISTS)."""

    value: Any
    dicom_tag: str
    condition_type: SaveDeidentifiedDicomConditionType = SaveDeidentifiedDicomConditionType.IN
    tag: BaseTag = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        try:
            ctype = SaveDeidentifiedDicomConditionType(str(self.condition_type).upper())
        except ValueError:
            names = ", ".join(t.value for t in SaveDeidentifiedDicomConditionType)
            raise ConditionError(
                f"unknown condition type {self.condition_type!r} (expected one of {names})"
            ) from None
        object.__setattr__(self, "condition_type", ctype)
        object.__setattr__(self, "tag", parse_tag(self.dicom_tag))
        if ctype in _LIST_TYPES:
            if isinstance(self.value, str) or not isinstance(self.value, Sequence):
                raise ConditionError(f"{ctype.value} needs a list of strings as value")
            object.__setattr__(self, "value", [str(v) for v in self.value])
        elif ctype in _NO_VALUE_TYPES:
            if self.value not in (None, "", []):
                raise ConditionError(f"{ctype.value} takes no value")
            object.__setattr__(self, "value", None)
        else:
            if not isinstance(self.value, str):
                raise ConditionError(f"{ctype.value} needs a string as value")
            if ctype is SaveDeidentifiedDicomConditionType.REGEX:
                try:
                    pattern = re.compile(self.value, re.IGNORECASE)
                except re.error as exc:
                    raise ConditionError(f"invalid regular expression: {exc}") from None
                object.__setattr__(self, "_pattern", pattern)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "condition_type": self.condition_type.value,
            "dicom_tag": self.dicom_tag,
        }

    def evaluate(self, ds: Dataset) -> ConditionEvaluation:
        values = tag_values(ds, self.tag)
        shown = "\\".join(values) if values is not None else None
        return ConditionEvaluation(self, shown, self._check(values))

    def _check(self, values: list[str] | None) -> bool:
        ctype = self.condition_type
        if values is None:
            return ctype is SaveDeidentifiedDicomConditionType.NOT_EXISTS
        folded = [v.casefold() for v in values]
        joined = "\\".join(folded)
        if ctype is SaveDeidentifiedDicomConditionType.EXISTS:
            return True
        if ctype is SaveDeidentifiedDicomConditionType.NOT_EXISTS:
            return False
        if ctype in _LIST_TYPES:
            wanted = {v.strip().casefold() for v in self.value}
            hit = any(v in wanted for v in folded)
            return hit if ctype is SaveDeidentifiedDicomConditionType.IN else not hit
        if ctype is SaveDeidentifiedDicomConditionType.EQUALS:
            return self.value.strip().casefold() in folded or joined == self.value.casefold()
        if ctype is SaveDeidentifiedDicomConditionType.SUBSTR:
            return self.value.casefold() in joined
        if ctype is SaveDeidentifiedDicomConditionType.NOT_SUBSTR:
            return self.value.casefold() not in joined
        assert self._pattern is not None
        return any(self._pattern.search(v) for v in [*values, "\\".join(values)])


def _subclass(name: str, ctype: SaveDeidentifiedDicomConditionType, doc: str) -> type:
    """Encord-style named classes: same dataclass, condition_type fixed by default."""

    @dataclass(frozen=True)
    class _Named(SaveDeidentifiedDicomCondition):
        condition_type: SaveDeidentifiedDicomConditionType = ctype

    _Named.__name__ = _Named.__qualname__ = name
    _Named.__doc__ = doc
    return _Named


_T = SaveDeidentifiedDicomConditionType
SaveDeidentifiedDicomConditionIn = _subclass(
    "SaveDeidentifiedDicomConditionIn", _T.IN, "Tag value is one of `value`."
)
SaveDeidentifiedDicomConditionNotIn = _subclass(
    "SaveDeidentifiedDicomConditionNotIn", _T.NOT_IN, "No tag value is in `value`."
)
SaveDeidentifiedDicomConditionNotSubstr = _subclass(
    "SaveDeidentifiedDicomConditionNotSubstr",
    _T.NOT_SUBSTR,
    "`value` is not a substring of the tag value.",
)
SaveDeidentifiedDicomConditionSubstr = _subclass(
    "SaveDeidentifiedDicomConditionSubstr", _T.SUBSTR, "`value` is a substring of the tag value."
)
SaveDeidentifiedDicomConditionEquals = _subclass(
    "SaveDeidentifiedDicomConditionEquals", _T.EQUALS, "Tag value equals `value`."
)
SaveDeidentifiedDicomConditionExists = _subclass(
    "SaveDeidentifiedDicomConditionExists", _T.EXISTS, "The tag is present and not empty."
)
SaveDeidentifiedDicomConditionNotExists = _subclass(
    "SaveDeidentifiedDicomConditionNotExists", _T.NOT_EXISTS, "The tag is absent or empty."
)
SaveDeidentifiedDicomConditionRegex = _subclass(
    "SaveDeidentifiedDicomConditionRegex",
    _T.REGEX,
    "The tag value matches the regular expression `value`.",
)


@dataclass(frozen=True)
class ConditionEvaluation:
    condition: SaveDeidentifiedDicomCondition
    tag_value: str | None
    evaluated_value: bool

    def to_dict(self) -> dict[str, Any]:
        """Encord's shape. The value is shown only for attributes that cannot identify anyone
        (ImageType, Modality...); for one the profile de-identifies (PatientID, StudyDate,
        descriptions...) `tag_value` is null and `tag_value_withheld` true."""
        withheld = self.tag_value is not None and not value_is_reportable(self.condition.tag)
        out: dict[str, Any] = {
            "condition": self.condition.to_dict(),
            "tag_value": None if withheld else self.tag_value,
            "evaluated_value": self.evaluated_value,
        }
        if withheld:
            out["tag_value_withheld"] = True
        return out


_REPORTABLE_VRS = frozenset({"CS", "IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UI"})


@functools.lru_cache(maxsize=256)
def value_is_reportable(tag: BaseTag) -> bool:
    """May a report show this attribute's value? Not when PS3.15 Table E.1-1 lists it (any
    action: it is identifying or may be), not for private attributes, and only for coded or
    numeric VRs, or text the de-identifier itself keeps as technical."""
    from deid_node.deid.profile import load_profile_table
    from deid_node.deid.tags import SAFE_TEXT_KEYWORDS

    if load_profile_table().row(int(tag)) is not None:
        return False
    keyword = keyword_for_tag(tag)
    if not keyword:
        return False
    return dictionary_VR(tag) in _REPORTABLE_VRS or keyword in SAFE_TEXT_KEYWORDS


def tag_values(ds: Dataset, tag: BaseTag) -> list[str] | None:
    """The attribute's values as strings, None when absent or empty (sequences: not comparable)."""
    if tag not in ds:
        return None
    elem = ds[tag]
    if elem.VR == "SQ" or elem.value is None or elem.value == "" or elem.value == b"":
        return None
    value = elem.value
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(v) for v in items]


def parse_conditions(
    raw: Iterable[Mapping[str, Any]], where: str = "save_conditions"
) -> list[SaveDeidentifiedDicomCondition]:
    """Build conditions from config tables ({type, value, dicom_tag}); errors name the entry."""
    conditions: list[SaveDeidentifiedDicomCondition] = []
    for index, entry in enumerate(raw):
        label = f"{where}[{index}]"
        if not isinstance(entry, Mapping):
            raise ConditionError(f"{label}: expected a table with type, value, dicom_tag")
        unknown = set(entry) - {"type", "value", "dicom_tag", "condition_type"}
        if unknown:
            raise ConditionError(f"{label}: unknown key(s) {sorted(unknown)}")
        ctype = entry.get("type", entry.get("condition_type"))
        if ctype is None or "dicom_tag" not in entry:
            raise ConditionError(f"{label}: 'type' and 'dicom_tag' are required")
        try:
            conditions.append(
                SaveDeidentifiedDicomCondition(
                    value=entry.get("value"),
                    dicom_tag=str(entry["dicom_tag"]),
                    condition_type=ctype,
                )
            )
        except ConditionError as exc:
            raise ConditionError(f"{label}: {exc}") from None
    return conditions


def evaluate_all(
    conditions: Sequence[SaveDeidentifiedDicomCondition], ds: Dataset
) -> list[ConditionEvaluation]:
    return [condition.evaluate(ds) for condition in conditions]
