"""Simulated devices for the rollout tests and ``benchmarks/fleet_sim.py``.

Each device is the agent's real OTA client (``ChannelClient``: TUF refresh, variant choice,
rollout hash, download with Range resume and hash verification; ``poll_delay`` and
``announce_delay`` for its jitter) and a real MQTT connection of its own, publishing the
agent's retained ``status`` and ``model`` messages. Only inference is a stand-in: after a
download the device reports probation, then commits or rolls back, as the ``fails`` rule says.

One thread drives every MQTT connection through epoll (paho's own loop uses select(), which
cannot watch more than ~1000 descriptors), a scheduler thread keeps each device's poll and
announce timers, and a small pool of workers does the channel checks.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho

from agent.config import MqttConfig, OtaConfig
from agent.link import announce_spread, encode, model_state, new_client, status
from agent.updates.model_store import Probation, SlotRecord, StoreState
from agent.updates.ota import ChannelClient, OtaError, announce_delay, poll_delay
from agent.vision import BackendInfo


class MqttLoop:
    """Many paho clients on one epoll selector, one thread (paho's external-loop callbacks)."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.clients: list[paho.Client] = []
        self._changes: list[tuple[str, Any, paho.Client | None]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(
            False
        )  # the loop thread wakes itself too: never block on a full pipe
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mqtt-loop", daemon=True)

    def attach(self, client: paho.Client) -> None:
        client.on_socket_open = lambda c, _, sock: self._change("open", sock, c)
        client.on_socket_close = lambda c, _, sock: self._change("close", sock, c)
        client.on_socket_register_write = lambda c, _, sock: self._change("write", sock, c)
        client.on_socket_unregister_write = lambda c, _, sock: self._change("read", sock, c)
        self.clients.append(client)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        self._thread.join(timeout=10)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"x")

    def _change(self, what: str, sock: Any, client: paho.Client) -> None:
        with self._lock:
            self._changes.append((what, sock, client))
        self._wake()

    def _apply_changes(self) -> None:
        with self._lock:
            changes, self._changes = self._changes, []
        for what, sock, client in changes:
            try:
                if what == "open":
                    self.selector.register(sock, selectors.EVENT_READ, client)
                elif what == "close":
                    self.selector.unregister(sock)
                else:
                    events = selectors.EVENT_READ | (
                        selectors.EVENT_WRITE if what == "write" else 0
                    )
                    self.selector.modify(sock, events, client)
            except (KeyError, ValueError, OSError):
                pass  # a socket already closed: its client reconnects through loop_misc

    def _run(self) -> None:
        next_misc = time.monotonic()
        while not self._stop.is_set():
            self._apply_changes()
            for key, mask in self.selector.select(timeout=0.25):
                client = key.data
                if client is None:
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE:
                    client.loop_write()
            if time.monotonic() >= next_misc:  # keepalive pings, retries, reconnects
                next_misc = time.monotonic() + 1.0
                for client in self.clients:
                    client.loop_misc()


class Scheduler:
    """Timers for many devices; due work runs on a small thread pool."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="device")
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def at(self, delay_s: float, job: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._counter), job))
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                if not self._heap or self._heap[0][0] > now:
                    timeout = self._heap[0][0] - now if self._heap else None
                    self._cond.wait(timeout)
                    continue
                _, _, job = heapq.heappop(self._heap)
            self.pool.submit(job)


@dataclass
class FleetSettings:
    broker: MqttConfig
    channel_url: str
    root: Path  # the channel's trusted root.json
    work: Path
    model_name: str = "yolov8n-coco"
    base_version: str = "1.0.0"
    target: str = "cpu-x86_64"
    channel_name: str = "stable"
    announce_jitter_s: float = 30.0
    poll_interval_s: float = 3600.0
    first_check_s: float = 3600.0
    probation_s: float = 2.0
    workers: int = 8
    # which devices fail a release's probation: (device index, version) -> True to fail
    fails: Callable[[int, str], bool] = lambda index, version: False


@dataclass
class Record:
    """What one device did, when (wall clock): for the benchmark's time series."""

    device_id: str
    kind: str  # check, offer, downloaded, probation, committed, rolled_back, error
    version: str | None
    at: float
    detail: dict[str, Any] = field(default_factory=dict)


class SimulatedDevice:
    def __init__(self, index: int, fleet: SimulatedFleet) -> None:
        s = fleet.settings
        self.index, self.fleet = index, fleet
        self.device_id = f"sim-{index:04d}"
        self.session = os.urandom(4).hex()
        self.ota = OtaConfig.model_validate(
            {
                "enabled": True,
                "channel": s.channel_url,
                "root": str(s.root),
                "channel_name": s.channel_name,
                "announce_jitter_s": s.announce_jitter_s,
                "poll_interval_s": s.poll_interval_s,
                "first_check_s": s.first_check_s,
            }
        )
        self.work = s.work / self.device_id
        self.client = ChannelClient(self.ota, self.work / "metadata", self.device_id)
        self.state = StoreState()
        self.running = s.base_version
        self.lock = threading.Lock()
        self.checking = False
        self.nudged_at: float | None = None
        self.mqtt = new_client(s.broker, self.device_id)
        self.topics = {
            leaf: f"{s.broker.prefix}/{self.device_id}/{leaf}" for leaf in ("status", "model")
        }
        will = encode(status("offline", self.device_id, self.session, self.info()))
        self.mqtt.will_set(self.topics["status"], will, qos=1, retain=True)
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_message = self._on_message
        fleet.loop.attach(self.mqtt)

    # -- what the agent would publish ------------------------------------------------------------
    def info(self) -> BackendInfo:
        s = self.fleet.settings
        return BackendInfo(
            "simulated", "stand-in", "", s.model_name, self.running, "images",
            (1, 3, 640, 640), "float32", "output0", (1, 84, 8400), {0: "person"}, 32, "int8",
        )  # fmt: skip

    def publish_state(self) -> None:
        s = self.fleet.settings
        ota = {
            **self.state.public(),
            "base": {"slot": None, "path": "base.onnx", "name": s.model_name,
                     "version": s.base_version},
            "target": s.target,
            "model_name": s.model_name,
            "channel": s.channel_name,
            "progress": None,
        }  # fmt: skip
        message = model_state(self.device_id, self.info(), ota)
        self.mqtt.publish(self.topics["model"], encode(message), qos=1, retain=True)

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if reason.is_failure:
            return
        s = self.fleet.settings
        client.subscribe(f"{s.broker.prefix}/fleet/{s.channel_name}/announce", qos=1)
        online = status("online", self.device_id, self.session, self.info())
        client.publish(self.topics["status"], encode(online), qos=1, retain=True)
        self.publish_state()
        self.fleet.connected.add(self.device_id)

    def _on_message(self, client, userdata, message) -> None:
        delay = announce_delay(
            self.ota, announce_spread(message.payload, self.ota.announce_jitter_s)
        )
        with self.lock:
            at = time.monotonic() + delay
            if self.nudged_at is not None and self.nudged_at <= at:
                return  # an earlier nudge is already pending, as ModelManager.nudge keeps
            self.nudged_at = at
        self.fleet.scheduler.at(delay, lambda: self.check("announce", at))

    # -- the OTA flow, inference aside -------------------------------------------------------------
    def schedule_poll(self, first: bool = False) -> None:
        delay = poll_delay(self.ota, first)
        due = time.monotonic() + delay
        self.fleet.scheduler.at(delay, lambda: self.check("poll", due))

    def check(self, trigger: str, due: float) -> None:
        """A check, as the model manager runs one; ``due`` is when its timer said (the lag
        behind it shows whether the simulation kept up)."""
        with self.lock:
            if trigger == "announce":
                self.nudged_at = None
            if self.checking or self.state.probation is not None:
                return
            self.checking = True
        try:
            self._check(trigger, time.monotonic() - due)
        finally:
            with self.lock:
                self.checking = False
            if trigger == "poll":
                self.schedule_poll()

    def _check(self, trigger: str, lag_s: float) -> None:
        s = self.fleet.settings
        self.fleet.record(self, "check", None, trigger=trigger, lag_s=round(lag_s, 3))
        try:
            offer = self.client.find(
                s.model_name, s.target, self.running, self.state.pinned, self.state.rejected
            )
            if offer is None:
                return
            self.fleet.record(self, "offer", offer.version)
            partial = self.work / "partial.onnx"
            self.client.download(offer, partial)
            size = partial.stat().st_size
            partial.unlink()  # verified; a stand-in loads nothing
        except OtaError as exc:
            self.fleet.record(self, "error", None, kind=exc.kind, message=str(exc))
            return
        self.fleet.record(self, "downloaded", offer.version, bytes=size)
        version, previous = offer.version, self.running
        self.running = version
        self.state.probation = Probation(version=version, started=time.time())
        self.publish_state()
        self.fleet.record(self, "probation", version)
        self.fleet.scheduler.at(s.probation_s, lambda: self._end_probation(version, previous))

    def _end_probation(self, version: str, previous: str) -> None:
        s = self.fleet.settings
        self.state.probation = None
        if s.fails(self.index, version):
            reason = "probation failed: inference_p95_ms 212 > 150 (simulated)"
            self.state.rejected[version] = reason
            self.state.last_outcome = {"result": "rolled_back", "version": version,
                                       "reason": reason}  # fmt: skip
            self.running = previous
            self.fleet.record(self, "rolled_back", version)
        else:
            self.state.previous = self.state.active
            self.state.active = SlotRecord(
                slot="a" if self.state.active is None or self.state.active.slot == "b" else "b",
                path="model.onnx", name=s.model_name, version=version, target=s.target,
            )  # fmt: skip
            self.state.last_outcome = {"result": "committed", "version": version}
            self.fleet.record(self, "committed", version)
        self.publish_state()


class SimulatedFleet:
    """``count`` devices against one broker and one channel; ``records`` says what they did."""

    def __init__(self, settings: FleetSettings, count: int) -> None:
        self.settings = settings
        self.loop = MqttLoop()
        self.scheduler = Scheduler(settings.workers)
        self.connected: set[str] = set()
        self.records: list[Record] = []
        self._records_lock = threading.Lock()
        self.devices = [SimulatedDevice(i, self) for i in range(count)]

    def record(self, device: SimulatedDevice, kind: str, version: str | None, **detail: Any):
        with self._records_lock:
            self.records.append(Record(device.device_id, kind, version, time.time(), detail))

    def start(self, timeout: float = 60.0) -> None:
        """Connect every device (each publishes its retained status and model) and arm polls."""
        self.loop.start()
        b = self.settings.broker
        for device in self.devices:
            device.mqtt.connect(b.host, b.port, keepalive=60)
        deadline = time.monotonic() + timeout
        while len(self.connected) < len(self.devices):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(self.connected)} of {len(self.devices)} devices connected"
                )
            time.sleep(0.05)
        for device in self.devices:
            device.schedule_poll(first=True)

    def stop(self) -> None:
        self.scheduler.stop()
        for device in self.devices:
            device.mqtt.disconnect()
        time.sleep(0.2)
        self.loop.stop()

    def took(self, version: str) -> set[str]:
        """Devices that downloaded ``version`` (and so went on to probation)."""
        with self._records_lock:
            return {
                r.device_id for r in self.records if r.kind == "downloaded" and r.version == version
            }
