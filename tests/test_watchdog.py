"""Unattended operation: deadlines, the escalation ladder, sd_notify, SIGHUP, health."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.config import ModelConfig, build_config
from agent.runtime import Agent
from agent.service.notify import Notifier
from agent.service.watchdog import RestartGuard
from agent.vision.backends import load_backend
from tests import models_for_tests
from tests.conftest import AgentProcess, agent_config, run_cli


class Datagrams:
    """A real unix datagram socket, as systemd's NOTIFY_SOCKET is."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract is not None:
            self.sock.bind("\0" + abstract)
            self.address = "@" + abstract
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.2)
        self.received: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, line) for t, line in self.received if line.startswith(prefix)]

    def wait_for(self, prefix: str, timeout: float = 60.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.lines(prefix)
            if found:
                return found[0][0]
            time.sleep(0.05)
        raise AssertionError(f"no {prefix} datagram; got {[line for _, line in self.received]}")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def test_notifier_sends_datagrams_to_a_path_socket_and_the_abstract_namespace(tmp_path):
    for kind in ("path", "abstract"):
        server = (
            Datagrams(tmp_path / "notify.sock")
            if kind == "path"
            else Datagrams(abstract=f"edge-agent-test-{os.getpid()}")
        )
        notifier = Notifier({"NOTIFY_SOCKET": server.address, "WATCHDOG_USEC": "2000000"})
        assert notifier.enabled and notifier.watchdog_interval_s == 1.0
        assert notifier.ready("fps 1") and notifier.watchdog() and notifier.stopping()
        server.wait_for("STOPPING=1", timeout=5)
        assert [line for _, line in server.received] == [
            "READY=1",
            "STATUS=fps 1",
            "WATCHDOG=1",
            "STOPPING=1",
        ]
        notifier.close()
        server.close()


def test_without_notify_socket_everything_is_a_quiet_no_op():
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    assert not notifier.ready() and not notifier.watchdog()


def test_restart_guard_allows_n_per_window_and_remembers_across_restarts(tmp_path):
    clock = [1000.0]
    path = tmp_path / "restarts.json"
    guard = RestartGuard(2, 60, path, clock=lambda: clock[0])
    for _ in range(2):
        assert guard.allow()
        guard.record()
    assert not guard.allow()
    assert not RestartGuard(2, 60, path, clock=lambda: clock[0]).allow()  # a new process remembers
    clock[0] += 61
    assert guard.allow()


class StuckBackend:
    """Answers ``works_for`` inferences, then blocks forever (and cannot be cancelled)."""

    def __init__(self, inner, works_for: int = 0) -> None:
        self.inner, self.info, self.works_for = inner, inner.info, works_for
        self.release = threading.Event()
        self.calls = 0

    def infer(self, tensor):
        self.calls += 1
        if self.calls > self.works_for:
            self.release.wait()
        return self.inner.infer(tensor)

    def close(self) -> None:
        self.release.set()


class CancellableSlowBackend(StuckBackend):
    """Blocks once, but honours cancel() like ONNX Runtime's RunOptions.terminate."""

    def infer(self, tensor):
        self.calls += 1
        if self.calls == self.works_for + 1 and self.release.wait(30):
            raise RuntimeError("Exiting due to terminate flag being set to true")
        return self.inner.infer(tensor)

    def cancel(self) -> None:
        self.release.set()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = models_for_tests.tiny_detector(tmp_path_factory.mktemp("tiny") / "tiny.onnx")
    return path, load_backend("onnxruntime", path, ModelConfig(path=path))


def fast_watchdog_agent(
    tmp_path, tiny_path, video, backend, notify: Datagrams | None, monkeypatch, **watchdog
):
    if notify is not None:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
    config = build_config(
        {
            "device_id": "dev1",
            "state_dir": str(tmp_path / "state"),
            "model": {"path": str(tiny_path)},
            "source": {"uri": str(video), "pace": "realtime", "loop": True, "fps": 20},
            "sinks": {"every_frame": True},
            "watchdog": {
                "check_interval_s": 0.05,
                "inference_timeout_s": 0.5,
                "cancel_grace_s": 0.3,
                "verify_s": 0.6,
                "backoff_s": 0,
                **watchdog,
            },
        },
        "test",
    )
    agent = Agent(config, backend=backend)
    events: list[dict] = []
    agent.events.publish = lambda event: events.append({**event, "monotonic": time.monotonic()})
    return agent, events


def test_a_backend_that_blocks_forever_climbs_the_ladder_in_order(
    tmp_path, tiny, bus_video, monkeypatch
):
    tiny_path, inner = tiny
    notify = Datagrams(tmp_path / "notify.sock")
    first = StuckBackend(inner, works_for=10)
    agent, events = fast_watchdog_agent(tmp_path, tiny_path, bus_video, first, notify, monkeypatch)
    replacements: list[StuckBackend] = []

    def load_stuck():
        replacements.append(StuckBackend(inner))
        return replacements[-1]

    agent._load_backend = load_stuck
    started = time.monotonic()
    code = agent.run()
    assert code == 70
    steps = [e["details"]["step"] for e in events if e["kind"] == "escalation"]
    assert steps == ["reload_backend", "previous_model", "reconnect_link", "exit"]
    skipped = [e for e in events if e["kind"] == "escalation" and not e["details"]["applied"]]
    assert [e["details"]["step"] for e in skipped] == ["reconnect_link"]  # no MQTT here
    assert len(replacements) == 1 and agent.pipeline.abandoned_workers >= 1
    assert events[-1]["level"] == "error"
    # READY after the first frame; WATCHDOG pings while healthy, none once inference hung
    ready = notify.wait_for("READY=1")
    pings = [t for t, _ in notify.lines("WATCHDOG=1")]
    assert pings and min(pings) >= ready
    detected = next(e["monotonic"] for e in events if e["kind"] == "escalation")
    assert all(t <= detected for t in pings)  # no ping once the hang is known
    assert notify.lines("STOPPING=1")
    assert time.monotonic() - started < 30
    health = json.loads((tmp_path / "state" / "health.json").read_text())
    assert health["escalations"] == ["reload_backend", "previous_model", "exit"]
    notify.close()
    for backend in [first, *replacements]:
        backend.release.set()


def test_a_cancellable_backend_is_cancelled_at_the_deadline_and_recovers(
    tmp_path, tiny, bus_video, monkeypatch
):
    tiny_path, inner = tiny
    backend = CancellableSlowBackend(inner, works_for=5)
    agent, events = fast_watchdog_agent(tmp_path, tiny_path, bus_video, backend, None, monkeypatch)
    agent.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and agent.pipeline.stats.frames_out < 20:
        time.sleep(0.1)
    agent.stop()
    agent.shutdown()
    kinds = [e["kind"] for e in events]
    assert "inference_cancelled" in kinds
    assert "escalation" not in kinds  # the cancel was enough
    assert agent.pipeline.stats.frames_out >= 20


def test_ort_runs_really_stop_when_cancelled(fp32_backend):
    import numpy as np

    tensor = np.random.default_rng(0).random((1, 3, 640, 640), dtype=np.float32)
    outcome = {}

    def run():
        started = time.monotonic()
        try:
            fp32_backend.infer(tensor)
            outcome["finished"] = time.monotonic() - started
        except Exception as exc:
            outcome["cancelled"] = (str(exc), time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.005)
    fp32_backend.cancel()
    thread.join(10)
    assert "terminate" in outcome["cancelled"][0]
    fp32_backend.infer(tensor)  # the next run is unaffected


def scripted_live_agent(
    tmp_path, tiny, monkeypatch, captures, source: dict, watchdog: dict, backend=None
):
    """An Agent on a scripted live source (real LiveSource code), reopened from ``captures``."""
    from agent.vision.sources import LiveSource

    tiny_path, inner = tiny
    scripted = iter(captures)
    opened: list[LiveSource] = []

    def open_scripted(config):
        opened.append(LiveSource(config, lambda: next(scripted)))
        return opened[-1]

    monkeypatch.setattr("agent.runtime.open_source", open_scripted)
    config = build_config(
        {
            "device_id": "dev1",
            "state_dir": str(tmp_path / "state"),
            "model": {"path": str(tiny_path)},
            "source": {"uri": "rtsp://camera/stream", **source},
            "sinks": {"jsonl": str(tmp_path / "out.jsonl"), "every_frame": True},
            "watchdog": {"check_interval_s": 0.05, **watchdog},
        },
        "test",
    )
    agent = Agent(config, backend=backend or inner)
    events: list[dict] = []
    agent.events.publish = events.append
    return agent, events, opened


def run_until(agent, done, timeout: float = 20.0) -> None:
    agent.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        time.sleep(0.1)
    agent.stop()
    agent.shutdown()


def test_a_stalled_live_source_is_reported_and_recovers(tmp_path, tiny, monkeypatch):
    from tests.test_sources import ScriptedCapture

    agent, events, _ = scripted_live_agent(
        tmp_path,
        tiny,
        monkeypatch,
        [ScriptedCapture(20, then="stall", interval=0.01), ScriptedCapture(100_000, interval=0.01)],
        {"stall_timeout_s": 0.5, "reconnect_initial_s": 0.05},
        {},
    )
    run_until(agent, lambda: agent.pipeline.stats.frames_out >= 60)
    assert agent.pipeline.stats.frames_out >= 60  # frames flow again after the stall
    assert agent.source.stats.stalls == 1 and agent.source.stats.reconnects >= 1
    assert "source_stalls" in [e["kind"] for e in events]


def test_escalation_guard_backs_off_instead_of_thrashing(tmp_path, tiny, bus_video, monkeypatch):
    tiny_path, inner = tiny
    agent, events = fast_watchdog_agent(
        tmp_path,
        tiny_path,
        bus_video,
        StuckBackend(inner, works_for=3),
        None,
        monkeypatch,
        ladder=["reload_backend", "exit"],
        max_restarts=1,
        backoff_s=1.0,
    )
    agent.supervisor.guards["reload_backend"].record()  # it already ran once in this window
    agent._load_backend = lambda: StuckBackend(inner)
    assert agent.run() == 70
    kinds = [
        (e["kind"], e["details"].get("step")) for e in events if e["kind"].startswith("escalation")
    ]
    assert kinds[0] == ("escalation_guarded", "reload_backend")
    assert kinds[-1] == ("escalation", "exit")


def test_notify_protocol_and_health_of_a_real_agent_process(tmp_path, fp32_model, bus_video):
    notify = Datagrams(tmp_path / "notify.sock")
    config = agent_config(
        tmp_path, fp32_model, {"uri": str(bus_video), "pace": "realtime", "loop": True}
    )
    agent = AgentProcess(config, env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"})
    try:
        extend = notify.wait_for("EXTEND_TIMEOUT_USEC=")
        ready = notify.wait_for("READY=1")
        assert extend <= ready
        time.sleep(3.0)
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert len(pings) >= 4 and max(gaps) < 1.0  # every 0.5 s, within the 1 s WatchdogSec
        assert any(line.startswith("STATUS=fps") for _, line in notify.received)
        healthy = run_cli("health", "-c", str(config))
        assert healthy.returncode == 0 and healthy.stdout.startswith("healthy: fps")
    finally:
        assert agent.stop(signal.SIGTERM) == 0, agent.log()
    notify.wait_for("STOPPING=1", timeout=5)
    notify.close()
    stopped = run_cli("health", "-c", str(config))
    assert stopped.returncode == 1 and "is not running" in stopped.stderr


def test_health_without_an_agent_says_why(tmp_path):
    result = run_cli("health", "--state-dir", str(tmp_path))
    assert result.returncode == 1 and "no health file" in result.stderr


def test_sighup_changes_thresholds_and_keeps_the_model(tmp_path, fp32_model, bus_video):
    config = agent_config(
        tmp_path, fp32_model, {"uri": str(bus_video), "pace": "realtime", "loop": True}
    )
    agent = AgentProcess(config)
    out = tmp_path / "out.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
            not out.exists() or len(out.read_text().splitlines()) < 5
        ):
            time.sleep(0.1)
        before = [json.loads(line) for line in out.read_text().splitlines()]
        assert min(d["score"] for r in before for d in r["detections"]) < 0.6
        config.write_text(
            config.read_text().replace("pipeline:", "detection: {confidence: 0.8}\npipeline:")
        )
        agent.process.send_signal(signal.SIGHUP)
        log = ""
        while time.monotonic() < deadline and "config reloaded" not in log:
            time.sleep(0.1)
            log = agent.log()
        mark = len(out.read_text().splitlines()) + 3  # frames already in flight may predate it
        while time.monotonic() < deadline and len(out.read_text().splitlines()) < mark + 10:
            time.sleep(0.1)
    finally:
        assert agent.stop() == 0, agent.log()
    after = [json.loads(line) for line in out.read_text().splitlines()[mark:]]
    assert after and all(d["score"] > 0.8 for r in after for d in r["detections"])
    assert {r["model"]["version"] for r in before + after} == {before[0]["model"]["version"]}
    assert "model loaded" in agent.log() and agent.log().count("model loaded") == 1


def test_sigterm_flushes_the_outbox_and_loses_nothing(tmp_path, broker, fp32_model, bus_video):
    from tests.brokers import Subscriber
    from tests.test_mqtt import PREFIX, frame_ids, jsonl_ids

    sub = Subscriber(broker.port, [f"{PREFIX}/detections", f"{PREFIX}/status"]).start()
    source = {"uri": str(bus_video), "pace": "fast", "loop": True}
    # a window of one message in flight keeps a queue in the outbox while frames pour in
    agent = AgentProcess(
        agent_config(tmp_path, fp32_model, source, {"port": broker.port, "inflight": 1})
    )
    sub.wait_topic(f"{PREFIX}/detections", timeout=60)
    time.sleep(2.0)
    assert agent.stop(signal.SIGTERM) == 0, agent.log()
    sub.wait_topic(f"{PREFIX}/status", where=lambda m: m.json()["state"] == "stopped")
    expected = jsonl_ids(tmp_path / "out.jsonl")
    got = [frame for _, frame in frame_ids(sub.on(f"{PREFIX}/detections"))]
    sub.stop()
    assert got == expected and len(expected) > 10
    assert "left in the outbox" not in agent.log()


def test_a_silent_source_is_restarted_by_the_ladder_and_recovers(tmp_path, tiny, monkeypatch):
    from tests.test_sources import ScriptedCapture

    # the source's own stall detection is slow here, so the watchdog must act first
    agent, events, opened = scripted_live_agent(
        tmp_path,
        tiny,
        monkeypatch,
        [ScriptedCapture(300, then="stall", interval=0.002)]
        + [ScriptedCapture(100_000, interval=0.01) for _ in range(3)],
        {"stall_timeout_s": 60},
        {"source_stall_s": 0.5, "verify_s": 0.5},
    )
    run_until(agent, lambda: any(e["kind"] == "recovered" for e in events))
    steps = [e["details"].get("step") for e in events if e["kind"] == "escalation"]
    assert steps == ["restart_source"]
    assert len(opened) == 2 and agent.source is opened[1]
    assert agent.source.stats.frames > 10
    # the reopened camera counts from 0 again; the session's frame ids must not (subscribers
    # drop a (session, frame_id) they saw as a resend: the soak lost 110 frames that way)
    ids = [
        json.loads(line)["frame_id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()
    ]
    assert ids == sorted(set(ids)), "frame ids repeat or go back after the source was reopened"


def test_a_crashed_stage_exits_non_zero_so_that_systemd_restarts_the_agent(
    tmp_path, tiny, bus_video, monkeypatch
):
    """The unit restarts on failure only: a stage that died of a bug used to exit 0."""
    tiny_path, inner = tiny
    agent, _ = fast_watchdog_agent(tmp_path, tiny_path, bus_video, inner, None, monkeypatch)
    source = agent.pipeline.source
    real_read, reads = source.read, itertools.count()

    def read(timeout: float = 0.5):
        if next(reads) == 5:
            raise RuntimeError("a bug in the source")
        return real_read(timeout)

    source.read = read
    assert agent.run() == 70  # watchdog.exit_code: EX_SOFTWARE
    assert agent.pipeline.crashed is not None and "a bug in the source" in agent.pipeline.crashed


def test_a_thread_that_dies_for_good_is_reported_and_the_agent_exits_non_zero(
    tmp_path, tiny, bus_video, monkeypatch
):
    tiny_path, inner = tiny
    agent, events = fast_watchdog_agent(tmp_path, tiny_path, bus_video, inner, None, monkeypatch)

    def die_once_running() -> None:
        deadline = time.monotonic() + 60
        while agent.pipeline.stats.frames_out < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        raise RuntimeError("a bug in a background thread")

    threading.Thread(target=die_once_running, name="doomed", daemon=True).start()
    assert agent.run() == 70
    crashed = [e for e in events if e["kind"] == "thread_crashed"]
    assert crashed and crashed[0]["details"]["thread"] == "doomed"
    exits = [e for e in events if e["kind"] == "escalation" and e["details"]["step"] == "exit"]
    assert exits and "thread doomed died" in exits[0]["message"]
    assert threading.excepthook is not None and agent._restore_thread_hook is None


class GarbageBackend(StuckBackend):
    """Answers every inference at once with outputs no decode can read (a broken model)."""

    def infer(self, tensor):
        self.calls += 1
        return np.array(1.0, np.float32)  # decode: IndexError, every frame


def test_frames_that_never_reach_the_sinks_are_a_fault_though_every_stage_is_quick(
    tmp_path, tiny, bus_video, monkeypatch
):
    """Liveness is output: a frozen fps figure once fed the watchdog while nothing came out."""
    tiny_path, inner = tiny
    agent, events = fast_watchdog_agent(tmp_path, tiny_path, bus_video, GarbageBackend(inner),
                                        None, monkeypatch, source_stall_s=0.5)  # fmt: skip
    agent._load_backend = lambda: GarbageBackend(inner)

    def escalated() -> bool:
        return any(e["kind"] == "escalation" for e in events)

    run_until(agent, escalated)
    step = next(e for e in events if e["kind"] == "escalation")
    assert step["details"]["step"] == "reload_backend", step
    assert "no frame reached the sinks" in step["details"]["reason"]
    assert agent.pipeline.stats.frames_in > 5 and agent.pipeline.stats.frames_out == 0


def test_the_recent_fps_falls_to_zero_when_output_stops():
    from agent.vision.stats import PipelineStats

    stats = PipelineStats()
    for tick in range(100):
        stats.mark_out(tick * 0.1)  # 10 fps for 10 s
    assert stats.recent_fps(10.0, 5.0) == pytest.approx(10.0, rel=0.05)
    assert stats.throughput_fps() == pytest.approx(10.0, rel=0.05)
    assert stats.recent_fps(30.0, 5.0) == 0.0  # the run's average would still say 10


class SlowBackend(StuckBackend):
    """Answers every inference, each after ``delay_s``: a device too slow for its camera."""

    def __init__(self, inner, delay_s: float) -> None:
        super().__init__(inner)
        self.delay_s = delay_s

    def infer(self, tensor):
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.infer(tensor)


def test_a_device_too_slow_for_its_camera_says_so_and_is_not_restarted(tmp_path, tiny, monkeypatch):
    """Restarting cannot make a device faster (it used to climb the ladder to exit: a restart
    loop); the camera delivers its 30 fps, the device keeps the newest frame and reports."""
    from tests.test_sources import ScriptedCapture

    agent, events, _ = scripted_live_agent(
        tmp_path, tiny, monkeypatch, [ScriptedCapture(1_000_000, interval=1 / 30)], {},
        {"min_fps_ratio": 0.3, "fps_window_s": 1.0, "verify_s": 0.2},
        backend=SlowBackend(tiny[1], delay_s=0.3),  # about 3 of the camera's 30 fps
    )  # fmt: skip
    degraded_at: list[int] = []

    def degraded_and_more_frames() -> bool:
        if not degraded_at and any(e["kind"] == "degraded" for e in events):
            degraded_at.append(agent.pipeline.stats.frames_out)
        return bool(degraded_at) and agent.pipeline.stats.frames_out >= degraded_at[0] + 10

    run_until(agent, degraded_and_more_frames, timeout=120)
    kinds = [e["kind"] for e in events]
    assert kinds.count("degraded") == 1, kinds
    assert "escalation" not in kinds and not agent.supervisor.steps_taken, events
    degraded = next(e for e in events if e["kind"] == "degraded")
    assert degraded["details"]["fps_in"] > degraded["details"]["fps_out"], degraded


def test_a_camera_that_delivers_far_below_its_rate_is_a_source_fault(tmp_path, tiny, monkeypatch):
    from tests.test_sources import ScriptedCapture

    agent, events, opened = scripted_live_agent(
        tmp_path, tiny, monkeypatch, [ScriptedCapture(1_000_000, interval=0.5) for _ in range(5)],
        {}, {"min_fps_ratio": 0.3, "fps_window_s": 1.0, "verify_s": 0.5},
    )  # fmt: skip

    def restarted() -> bool:
        return any(e["kind"] == "escalation" for e in events) and len(opened) >= 2

    run_until(agent, restarted, timeout=120)
    assert len(opened) >= 2, "the source was not reopened"
    step = next(e for e in events if e["kind"] == "escalation")
    assert step["details"]["step"] == "restart_source", step
    assert "the camera delivers" in step["details"]["reason"], step
    assert not any(e["kind"] == "degraded" for e in events)
