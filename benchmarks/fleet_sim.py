"""Issue 16: a thousand devices, one broker, one channel, and the health-gated rollout.

N simulated devices (tests/fleet_devices.py: the agent's real OTA client, a real MQTT connection
each, inference replaced by a stand-in that reports the probation outcome) follow a channel that
a real nginx serves on loopback, through one real mosquitto. ``edge-models rollout --auto`` (the
real command, in its own process) takes a good release through its steps, then a bad one, which
it must halt and withdraw at the first cohort. One run measures, side by side:

- requests per second and Mbit/s at the channel server after each announce: peak 1 s bin vs the
  mean over the announce window (the device jitter, or the longer ``spread_s`` the controller asks
  for to keep a large step under ``--egress-mbps``), and the bytes served (metadata vs models);
- devices updated per rollout step, against the cohort each step reaches;
- that raising the share only ever added devices (no device took a release before the raise that
  put it in the cohort) and that the bad release never went past its first cohort;
- the broker's connection and message counts ($SYS), and how far the simulation's checks lagged
  behind their jittered timers (whether this machine kept up).

Usage: python benchmarks/fleet_sim.py [--devices 1000] [--jitter 30] [--soak 20]
           [--egress-mbps 400] [--good-fail 0.005] [--bad-fail 0.3] [--out out/fleet_sim]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common import ROOT, shared_dir_or_exit

sys.path.insert(0, str(ROOT))

from agent.config import MqttConfig
from agent.contract import in_rollout
from models.golden import record_golden
from tests.brokers import Mosquitto, Subscriber
from tests.channel_server import Nginx
from tests.fleet_devices import FleetSettings, SimulatedFleet
from tests.ota_helpers import new_channel

NAME, GOOD, BAD = "yolov8n-coco", "1.1.0", "1.2.0"
SYS_TOPICS = (
    "$SYS/broker/clients/connected",
    "$SYS/broker/clients/maximum",
    "$SYS/broker/messages/received",
    "$SYS/broker/messages/sent",
    "$SYS/broker/publish/messages/sent",
    "$SYS/broker/bytes/received",
    "$SYS/broker/bytes/sent",
)


def fails(share: float, salt: str):
    """A fixed share of devices fails a release (by hash, so a run is reproducible)."""

    def rule(index: int, version: str) -> bool:
        digest = hashlib.sha256(f"{salt}/{version}/{index}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < share

    return rule


def controller(channel, broker: Mosquitto, version: str, log: Path, args, *extra: str) -> int:
    command = [
        sys.executable, "-m", "models.cli", "rollout", "--auto",
        "--channel", str(channel.folder), "--keys", str(channel.keys),
        "--name", NAME, "--version", version, "--steps", args.steps,
        "--soak", str(args.soak), "--interval", "2", "--min-outcomes", "10",
        "--broker", f"mqtt://127.0.0.1:{broker.port}", "--log", str(log), *extra,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, timeout=1800)
    for line in result.stdout.splitlines():
        print(f"  controller: {line}", flush=True)
    if result.returncode not in (0, 4):
        raise SystemExit(f"the rollout controller failed: {result.stderr.strip()}")
    return result.returncode


def decisions(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def kind(path: str, status: int) -> str:
    """What a channel request was for (TUF asks for the next root first; a 404 is the answer)."""
    name = path.rsplit("/", 1)[-1]
    if name.endswith("root.json"):
        return "root" if status == 200 else "root probe (404)"
    for what in ("timestamp", "snapshot", "targets", "index", "descriptor"):
        if name.endswith(f"{what}.json"):
            return what
    return "model" if name.endswith(".onnx") else "other"


def window_rates(requests: list[tuple], start: float, length: float) -> dict[str, Any]:
    """Requests per 1 s bin in [start, start + length): peak, mean, their ratio, and what for."""
    inside = [r for r in requests if start <= r[0] < start + length]
    bins = Counter(int(t - start) for t, *_ in inside)
    megabits = Counter()
    for t, _, sent, _ in inside:
        megabits[int(t - start)] += sent * 8 / 1e6
    counts = [bins.get(i, 0) for i in range(max(1, int(length)))]
    mean = sum(counts) / len(counts) if counts else 0.0
    peak = max(counts, default=0)
    return {
        "requests": sum(counts),
        "peak_rps": peak,
        "mean_rps": round(mean, 1),
        "peak_to_mean": round(peak / mean, 2) if mean else 0.0,
        "peak_mbps": round(max(megabits.values(), default=0.0)),
        "mean_mbps": round(sum(megabits.values()) / max(1, int(length))),
        "kinds": dict(Counter(kind(path, status) for _, status, _, path in inside)),
    }


def analyse(fleet: SimulatedFleet, server: Nginx, logs: dict[str, Path], args) -> dict[str, Any]:
    ids = [d.device_id for d in fleet.devices]
    requests = server.requests()
    good, bad = decisions(logs[GOOD]), decisions(logs[BAD])
    raises = [d for d in good if d["action"] == "raise"]
    announces = []
    announced = raises + [d for d in bad if d["action"] == "raise"]
    for n, decision in enumerate(announced):
        start = decision["timestamp"]  # until the jitter is out, or the next announce
        later = [d["timestamp"] for d in announced[n + 1 : n + 2]] or [args.reannounced]
        spread = max(args.jitter, decision.get("spread_s") or 0.0)
        ends = [start + spread + 5, *later]
        rates = window_rates(requests, start, min(ends) - start)
        announces.append({
            "version": decision["version"], "to": decision["new_percent"],
            "spread_s": spread, **rates,
        })  # fmt: skip
    rates = window_rates(requests, args.reannounced, args.jitter + 5)
    announces.append({"version": BAD, "to": "withdrawn", "spread_s": args.jitter, **rates})
    downloads = {
        (r.device_id, r.version): r.at for r in fleet.records if r.kind == "downloaded"
    }  # fmt: skip
    steps, early = [], 0
    previous: set[str] = set()
    for n, decision in enumerate(raises):
        cohort = {i for i in ids if in_rollout(i, NAME, GOOD, decision["new_percent"])}
        added_only = previous <= cohort
        start = decision["timestamp"]
        end = raises[n + 1]["timestamp"] if n + 1 < len(raises) else float("inf")
        updated = sum(1 for (d, v), t in downloads.items() if v == GOOD and start <= t < end)
        steps.append({
            "percent": decision["new_percent"], "cohort": len(cohort), "new_in_cohort":
            len(cohort - previous), "updated_in_step": updated, "only_added": added_only,
        })  # fmt: skip
        previous = cohort
    for (device, version), at in downloads.items():
        if version != GOOD:
            continue
        first = next(d for d in raises if in_rollout(device, NAME, GOOD, d["new_percent"]))
        early += at < first["timestamp"] - 0.5
    halt = next((d for d in bad if d["action"] == "halt"), None)
    first_bad = next((d for d in bad if d["action"] == "raise"), None)
    bad_cohort = (
        {i for i in ids if in_rollout(i, NAME, BAD, first_bad["new_percent"])}
        if first_bad
        else set()
    )
    took_bad = fleet.took(BAD)
    lags = [r.detail["lag_s"] for r in fleet.records if r.kind == "check"]
    by_kind = Counter(r.kind for r in fleet.records)
    model_bytes = sum(sent for _, status, sent, path in requests if path.endswith(".onnx"))
    descriptor_bytes = sum(sent for *_, sent, path in requests if path.endswith("descriptor.json"))
    return {
        "devices": len(ids),
        "announce_jitter_s": args.jitter,
        "announces": announces,
        "steps": steps,
        "took_before_their_step": early,
        "good": {"committed": by_version(fleet, "committed", GOOD), "final": good[-1]},
        "bad": {
            "halted_at_percent": halt["percent"] if halt else None,
            "reason": halt["reason"] if halt else None,
            "first_cohort": len(bad_cohort),
            "took_it": len(took_bad),
            "took_outside_first_cohort": len(took_bad - bad_cohort),
            "withdrawn": bool(halt and halt["withdraw"]),
        },
        "channel_server": {
            "requests": len(requests),
            "errors": sum(
                1 for _, status, _, path in requests if status >= 400 and "root" not in path
            ),
            "root_probes": sum(1 for _, _, _, path in requests if "root" in path),
            "bytes": sum(sent for _, _, sent, _ in requests),
            "model_bytes": model_bytes,
            "descriptor_bytes": descriptor_bytes,
            "metadata_bytes": sum(s for _, _, s, _ in requests) - model_bytes - descriptor_bytes,
            "bytes_per_request": {
                what: round(statistics.mean(sizes))
                for what, sizes in by_kind_sizes(requests).items()
            },
        },
        "checks": {
            "count": by_kind["check"],
            "errors": by_kind["error"],
            "lag_p50_s": round(statistics.median(lags), 2) if lags else None,
            "lag_p95_s": round(statistics.quantiles(lags, n=20)[-1], 2) if len(lags) > 1 else None,
            "lag_max_s": round(max(lags), 2) if lags else None,
        },
    }


def by_kind_sizes(requests: list[tuple]) -> dict[str, list[int]]:
    sizes: dict[str, list[int]] = {}
    for _, status, sent, path in requests:
        sizes.setdefault(kind(path, status), []).append(sent)
    return sizes


def by_version(fleet: SimulatedFleet, kind: str, version: str) -> int:
    return len({r.device_id for r in fleet.records if r.kind == kind and r.version == version})


def plot(
    fleet: SimulatedFleet, server: Nginx, logs: dict[str, Path], reannounced: float, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    requests = server.requests()
    t0 = min(t for t, *_ in requests)
    span = int(max(t for t, *_ in requests) - t0) + 1
    bins = Counter(int(t - t0) for t, *_ in requests)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    top.plot(range(span), [bins.get(i, 0) for i in range(span)], lw=0.8, color="tab:blue")
    top.set_ylabel("channel requests / s")
    for version, color in ((GOOD, "tab:green"), (BAD, "tab:red")):
        for decision in decisions(logs[version]):
            if decision["action"] in ("raise", "halt"):
                x = decision["timestamp"] - t0
                label = f"{decision['version']} {decision['action']} {decision['new_percent']:g}%"
                if decision["withdraw"]:
                    label = f"{decision['version']} halt + withdraw"
                for axis in (top, bottom):
                    axis.axvline(x, color=color, lw=0.7, ls="--")
                top.annotate(label, (x, top.get_ylim()[1] * 0.9), fontsize=7, rotation=90)
        events = sorted(
            r.at - t0 for r in fleet.records if r.kind == "committed" and r.version == version
        )
        bottom.step(events, range(1, len(events) + 1), where="post", color=color,
                    label=f"devices committed {version}")  # fmt: skip
        rolled = sorted(
            r.at - t0 for r in fleet.records if r.kind == "rolled_back" and r.version == version
        )
        if rolled:
            bottom.step(rolled, range(1, len(rolled) + 1), where="post", color=color, ls=":",
                        label=f"devices rolled back {version}")  # fmt: skip
    x = reannounced - t0
    for axis in (top, bottom):
        axis.axvline(x, color="grey", lw=0.7, ls="--")
    top.annotate("announce after withdrawal", (x, top.get_ylim()[1] * 0.9), fontsize=7, rotation=90)
    bottom.set_yscale("symlog")
    bottom.set_ylabel("devices")
    bottom.set_xlabel("seconds since the first request")
    bottom.legend(fontsize=8)
    figure.suptitle(f"{len(fleet.devices)} simulated devices: staged rollout, then a bad release")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--jitter", type=float, default=30.0, help="announce jitter (agent: 30)")
    parser.add_argument("--soak", type=float, default=20.0, help="seconds at a step, at least")
    parser.add_argument("--steps", default="1,5,25,100")
    parser.add_argument("--good-fail", type=float, default=0.005, help="share failing 1.1.0")
    parser.add_argument("--bad-fail", type=float, default=0.3, help="share failing 1.2.0")
    parser.add_argument("--workers", type=int, default=8, help="threads doing device checks")
    parser.add_argument(
        "--egress-mbps", type=float, default=400.0, help="the good rollout's download budget"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "fleet_sim")
    parser.add_argument("--shared", type=Path)
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    model = shared / "models" / "yolov8n-coco-int8-dynamic.onnx"
    images = [shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        work = Path(tmp)
        channel = new_channel(work / "ota")
        golden = record_golden(model, images)
        broker = Mosquitto(work / "broker", sys_interval_s=1).start()
        server = Nginx(work / "nginx", channel.folder, connections=args.devices + 256).start()
        stats = Subscriber(broker.port, list(SYS_TOPICS)).start()
        rules = {GOOD: fails(args.good_fail, "good"), BAD: fails(args.bad_fail, "bad")}
        settings = FleetSettings(
            broker=MqttConfig(host="127.0.0.1", port=broker.port, prefix="edge"),
            channel_url=server.url,
            root=channel.root,
            work=work / "devices",
            announce_jitter_s=args.jitter,
            workers=args.workers,
            fails=lambda index, version: rules[version](index, version),
        )
        fleet = SimulatedFleet(settings, args.devices)
        started = time.monotonic()
        fleet.start(timeout=300)
        connect_s = time.monotonic() - started
        print(f"{args.devices} devices connected in {connect_s:.1f} s", flush=True)
        logs = {GOOD: args.out / "rollout-good.jsonl", BAD: args.out / "rollout-bad.jsonl"}
        for log in logs.values():
            log.unlink(missing_ok=True)
        channel.publish(model, GOOD, golden, rollout_percent=0)
        controller(channel, broker, GOOD, logs[GOOD], args, "--egress-mbps", str(args.egress_mbps))
        channel.publish(model, BAD, golden, rollout_percent=0)
        controller(channel, broker, BAD, logs[BAD], args, "--withdraw-on-halt")
        print("announcing again after the withdrawal; waiting out the jitter", flush=True)
        args.reannounced = time.time()
        stats.publish("edge/fleet/stable/announce", b"{}")
        time.sleep(args.jitter + 10)
        time.sleep(2)  # one more $SYS period
        broker_counts = {}
        for topic in SYS_TOPICS:
            values = [float(m.payload) for m in stats.on(topic)]
            broker_counts[topic.removeprefix("$SYS/broker/")] = max(values) if values else None
        stats.stop()
        fleet.stop()
        summary = analyse(fleet, server, logs, args)
        summary["connect_s"] = round(connect_s, 1)
        summary["broker"] = broker_counts
        plot(fleet, server, logs, args.reannounced, args.out / "fleet_sim.png")
        server.stop()
        broker.stop()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    report(summary, args.out)
    return 0


def report(summary: dict[str, Any], out: Path) -> None:
    print(f"\n== fleet simulation: {summary['devices']} devices, announce jitter "
          f"{summary['announce_jitter_s']:g} s ==")  # fmt: skip
    print("after each announce (every device refreshes; the cohort downloads):")
    for a in summary["announces"]:
        to = f"{a['to']:g}%" if isinstance(a["to"], float | int) else a["to"]
        print(f"  {a['version']} -> {to} (spread {a['spread_s']:g} s): {a['requests']} requests, "
              f"peak {a['peak_rps']}/s, mean {a['mean_rps']}/s, peak/mean {a['peak_to_mean']}; "
              f"{a['peak_mbps']} Mbit/s peak, {a['mean_mbps']} mean")  # fmt: skip
        print("    " + ", ".join(f"{k} {v}" for k, v in sorted(a["kinds"].items())))
    print("rollout steps (good release):")
    for s in summary["steps"]:
        print(f"  {s['percent']:g}%: cohort {s['cohort']} (+{s['new_in_cohort']}), downloads "
              f"during the step {s['updated_in_step']}, only added: {s['only_added']}")  # fmt: skip
    print(f"  devices that took it before their step: {summary['took_before_their_step']}")
    print(f"  final: {summary['good']['final']['action']} - {summary['good']['final']['reason']}")
    bad = summary["bad"]
    print(f"bad release: halted at {bad['halted_at_percent']}% (withdrawn: {bad['withdrawn']}); "
          f"{bad['took_it']} devices took it, first cohort {bad['first_cohort']}, outside it "
          f"{bad['took_outside_first_cohort']}")  # fmt: skip
    print(f"  reason: {bad['reason']}")
    c = summary["channel_server"]
    print(f"channel server: {c['requests']} requests ({c['errors']} errors; "
          f"{c['root_probes']} were TUF's look for a newer root), "
          f"{c['bytes'] / 1e6:.1f} MB ({c['model_bytes'] / 1e6:.1f} MB models, "
          f"{c['descriptor_bytes'] / 1e6:.1f} MB descriptors, "
          f"{c['metadata_bytes'] / 1e6:.2f} MB TUF metadata and index)")  # fmt: skip
    print("  bytes per request: " + ", ".join(
        f"{k} {v}" for k, v in sorted(c["bytes_per_request"].items())))  # fmt: skip
    b = summary["broker"]
    print(f"broker: {b['clients/maximum']:.0f} clients at most; MQTT packets in "
          f"{b['messages/received']:.0f}, out {b['messages/sent']:.0f} (PUBLISH out "
          f"{b['publish/messages/sent']:.0f}); {b['bytes/received'] / 1e6:.1f} MB in, "
          f"{b['bytes/sent'] / 1e6:.1f} MB out (all incl. $SYS)")  # fmt: skip
    k = summary["checks"]
    print(f"device checks: {k['count']} ({k['errors']} errors); lag behind their timers "
          f"p50 {k['lag_p50_s']} s, p95 {k['lag_p95_s']} s, max {k['lag_max_s']} s; "
          f"connect {summary['connect_s']} s")  # fmt: skip
    print(f"plot: {out / 'fleet_sim.png'}; figures: {out / 'summary.json'}")


if __name__ == "__main__":
    sys.exit(main())
