"""The PS3.15 tables load completely from the packaged CSVs, and options map to their columns."""

from __future__ import annotations

import csv
from importlib import resources

from pydicom.datadict import tag_for_keyword

from deid_node.config import PROFILE_OPTIONS
from deid_node.deid.profile import (
    ACTIONS,
    OPTIONS,
    PROFILE_CSV,
    SAFE_PRIVATE_CSV,
    load_keep_list,
    load_profile_table,
    load_required_types,
    load_safe_private,
    option_columns,
)


def _csv_rows(name: str) -> list[dict[str, str]]:
    path = resources.files("deid_node.deid").joinpath("data", name)
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_profile_table_has_every_row_of_the_csv() -> None:
    rows = _csv_rows(PROFILE_CSV)
    table = load_profile_table()
    assert len(rows) == 621
    assert len(table.rows) == len(rows)
    assert [r.tag for r in table.rows] == [r["tag"] for r in rows]
    assert [r.basic for r in table.rows] == [r["basic"] for r in rows]
    # 617 concrete tags + 4 masks (curves, overlay data, overlay comments, private)
    assert len(table.by_tag) == 617
    assert all(r.basic in ACTIONS for r in table.rows)


def test_safe_private_table_has_every_row_of_the_csv() -> None:
    rows = _csv_rows(SAFE_PRIVATE_CSV)
    safe = load_safe_private()
    assert len(rows) == 130
    assert safe.rows == 130
    assert len(safe.keys) == 130
    assert safe.is_safe(0x7053, "Philips PET Private Group", 0x00)
    assert safe.is_safe(0x7E01, "HOLOGIC, Inc.", 0x12)
    assert not safe.is_safe(0x7053, "Philips PET Private Group", 0x01)
    assert not safe.is_safe(0x7053, "SOMEONE ELSE", 0x00)


def test_every_config_option_maps_to_a_csv_column() -> None:
    header = _csv_rows(PROFILE_CSV)[0].keys()
    assert set(OPTIONS) == set(PROFILE_OPTIONS)
    assert set(option_columns(PROFILE_OPTIONS)) <= set(header)


def test_lookups_by_tag_and_mask() -> None:
    table = load_profile_table()
    assert table.row(0x00100010).basic == "Z"  # Patient's Name
    assert table.row(0x00100020).basic == "Z/D"  # Patient ID
    assert table.row(0x00080018).action(["retain_uids"]) == "K"
    assert table.row(0x60023000) is table.overlay_data
    assert table.row(0x601E4000) is table.overlay_comments
    assert table.row(0x50001234) is table.curve
    assert table.row(0x00291010) is table.private
    assert table.row(0x00280010) is None  # Rows: not in Table E.1-1


def test_option_column_overrides_basic_and_keep_wins_a_conflict() -> None:
    study_date = load_profile_table().row(0x00080020)
    assert study_date.action([]) == "Z"
    assert study_date.action(["retain_long_modified_dates"]) == "C"
    assert study_date.action(["retain_long_full_dates"]) == "K"
    assert study_date.action(["retain_long_modified_dates", "retain_long_full_dates"]) == "K"
    assert study_date.action(["retain_uids"]) == "Z"


def test_keep_list_and_required_types_name_real_attributes_outside_table_e11() -> None:
    """The keep list only decides what Table E.1-1 does not list (its removals excepted), and
    both data files name attributes pydicom knows, so a typo cannot silently keep nothing."""
    table = load_profile_table()
    keep = load_keep_list()
    assert {"CS", "DS", "SQ", "UI"} <= set(keep.vrs)
    assert not {"OB", "OW", "UN", "LO", "LT", "UT", "PN"} & set(keep.vrs)
    for keyword, action in keep.keywords.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        assert action == "remove" or table.row(tag) is None, keyword
    for keyword in (
        "EncryptedAttributesSequence",
        "DigitalSignaturesSequence",
        "MACParametersSequence",
        "OriginalAttributesSequence",
    ):
        assert keep.action(keyword, "SQ") == "remove"
    assert keep.action("PixelData", "OW") == "keep"
    assert keep.action("SelectorOBValue", "OB") is None  # binary, not listed: removed
    required = load_required_types()
    assert all(tag_for_keyword(k) is not None for k in required.by_keyword)
    assert required.top_level("SeriesDate", frozenset({"top", "modality:PT"})) == "1"
    assert required.top_level("SeriesDate", frozenset({"top"})) is None
    assert required.top_level("ContentDate", frozenset({"top", "enhanced"})) == "1"
    assert required.nested("TextValue", "ContentSequence", "TEXT") == "1"
    assert required.nested("CodeMeaning", "AnyCodeSequence", None) == "1"
