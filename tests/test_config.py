"""Config: the shipped file loads, every key named in the issue works, errors name the key."""

from pathlib import Path

import pytest

from deid_node.config import load_config, parse_config
from deid_node.errors import ConfigError
from deid_node.modes import DeidentifyRedactTextMode, SeriesPolicy

REPO = Path(__file__).resolve().parents[1]

ISSUE_EXAMPLE = """
[node]
ae_title = "DEID_NODE"
host = "0.0.0.0"
port = 11112
data_dir = "var"
allowed_calling_aets = []
[series]
stable_seconds = 30
policy = "all"
[deid]
redact_dicom_tags = true
redact_pixels_mode = "REDACT_ALL_TEXT"
[[save_conditions]]
type = "NOT_SUBSTR"
value = "PRIMARY"
dicom_tag = "ImageType"
[[save_conditions]]
type = "IN"
value = ["CT", "PT", "NM", "MR", "MG"]
dicom_tag = "Modality"
[[destinations]]
name = "research"
type = "dicom"
ae_title = "RESEARCH_PACS"
host = "127.0.0.1"
port = 4242
"""


def test_shipped_config_runs_with_a_folder_destination():
    config = load_config(REPO / "config" / "deid-node.toml")
    assert config.node.port == 11112 and config.node.ae_title == "DEID_NODE"
    assert [d.type for d in config.destinations] == ["folder"]
    assert config.destinations[0].path == (Path.cwd() / "var" / "outbox")
    assert len(config.save_conditions) == 2


def test_issue_example_parses(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(ISSUE_EXAMPLE)
    config = load_config(path)
    assert config.series.policy is SeriesPolicy.ALL
    assert config.series.stable_seconds == 30.0
    assert config.deid.redact_pixels_mode is DeidentifyRedactTextMode.REDACT_ALL_TEXT
    dest = config.destinations[0]
    assert (dest.ae_title, dest.host, dest.port, dest.calling_ae_title) == (
        "RESEARCH_PACS",
        "127.0.0.1",
        4242,
        "DEID_NODE",
    )
    assert [c.condition_type.value for c in config.save_conditions] == ["NOT_SUBSTR", "IN"]
    assert config.node.data_dir.is_absolute()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"node": {"prot": 1}}, "node.prot"),
        ({"node": {"port": 70000}}, "node.port"),
        ({"node": {"port": "11112"}}, "node.port"),
        ({"node": {"ae_title": "A_TITLE_THAT_IS_TOO_LONG"}}, "node.ae_title"),
        ({"node": {"allowed_calling_aets": "CT1"}}, "node.allowed_calling_aets"),
        ({"series": {"policy": "some"}}, "series.policy"),
        ({"series": {"stable_seconds": -1}}, "series.stable_seconds"),
        ({"deid": {"redact_pixels_mode": "REDACT_SOME"}}, "deid.redact_pixels_mode"),
        ({"deid": {"redact_dicom_tags": "yes"}}, "deid.redact_dicom_tags"),
        ({"deid": {"profile_options": ["Retain Everything"]}}, "deid.profile_options"),
        ({"pixels": {"ocr_engine": "tesseract"}}, "pixels.ocr_engine"),
        (
            {"destinations": [{"name": "x", "type": "dicom", "host": "h", "port": 1}]},
            "destinations[0].ae_title",
        ),
        ({"destinations": [{"name": "x", "type": "folder"}]}, "destinations[0].path"),
        ({"destinations": [{"name": "x", "type": "s3", "path": "p"}]}, "destinations[0].type"),
        ({"destinations": [{"type": "folder", "path": "p"}]}, "destinations[0].name"),
        (
            {
                "destinations": [
                    {"name": "x", "type": "folder", "path": "p", "probe_max_seconds": 0}
                ]
            },
            "destinations[0].probe_max_seconds",
        ),
        (
            {"save_conditions": [{"type": "IN", "value": ["CT"], "dicom_tag": "NoSuchTag"}]},
            "save_conditions[0]",
        ),
        ({"extra": {}}, "extra"),
        ({"deid": {"patient_id_prefix": "A\\B"}}, "deid.patient_id_prefix"),
        (
            {
                "deid": {
                    "profile_options": [
                        "Retain Longitudinal Temporal Information Full Dates",
                        "Retain Longitudinal Temporal Information Modified Dates",
                    ]
                }
            },
            "deid.profile_options",
        ),
    ],
)
def test_errors_name_the_bad_key(raw, key):
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert key in str(info.value)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_check_config_reports_bad_key(tmp_path, capsys):
    from deid_node.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[series]\npolicy = 'sometimes'\n")
    assert main(["check-config", "--config", str(bad)]) == 1
    assert "series.policy" in capsys.readouterr().err
