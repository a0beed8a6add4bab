"""PS3.15 Annex E as data: Table E.1-1 actions, safe private attributes and option codes.

The tables are loaded from the CSV copies in `deid_node/deid/data/`; nothing here retypes the
standard. `ProfileTable.action()` answers "what does the profile (with these options) do to this
tag", leaving the meaning of each action to `deid.tags`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from deid_node.modes import PROFILE_OPTIONS

PROFILE_CSV = "ps3.15-table-e.1-1.csv"
SAFE_PRIVATE_CSV = "ps3.15-table-e.3.10-1-safe-private.csv"

# PROFILE_OPTIONS name -> (Table E.1-1 column, DCM code value, code meaning).
OPTIONS: dict[str, tuple[str, str, str]] = {
    "Retain Safe Private": ("retain_safe_private", "113111", "Retain Safe Private Option"),
    "Retain UIDs": ("retain_uids", "113110", "Retain UIDs Option"),
    "Retain Device Identity": ("retain_device_identity", "113109", "Retain Device Identity Option"),
    "Retain Institution Identity": (
        "retain_institution_identity",
        "113112",
        "Retain Institution Identity Option",
    ),
    "Retain Patient Characteristics": (
        "retain_patient_characteristics",
        "113108",
        "Retain Patient Characteristics Option",
    ),
    "Retain Longitudinal Temporal Information Full Dates": (
        "retain_long_full_dates",
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "Retain Longitudinal Temporal Information Modified Dates": (
        "retain_long_modified_dates",
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "Clean Descriptors": ("clean_descriptors", "113105", "Clean Descriptors Option"),
    "Clean Structured Content": (
        "clean_structured_content",
        "113104",
        "Clean Structured Content Option",
    ),
    "Clean Graphics": ("clean_graphics", "113103", "Clean Graphics Option"),
}
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
CLEAN_PIXEL_DATA_CODE = ("113101", "Clean Pixel Data Option")

ACTIONS = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})
# When two selected options disagree on a row (e.g. Full Dates K vs Modified Dates C), the one
# that keeps more wins: the user asked to retain it, and the residual scan still runs.
_PRECEDENCE = ("K", "C")

_TAG = re.compile(r"^\(([0-9A-F]{4}),([0-9A-F]{4})\)$")
_SAFE_TAG = re.compile(r"^\(([0-9A-F]{4}),XX([0-9A-F]{2})\)$")

assert set(OPTIONS) == set(PROFILE_OPTIONS), "OPTIONS must cover config.PROFILE_OPTIONS"


@dataclass(frozen=True)
class ProfileRow:
    """One row of Table E.1-1: a tag (or a mask such as `(60XX,3000)`) and its actions."""

    tag: str
    name: str
    in_std_iod: bool
    basic: str
    # Only the option columns that change the action: column name -> action.
    options: dict[str, str] = field(default_factory=dict)

    def action(self, columns: Iterable[str]) -> str:
        chosen = [self.options[c] for c in columns if c in self.options]
        for preferred in _PRECEDENCE:
            if preferred in chosen:
                return preferred
        return chosen[0] if chosen else self.basic


@dataclass(frozen=True)
class ProfileTable:
    rows: tuple[ProfileRow, ...]
    by_tag: dict[int, ProfileRow]
    curve: ProfileRow  # (50XX,XXXX)
    overlay_data: ProfileRow  # (60XX,3000)
    overlay_comments: ProfileRow  # (60XX,4000)
    private: ProfileRow  # (GGGG,EEEE) WHERE GGGG IS ODD

    def row(self, tag: int) -> ProfileRow | None:
        """The row for a concrete tag, masks included; None when Table E.1-1 does not list it."""
        row = self.by_tag.get(tag)
        if row is not None:
            return row
        group, element = tag >> 16, tag & 0xFFFF
        if group & 1:
            return self.private
        if 0x5000 <= group <= 0x501E:
            return self.curve
        if 0x6000 <= group <= 0x601E:
            if element == 0x3000:
                return self.overlay_data
            if element == 0x4000:
                return self.overlay_comments
        return None


@dataclass(frozen=True)
class SafePrivate:
    """Table E.3.10-1, keyed by (group, private creator, element offset within the block)."""

    keys: frozenset[tuple[int, str, int]]
    rows: int

    def is_safe(self, group: int, creator: str, offset: int) -> bool:
        return (group, normalize_creator(creator), offset) in self.keys


def normalize_creator(creator: str) -> str:
    # Creators are compared as the standard lists them, ignoring padding and case that vendors
    # are inconsistent about.
    return creator.strip(" \x00").casefold()


def option_columns(options: Iterable[str]) -> tuple[str, ...]:
    """Map PROFILE_OPTIONS names to Table E.1-1 column names (unknown names raise KeyError)."""
    return tuple(OPTIONS[name][0] for name in options)


def _read_csv(name: str) -> list[dict[str, str]]:
    text = resources.files("deid_node.deid").joinpath("data", name).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines(keepends=True)))


@cache
def load_profile_table() -> ProfileTable:
    columns = [column for column, _, _ in OPTIONS.values()]
    rows: list[ProfileRow] = []
    by_tag: dict[int, ProfileRow] = {}
    masks: dict[str, ProfileRow] = {}
    for number, raw in enumerate(_read_csv(PROFILE_CSV), start=2):
        actions = {c: raw[c].strip() for c in columns if raw[c].strip()}
        basic = raw["basic"].strip()
        for action in (basic, *actions.values()):
            if action not in ACTIONS:
                raise ValueError(f"{PROFILE_CSV} row {number}: unknown action {action!r}")
        row = ProfileRow(
            tag=raw["tag"].strip(),
            name=" ".join(raw["name"].split()),
            in_std_iod=raw["in_std_iod"].strip() == "Y",
            basic=basic,
            options=actions,
        )
        rows.append(row)
        match = _TAG.match(row.tag)
        if match:
            by_tag[int(match[1] + match[2], 16)] = row
        else:
            masks[row.tag] = row
    expected = {"(50XX,XXXX)", "(60XX,3000)", "(60XX,4000)", "(GGGG,EEEE) WHERE GGGG IS ODD"}
    if set(masks) != expected:
        raise ValueError(
            f"{PROFILE_CSV}: expected tag masks {sorted(expected)}, got {sorted(masks)}"
        )
    return ProfileTable(
        rows=tuple(rows),
        by_tag=by_tag,
        curve=masks["(50XX,XXXX)"],
        overlay_data=masks["(60XX,3000)"],
        overlay_comments=masks["(60XX,4000)"],
        private=masks["(GGGG,EEEE) WHERE GGGG IS ODD"],
    )


@cache
def load_safe_private() -> SafePrivate:
    keys = set()
    raw_rows = _read_csv(SAFE_PRIVATE_CSV)
    for number, raw in enumerate(raw_rows, start=2):
        match = _SAFE_TAG.match(raw["tag"].strip().upper())
        if not match:
            raise ValueError(f"{SAFE_PRIVATE_CSV} row {number}: bad tag {raw['tag']!r}")
        keys.add((int(match[1], 16), normalize_creator(raw["private_creator"]), int(match[2], 16)))
    return SafePrivate(keys=frozenset(keys), rows=len(raw_rows))


KEEP_CSV = "keep-public.csv"
REQUIRED_TYPES_CSV = "required-types.csv"
KeepAction = str  # "keep" | "clean" | "remove"
_KEEP_ACTIONS = frozenset({"keep", "clean", "remove"})


@dataclass(frozen=True)
class KeepList:
    """Public attributes that Table E.1-1 does not list and that survive it (default deny).

    `keywords` wins over `vrs`: a keyword row can remove an attribute whose VR is kept, or keep
    one whose VR is not (pixel data, LUTs). "clean" keeps a text value unless it holds an
    identifying value of the instance.
    """

    vrs: dict[str, KeepAction]
    keywords: dict[str, KeepAction]

    def action(self, keyword: str, vr: str) -> KeepAction | None:
        """keep, clean, remove, or None: not on the list, so removed."""
        return self.keywords.get(keyword) or self.vrs.get(vr)


@cache
def load_keep_list() -> KeepList:
    vrs: dict[str, str] = {}
    keywords: dict[str, str] = {}
    for number, raw in enumerate(_read_csv(KEEP_CSV), start=2):
        match, value, action = raw["match"].strip(), raw["value"].strip(), raw["action"].strip()
        if action not in _KEEP_ACTIONS or match not in ("vr", "keyword") or not value:
            raise ValueError(f"{KEEP_CSV} row {number}: bad row {match!r},{value!r},{action!r}")
        target = vrs if match == "vr" else keywords
        if value in target:
            raise ValueError(f"{KEEP_CSV} row {number}: {value} listed twice")
        target[value] = action
    return KeepList(vrs=vrs, keywords=keywords)


@dataclass(frozen=True)
class RequiredTypes:
    """Where an attribute is Type 1 or 2, so that removing it would break the IOD.

    Scopes: `top` (top level of any instance), `enhanced` (top level of an enhanced multi-frame
    instance), `modality:XX` and `has:Keyword` (top level when Modality is XX or Keyword is
    present), `in:Parent` (items of the sequence Parent; `in:*` any sequence) and
    `valuetype:VT` (a content item whose ValueType is VT).
    """

    by_keyword: dict[str, tuple[tuple[str, str], ...]]  # keyword -> ((scope, type), ...)

    @property
    def has_keywords(self) -> frozenset[str]:
        """Keywords whose presence at the top level makes a `has:` scope hold."""
        return frozenset(
            scope[4:]
            for rows in self.by_keyword.values()
            for scope, _ in rows
            if scope[:4] == "has:"
        )

    def top_level(self, keyword: str, scopes: frozenset[str]) -> str | None:
        types = [t for scope, t in self.by_keyword.get(keyword, ()) if scope in scopes]
        return min(types) if types else None

    def nested(self, keyword: str, parent: str, value_type: str | None) -> str | None:
        wanted = {f"in:{parent}", "in:*"}
        if value_type:
            wanted.add(f"valuetype:{value_type}")
        types = [t for scope, t in self.by_keyword.get(keyword, ()) if scope in wanted]
        return min(types) if types else None


_SCOPE = re.compile(r"^(top|enhanced|(modality|has|in|valuetype):[A-Za-z0-9*]+)$")


@cache
def load_required_types() -> RequiredTypes:
    by_keyword: dict[str, list[tuple[str, str]]] = {}
    for number, raw in enumerate(_read_csv(REQUIRED_TYPES_CSV), start=2):
        keyword, kind, scope = raw["keyword"].strip(), raw["type"].strip(), raw["scope"].strip()
        if kind not in ("1", "2") or not _SCOPE.match(scope) or not keyword:
            raise ValueError(f"{REQUIRED_TYPES_CSV} row {number}: bad row")
        by_keyword.setdefault(keyword, []).append((scope, kind))
    return RequiredTypes({k: tuple(v) for k, v in by_keyword.items()})
