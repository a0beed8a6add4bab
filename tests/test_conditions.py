"""Save conditions: every type, case-insensitivity, multi-valued tags, missing tags, parsing."""

import pytest
from pydicom import Dataset

from deid_node.conditions import (
    SaveDeidentifiedDicomCondition,
    SaveDeidentifiedDicomConditionIn,
    SaveDeidentifiedDicomConditionNotSubstr,
    SaveDeidentifiedDicomConditionType,
    parse_conditions,
    parse_tag,
)
from deid_node.errors import ConditionError


@pytest.fixture
def ds() -> Dataset:
    ds = Dataset()
    ds.Modality = "OPT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription = "Chest CT w/o"
    ds.PatientName = ""
    return ds


def evaluate(ctype: str, value, tag: str, ds: Dataset):
    return SaveDeidentifiedDicomCondition(
        value=value, dicom_tag=tag, condition_type=ctype
    ).evaluate(ds)


@pytest.mark.parametrize(
    ("ctype", "value", "tag", "expected"),
    [
        ("IN", ["CT", "PT"], "Modality", False),  # equality: PT must not match OPT
        ("IN", ["opt"], "Modality", True),  # case-insensitive
        ("IN", ["axial"], "ImageType", True),  # any one value of a multi-valued tag
        ("NOT_IN", ["CT", "PT"], "Modality", True),
        ("NOT_IN", ["primary"], "ImageType", False),
        ("NOT_SUBSTR", "PRIMARY", "ImageType", False),
        ("NOT_SUBSTR", "secondary", "ImageType", True),
        ("SUBSTR", "prim", "ImageType", True),
        ("SUBSTR", "w/o", "SeriesDescription", True),
        ("EQUALS", "opt", "Modality", True),
        ("EQUALS", "OP", "Modality", False),
        ("EQUALS", "original\\primary\\axial", "ImageType", True),
        ("EXISTS", None, "Modality", True),
        ("EXISTS", None, "PatientName", False),  # empty counts as missing
        ("NOT_EXISTS", None, "BodyPartExamined", True),
        ("NOT_EXISTS", None, "Modality", False),
        ("REGEX", r"^chest\b", "SeriesDescription", True),
        ("REGEX", r"^abd", "SeriesDescription", False),
        ("REGEX", r"PRIMARY\\AXIAL$", "ImageType", True),
    ],
)
def test_condition_types(ds, ctype, value, tag, expected):
    assert evaluate(ctype, value, tag, ds).evaluated_value is expected


@pytest.mark.parametrize(
    "ctype", ["IN", "NOT_IN", "NOT_SUBSTR", "SUBSTR", "EQUALS", "EXISTS", "REGEX"]
)
def test_missing_tag_is_false_and_reported_null(ds, ctype):
    value = None if ctype == "EXISTS" else (["x"] if "IN" in ctype else "x")
    result = evaluate(ctype, value, "BodyPartExamined", ds)
    assert result.evaluated_value is False
    assert result.tag_value is None
    assert result.to_dict()["tag_value"] is None


def test_report_shows_multi_value_as_dicom_writes_it(ds):
    result = SaveDeidentifiedDicomConditionNotSubstr(
        value="PRIMARY", dicom_tag="ImageType"
    ).evaluate(ds)
    assert result.to_dict() == {
        "condition": {"value": "PRIMARY", "condition_type": "NOT_SUBSTR", "dicom_tag": "ImageType"},
        "tag_value": "ORIGINAL\\PRIMARY\\AXIAL",
        "evaluated_value": False,
    }


@pytest.mark.parametrize(
    "spelling", ["ImageType", "(0008,0008)", "00080008", "0008,0008", "(0008, 0008)"]
)
def test_tag_spellings(ds, spelling):
    assert parse_tag(spelling) == 0x00080008
    assert (
        SaveDeidentifiedDicomConditionIn(value=["axial"], dicom_tag=spelling)
        .evaluate(ds)
        .evaluated_value
    )


def test_encord_style_classes():
    cond = SaveDeidentifiedDicomConditionIn(value=["ct", "mr"], dicom_tag="Modality")
    assert cond.condition_type is SaveDeidentifiedDicomConditionType.IN
    assert cond.to_dict() == {
        "value": ["ct", "mr"],
        "dicom_tag": "Modality",
        "condition_type": "IN",
    }


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "LIKE", "value": "x", "dicom_tag": "Modality"}, "unknown condition type"),
        ({"type": "IN", "value": "CT", "dicom_tag": "Modality"}, "list of strings"),
        ({"type": "SUBSTR", "value": ["CT"], "dicom_tag": "Modality"}, "string"),
        ({"type": "IN", "value": ["CT"], "dicom_tag": "Modalty"}, "unknown DICOM tag"),
        ({"type": "REGEX", "value": "(", "dicom_tag": "Modality"}, "invalid regular expression"),
        ({"type": "EXISTS", "value": "x", "dicom_tag": "Modality"}, "takes no value"),
        ({"type": "IN", "value": ["CT"]}, "required"),
        ({"type": "IN", "value": ["CT"], "dicom_tag": "Modality", "tag": 1}, "unknown key"),
    ],
)
def test_bad_conditions_name_the_entry(entry, message):
    with pytest.raises(ConditionError, match=message) as info:
        parse_conditions([{"type": "EXISTS", "dicom_tag": "Modality"}, entry])
    assert "save_conditions[1]" in str(info.value)


def test_report_withholds_values_of_identifying_attributes():
    ds = Dataset()
    ds.PatientID = "PIDQX778812"
    ds.StudyDate = "20240312"
    ds.Modality = "CT"
    shown = (
        SaveDeidentifiedDicomCondition(value=["CT"], dicom_tag="Modality").evaluate(ds).to_dict()
    )
    assert shown["tag_value"] == "CT" and "tag_value_withheld" not in shown
    for tag, ctype, value in (("PatientID", "SUBSTR", "QX"), ("StudyDate", "REGEX", "^2024")):
        result = SaveDeidentifiedDicomCondition(
            value=value, dicom_tag=tag, condition_type=ctype
        ).evaluate(ds)
        assert result.evaluated_value is True  # evaluated on the real value...
        reported = result.to_dict()
        assert (
            reported["tag_value"] is None and reported["tag_value_withheld"] is True
        )  # ...never shown


def test_pydicom_does_not_print_invalid_values(capfd):
    """pydicom's validation warnings quote the value; the pipeline silences them."""
    import warnings

    import deid_node.pipeline  # noqa: F401  (configures pydicom on import, as in every worker)

    ds = Dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.PatientBirthDate = "1970-05-17"
        assert str(ds.PatientBirthDate) == "1970-05-17"
    captured = capfd.readouterr()
    assert "1970-05-17" not in captured.err + captured.out
