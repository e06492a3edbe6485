"""edge-agent as a user runs it: real processes, real files, real signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agent import __version__
from tests import models_for_tests
from tests.conftest import ROOT, run_cli


def assert_user_error(result, fragment, code=1):
    assert result.returncode == code, result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"edge-agent {__version__}"
    helptext = run_cli("--help").stdout
    for command in ("run", "detect", "bench", "demo", "config"):
        assert command in helptext


def test_detect_prints_json_for_each_image(fp32_model, shared):
    result = run_cli(
        "detect",
        "--model",
        str(fp32_model),
        "--json",
        str(shared / "images" / "bus.jpg"),
        str(shared / "images" / "zidane.jpg"),
    )
    assert result.returncode == 0, result.stderr
    bus, zidane = (json.loads(line) for line in result.stdout.splitlines())
    assert sorted(d["label"] for d in bus["detections"]) == [
        "bus",
        "person",
        "person",
        "person",
        "person",
    ]
    assert sorted(d["label"] for d in zidane["detections"]) == ["person", "person", "tie"]
    assert (bus["width"], bus["height"]) == (810, 1080)


def test_detect_class_filter_and_text_output(fp32_model, shared):
    result = run_cli(
        "detect", "--model", str(fp32_model), "--classes", "bus", str(shared / "images" / "bus.jpg")
    )
    assert result.returncode == 0
    assert "1 detection(s)" in result.stdout and "bus" in result.stdout


def test_detect_reports_unreadable_images_and_still_does_the_rest(tmp_path, fp32_model, shared):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    result = run_cli(
        "detect", "--model", str(fp32_model), str(bad), str(shared / "images" / "bus.jpg")
    )
    assert_user_error(result, f"cannot decode image {bad}")
    assert "5 detection(s)" in result.stdout


@pytest.mark.parametrize("problem", ["missing", "corrupt", "classifier"])
def test_detect_refuses_bad_models_cleanly(tmp_path, shared, problem):
    path = tmp_path / "model.onnx"
    if problem == "corrupt":
        path.write_bytes(b"\x08\x07garbage" * 100)
    elif problem == "classifier":
        models_for_tests.classifier(path)
    expected = {
        "missing": "model file not found",
        "corrupt": "not a valid ONNX model",
        "classifier": "YOLOv8 detect head",
    }[problem]
    assert_user_error(
        run_cli("detect", "--model", str(path), str(shared / "images" / "bus.jpg")), expected
    )


def test_detect_rejects_unknown_classes(fp32_model, shared):
    result = run_cli(
        "detect",
        "--model",
        str(fp32_model),
        "--classes",
        "unicorn",
        str(shared / "images" / "bus.jpg"),
    )
    assert_user_error(result, "unknown classes 'unicorn'")


def test_bad_arguments_exit_2_with_usage():
    result = run_cli("bench", "--model", "m.onnx", "--frames", "-3")
    assert result.returncode == 2 and "must be positive" in result.stderr


def test_config_check_names_every_problem(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("model: {path: m.onnx}\ndetection: {iou: 7, colour: red}\n")
    result = run_cli("config", "check", str(path))
    assert_user_error(result, "detection.iou")
    assert "detection.colour: unknown key" in result.stderr


def test_config_check_names_the_cameras_of_a_multi_camera_file(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        "model: {path: m.onnx}\n"
        "cameras: [{name: gate, uri: 'rtsp://10.0.0.21/s'}, {name: shelf, uri: shelf.mp4}]\n"
    )
    result = run_cli("config", "check", str(path))
    assert result.returncode == 0
    assert "cameras gate (rtsp://10.0.0.21/s), shelf (shelf.mp4)" in result.stdout


def test_config_check_accepts_a_good_file_and_show_prints_effective_values(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: cam-1\nmodel: {path: m.onnx}\n")
    assert run_cli("config", "check", str(path)).returncode == 0
    shown = run_cli("config", "show", "-c", str(path), env={"EDGE_AGENT_DETECTION__IOU": "0.6"})
    assert shown.returncode == 0
    assert "device_id: cam-1" in shown.stdout and "iou: 0.6" in shown.stdout


def write_config(tmp_path, fp32_model, source, **extra):
    lines = [
        f"state_dir: {tmp_path / 'state'}",
        f"model: {{path: {fp32_model}}}",
        f"source: {json.dumps(source)}",
        f"sinks: {{jsonl: {tmp_path / 'out.jsonl'}, every_frame: true}}",
        "pipeline: {summary_interval_s: 0.5}",
    ] + [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / "agent.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_processes_a_video_into_json_lines(tmp_path, fp32_model, bus_video):
    config = write_config(tmp_path, fp32_model, {"uri": str(bus_video), "pace": "fast"})
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["frame_id"] for r in records] == list(range(24))
    assert records[0]["model"]["name"] == "yolov8n-coco-fp32"


def test_run_with_a_source_that_never_opens_exits_non_zero(tmp_path, fp32_model):
    config = write_config(
        tmp_path,
        fp32_model,
        {
            "uri": "rtsp://127.0.0.1:9/nothing",
            "max_reconnects": 1,
            "stall_timeout_s": 1,
            "reconnect_initial_s": 0.1,
        },
    )
    result = run_cli("run", "-c", str(config), timeout=60)
    assert_user_error(result, "giving up")


def test_run_with_bad_config_exits_non_zero(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("model: {path: /nope.onnx}\npipeline: {queue_size: 0}\n")
    assert_user_error(run_cli("run", "-c", str(path)), "pipeline.queue_size")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_run_stops_cleanly_on_signals(tmp_path, fp32_model, bus_video, signum):
    config = write_config(
        tmp_path, fp32_model, {"uri": str(bus_video), "pace": "realtime", "loop": True}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = tmp_path / "out.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.1)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert "stopping" in stderr and "Traceback" not in stderr
    lines = out.read_text().splitlines()
    assert lines and all(json.loads(line)["schema"] for line in lines)  # no torn last line


def test_demo_without_shared_data_says_what_to_pass(tmp_path):
    result = run_cli("demo", "--no-services", "--shared", str(tmp_path))
    assert_user_error(result, "--model PATH/yolov8n-coco-fp32.onnx --source", code=2)


def test_demo_runs_end_to_end_and_prints_a_latency_summary(shared, tmp_path):
    result = run_cli(
        "demo", "--no-services", "--frames", "15", env={"XDG_CACHE_HOME": str(tmp_path)}
    )
    assert result.returncode == 0, result.stderr
    assert "processed 15 frames" in result.stdout
    assert "inference" in result.stdout and "p95 ms" in result.stdout
    assert "bus" in result.stdout or "person" in result.stdout


def test_bench_json_reports_every_figure(fp32_model, shared, tmp_path):
    result = run_cli(
        "bench",
        "--model",
        str(fp32_model),
        "--frames",
        "8",
        "--rounds",
        "1",
        "--json",
        env={"XDG_CACHE_HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source_frame"] == {"width": 1920, "height": 1080}
    assert report["bare_inference_fps"] > 0 and report["pipeline_fps"] > 0
    assert report["pipeline_over_bare"] > 0
    assert set(report["stage_p50_ms"]) >= {"capture", "preprocess", "inference", "postprocess"}
    assert report["pre_post_isolated"]["sum_p50_ms"] > 0


def test_cli_module_runs_without_shared_for_help(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_SHARED"}
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0 and "--shared" in result.stdout


def test_config_show_masks_the_mqtt_password(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        "model: {path: m.onnx}\nmqtt: {enabled: true, username: dev, password: hunter2}\n"
    )
    shown = run_cli("config", "show", "-c", str(path))
    assert shown.returncode == 0
    assert "hunter2" not in shown.stdout and "password: '**********'" in shown.stdout
    from_env = run_cli(
        "config", "show", "-c", str(path), env={"EDGE_AGENT_MQTT__PASSWORD": "s3cret"}
    )
    assert "s3cret" not in from_env.stdout


def test_config_rejects_password_and_password_file_together(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("model: {path: m.onnx}\nmqtt: {password: a, password_file: /etc/pw}\n")
    result = run_cli("config", "check", str(path))
    assert result.returncode == 1 and "give password or password_file, not both" in result.stderr
