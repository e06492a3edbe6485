"""``edge-agent watch``: a live terminal view of a fleet, built only from its MQTT topics.

Per device: status, model and probation state, fps, per-stage p50/p95, CPU/GPU/NPU and
temperature, outbox depth, last detections; below, the most recent events. It connects like the
agent does (same TLS and credential options, or the ``mqtt`` section of an agent's config file),
so what it shows is exactly what reaches the broker. ``--once --json`` prints one snapshot.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from agent.contract.errors import ConfigError
from agent.link import FleetView, Watcher, add_broker_arguments, broker_config, settle

EXIT_NOTHING_SEEN = 2


# -- rendering --------------------------------------------------------------------------------
def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _stage(row: dict[str, Any], stage: str) -> str:
    figures = row["stages_ms"].get(stage) or {}
    return f"{_num(figures.get('p50'))}/{_num(figures.get('p95'))}"


def render(snapshot: dict[str, Any]) -> Any:
    """A rich renderable: a table of devices, and the latest events under it."""
    from rich.console import Group
    from rich.table import Table

    devices = snapshot["devices"]
    table = Table(
        title=f"edge-agent fleet on {snapshot['broker']} ({len(devices)} devices)",
        title_justify="left",
    )
    for column in (
        "device",
        "state",
        "model",
        "ota",
        "fps in/out",
        "infer p50/p95",
        "pre",
        "post",
        "cpu%",
        "temp",
        "gpu/npu%",
        "outbox",
        "cameras",
        "last detections",
    ):
        keep_whole = column in ("device", "state")  # never folded: the row must stay findable
        table.add_column(column, overflow="fold", no_wrap=keep_whole, min_width=len(column) // 2)
    now = time.time()
    for row in devices.values():
        state = row["state"]
        style = {"online": "green", "offline": "red", "stopped": "yellow"}.get(state, "")
        model = f"{row['model'] or '?'} {row['version'] or ''} {row['precision'] or ''}".strip()
        accelerator = row["gpu_percent"] if row["gpu_percent"] is not None else row["npu_percent"]
        labels = ", ".join(f"{n} {label}" for label, n in sorted(row["last_detections"].items()))
        cameras = ", ".join(
            f"{name} {_num(c['fps_out'])}" + (f" ({c['objects']} obj)" if c["objects"] else "")
            for name, c in sorted(row.get("cameras", {}).items())
        )
        table.add_row(
            row["device_id"],
            f"[{style}]{state}[/]" if style else state,
            model,
            row["ota"],
            f"{_num(row['fps_in'])}/{_num(row['fps_out'])}",
            _stage(row, "inference"),
            _stage(row, "preprocess"),
            _stage(row, "postprocess"),
            _num(row["cpu_percent"], 0),
            _num(row["temperature_c"], 0),
            _num(accelerator, 0),
            str(row["outbox_depth"] if row["outbox_depth"] is not None else "-"),
            cameras or "-",
            labels or "-",
        )
    events = sorted(
        ((e, row["device_id"]) for row in devices.values() for e in row["events"]),
        key=lambda pair: pair[0].get("timestamp") or 0,
    )[-8:]
    log = Table(title="recent events", title_justify="left", show_header=False, box=None)
    for event, device in events:
        age = now - (event.get("timestamp") or now)
        log.add_row(
            f"{age:5.0f} s ago",
            device,
            event.get("level") or "",
            event.get("kind") or "",
            event.get("message") or "",
        )
    if not devices:
        table.caption = f"no agents seen under {snapshot['prefix']}/ yet"
    return Group(table, log)


def run_watch(args: Any) -> int:
    """The ``watch`` command; returns its exit status."""
    if args.json and not args.once:
        raise ConfigError("--json needs --once (the live view is for a terminal)")
    config = broker_config(args)
    view = FleetView(config.prefix, None if args.all else args.device)
    watcher = Watcher(config, view)
    watcher.connect(timeout=args.timeout)
    try:
        if args.once:
            settle(watcher, args.wait)
            snapshot = watcher.snapshot()
            if args.json:
                print(json.dumps(snapshot, indent=2))
            else:
                from rich.console import Console

                Console().print(render(snapshot))
            if not snapshot["devices"]:
                who = f"device {args.device!r}" if args.device and not args.all else "agents"
                print(
                    f"no {who} seen under {config.prefix}/ on {watcher.where} within "
                    f"{args.wait:g} s",
                    file=sys.stderr,
                )
                return EXIT_NOTHING_SEEN
            return 0
        return _live(watcher)
    finally:
        watcher.close()


def _live(watcher: Watcher) -> int:
    from rich.live import Live

    try:
        with Live(render(watcher.snapshot()), refresh_per_second=2, screen=False) as live:
            while True:
                watcher.changed.wait(0.5)
                watcher.changed.clear()
                live.update(render(watcher.snapshot()))
    except KeyboardInterrupt:
        return 0


def add_arguments(parser: Any) -> None:
    add_broker_arguments(parser)
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--device", help="only this device id")
    who.add_argument("--all", action="store_true", help="every device (the default)")
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    parser.add_argument(
        "--wait", type=float, default=5.0, help="with --once: seconds to gather (default 5)"
    )
