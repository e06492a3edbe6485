from pathlib import Path

import pytest

from agent.config import env_overrides, load_config
from agent.contract.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return path


def test_valid_file_loads_with_defaults_filled_in(tmp_path):
    config = load_config(write(tmp_path, "model: {path: m.onnx}\nsource: {uri: video.mp4}\n"), {})
    assert config.model.path == Path("m.onnx")
    assert config.source.uri == "video.mp4"
    assert config.detection.confidence == 0.25
    assert config.device_id


def test_environment_overrides_nested_values_with_typed_scalars(tmp_path):
    path = write(tmp_path, "model: {path: m.onnx}\n")
    env = {
        "EDGE_AGENT_DETECTION__CONFIDENCE": "0.4",
        "EDGE_AGENT_DETECTION__CLASSES": "[person, 2]",
        "EDGE_AGENT_DEVICE_ID": "cam-7",
        "UNRELATED": "x",
    }
    config = load_config(path, env)
    assert config.detection.confidence == 0.4
    assert config.detection.classes == ["person", 2]
    assert config.device_id == "cam-7"


def test_every_bad_field_is_named_in_one_message(tmp_path):
    path = write(
        tmp_path,
        "model: {path: m.onnx, threads: -1}\n"
        "detection: {confidnce: 0.3, iou: 2}\n"
        "pipeline: {queue_size: 0}\n"
        "colour: blue\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, {})
    message = str(err.value)
    for fragment in (
        "model.threads",
        "detection.confidnce: unknown key",
        "detection.iou",
        "pipeline.queue_size",
        "colour: unknown key",
        "5 problem(s)",
    ):
        assert fragment in message


def test_missing_model_path_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="model: Field required"):
        load_config(write(tmp_path, "source: {uri: '0'}\n"), {})


def test_unknown_environment_override_is_rejected_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"detection\.colour: unknown key"):
        load_config(
            write(tmp_path, "model: {path: m.onnx}\n"), {"EDGE_AGENT_DETECTION__COLOUR": "red"}
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("model: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "must be a mapping")],
)
def test_malformed_files_get_a_clear_error(tmp_path, text, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), {})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", {})


def test_backoff_bounds_must_be_ordered(tmp_path):
    path = write(
        tmp_path, "model: {path: m}\nsource: {reconnect_initial_s: 10, reconnect_max_s: 1}\n"
    )
    with pytest.raises(ConfigError, match="reconnect_max_s must be >= reconnect_initial_s"):
        load_config(path, {})


def test_a_link_stall_limit_below_the_ack_timeout_is_refused_naming_both(tmp_path):
    path = write(
        tmp_path,
        "model: {path: m}\nmqtt: {enabled: true, ack_timeout_s: 60}\n"
        "watchdog: {link_stall_s: 30}\n",
    )
    with pytest.raises(ConfigError, match=r"link_stall_s \(30\) must be above .*ack_timeout_s"):
        load_config(path, {})


def test_env_overrides_build_a_tree():
    assert env_overrides(
        {"EDGE_AGENT_A__B": "1", "EDGE_AGENT_A__C": "x", "EDGE_AGENT_CONFIG": "f"}
    ) == {"a": {"b": 1, "c": "x"}}


def test_the_shipped_example_config_is_valid():
    example = Path(__file__).resolve().parents[1] / "systemd" / "agent.example.yaml"
    config = load_config(example, {})
    assert config.model.providers[-1] == "CPUExecutionProvider"
