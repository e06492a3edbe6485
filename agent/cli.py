"""``edge-agent``: run the daemon, detect on images, benchmark, demo, and check configs.

User errors (bad config, missing model, unreadable image, dead source) print one line naming the
problem and exit non-zero without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import cv2
import yaml

from agent import __version__
from agent.config import (
    AgentConfig,
    ConfigError,
    DetectionConfig,
    ModelConfig,
    build_config,
    load_config,
    redacted,
)
from agent.contract.errors import AgentError, ImageError
from agent.fleet_screen import add_arguments as add_watch_arguments
from agent.vision import DetectionParams, Preprocessor, detect_image, load_backend

log = logging.getLogger("edge-agent")
_RAN_AGENT = False  # set once `run` has started an agent: see entry()

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(AgentError):
    """Bad command-line arguments: exit 2 like argparse does."""


class JournalFormatter(logging.Formatter):
    """Lines for journald: a ``<N>`` syslog priority prefix (journald files each line at its
    level, so ``journalctl -p warning`` works) and no timestamp (the journal keeps its own)."""

    PRIORITIES: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2,
        logging.ERROR: 3,
        logging.WARNING: 4,
        logging.INFO: 6,
    }

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for lvl, p in self.PRIORITIES.items() if record.levelno >= lvl), 7)
        return f"<{priority}>" + super().format(record).replace("\n", f"\n<{priority}>")


def _stderr_is_the_journal() -> bool:
    """systemd sets JOURNAL_STREAM to the device:inode of the stream it connected stderr to."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        stat = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if _stderr_is_the_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def _model_options(args: argparse.Namespace) -> ModelConfig:
    try:
        return ModelConfig(path=args.model, threads=getattr(args, "threads", 0) or 0)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _install_stop_handlers(stop: Any) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# -- run ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    _setup_logging(config.log_level)
    return run_agent(config, max_frames=args.frames, config_path=args.config)


def run_agent(
    config: AgentConfig, max_frames: int | None = None, config_path: Path | None = None
) -> int:
    from agent.runtime import Agent

    global _RAN_AGENT
    agent = Agent(config, max_frames=max_frames, config_path=config_path)
    _RAN_AGENT = True
    _install_stop_handlers(agent.stop)
    signal.signal(
        signal.SIGHUP, lambda *_: threading.Thread(target=agent.reload, name="reload").start()
    )
    return agent.run()


def cmd_service(args: argparse.Namespace) -> int:
    from agent.service import install, service_status, uninstall

    if args.action == "install":
        install(args.root, dry_run=args.dry_run, enable=not args.no_enable)
    elif args.action == "uninstall":
        uninstall(args.root, dry_run=args.dry_run, purge=args.purge)
    else:
        code, text = service_status()
        print(text)
        return code
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    from agent.service import read_health

    healthy, reason = read_health(_state_dir(args) / "health.json", args.max_age)
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return EXIT_OK if healthy else EXIT_FAILURE


def cmd_target(args: argparse.Namespace) -> int:
    """What this machine is, and the line and target it follows with this config."""
    from agent.contract import targets

    follows = _following(args)
    runs = targets.preferences(follows.target)
    if args.json:
        data = {**follows.detected.to_dict(), "follows": follows.to_dict(), "runs": runs}
        print(json.dumps(data, indent=2))
    else:
        print(f"detected: {follows.detected.describe()}")
        print(f"follows:  {follows.describe()}")
        print(f"runs models made for: {', '.join(runs)}")
    return EXIT_OK


def _following(args: argparse.Namespace) -> Any:
    """The line and target the device with ``--config`` (or the defaults) follows."""
    from agent.updates import ModelStore, following

    if getattr(args, "config", None):
        config = load_config(args.config)
    else:  # no config: the defaults, and no model to name the line by
        config = build_config({"model": {"path": "-"}}, "the defaults")
    folder = config.state_dir / "models"
    active = ModelStore(folder).state.active if folder.is_dir() else None

    def base_name() -> str | None:
        if not getattr(args, "config", None):
            return None
        try:
            model = config.model
            return load_backend(model.backend, model.path, model).info.model_name
        except AgentError:
            return None  # no readable base model here: the line stays unnamed

    return following(config, active, base_name)


# -- model and ota: talk to the running agent, or edit its state while it is stopped --------------
def _state_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "state_dir", None) is not None:
        return Path(args.state_dir)
    if getattr(args, "config", None) is not None:
        return load_config(args.config).state_dir
    return AgentConfig.model_fields["state_dir"].default


def _store(args: argparse.Namespace) -> Any:
    from agent.updates import ModelStore

    folder = _state_dir(args) / "models"
    if not folder.is_dir():
        raise AgentError(f"no model state in {folder}: OTA has never run with this state_dir")
    return ModelStore(folder)


def _print_result(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, indent=2))
    elif result.get("ok", True):
        for key, value in result.items():
            if key != "ok" and value is not None:
                print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
    if not result.get("ok", True):
        print(f"edge-agent: error: {result.get('error')}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _describe(record: Any) -> str:
    if record is None:
        return "-"
    where = f"slot {record.slot}" if record.slot else "base model"
    return f"{record.name} {record.version} ({where}: {record.path})"


def cmd_model_status(args: argparse.Namespace) -> int:
    from agent.updates import file_request

    store = _store(args)
    if store.agent_running():
        return _print_result(file_request(store.root, "status", {}, args.timeout), args.json)
    state = store.state
    if args.json:
        print(json.dumps({"running": False, **state.public()}, indent=2))
        return EXIT_OK
    print("agent: not running (state as it will start)")
    print(f"active:    {_describe(state.active) if state.active else 'the base model'}")
    print(f"previous:  {_describe(state.previous)}")
    print(f"staged:    {_describe(state.staged)}")
    print(f"pinned:    {state.pinned or '-'}")
    for version, reason in state.rejected.items():
        print(f"rejected:  {version}: {reason}")
    if state.last_outcome:
        print(f"last:      {json.dumps(state.last_outcome)}")
    return EXIT_OK


def cmd_model_rollback(args: argparse.Namespace) -> int:
    from agent.updates import file_request

    store = _store(args)
    if store.agent_running():
        request = {"reason": "requested with edge-agent model rollback"}
        return _print_result(file_request(store.root, "rollback", request, args.timeout), args.json)
    previous = store.roll_back("rolled back with edge-agent model rollback")
    print(f"rolled back to {_describe(previous)}; the agent uses it when it starts")
    return EXIT_OK


def cmd_model_pin(args: argparse.Namespace) -> int:
    from agent.contract.versions import check_semver
    from agent.updates import file_request

    version = None if args.clear else args.version
    if version is None and not args.clear:
        raise UsageError("give a VERSION, or --clear")
    if version is not None:
        try:
            check_semver(version)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    store = _store(args)
    if store.agent_running():
        result = file_request(store.root, "pin", {"version": version}, args.timeout)
        return _print_result(result, args.json)
    store.set_pin(version)
    print(f"pinned to {version}" if version else "pin cleared", "(applied when the agent starts)")
    return EXIT_OK


def cmd_ota_check(args: argparse.Namespace) -> int:
    from agent.updates import ChannelClient, ModelStore, file_request, following

    config = load_config(args.config)
    store = ModelStore(config.state_dir / "models")
    if store.agent_running():
        result = file_request(store.root, "check", {"trigger": "cli"}, args.timeout)
        return _print_result(result, args.json)
    state = store.state
    model = config.model
    follows = following(
        config, state.active, lambda: load_backend(model.backend, model.path, model).info.model_name
    )
    name, target = follows.line, follows.target
    offer = ChannelClient(config.ota, store.root / "tuf", config.device_id).find(
        name, target, state.active.version if state.active else None, state.pinned, state.rejected
    )
    if offer is None:
        print(f"up to date: nothing newer for {name} on {target} (the agent is not running)")
    else:
        print(
            f"available: {name} {offer.version} for {offer.target} "
            f"({offer.model_target.length} bytes); the agent installs it when it runs"
        )
    return EXIT_OK


# -- detect ------------------------------------------------------------------------------------
def cmd_detect(args: argparse.Namespace) -> int:
    backend = load_backend("onnxruntime", args.model, _model_options(args))
    try:
        detection = DetectionConfig(
            confidence=args.conf, iou=args.iou, classes=args.classes or None
        )
    except ValueError as exc:
        raise UsageError(f"bad threshold: {exc}") from None
    try:
        params = DetectionParams.from_config(detection, backend.info.class_names)
    except ValueError as exc:
        raise ConfigError(f"detection.classes: {exc}") from None
    pre = Preprocessor(backend.info.imgsz, pool_size=1)
    failures = 0
    for path in args.images:
        try:
            image = read_image(path)
        except ImageError as exc:
            print(f"edge-agent: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        detections = detect_image(backend, image, params, pre)
        if args.json:
            record = {
                "image": str(path),
                "width": image.shape[1],
                "height": image.shape[0],
                "model": {"name": backend.info.model_name, "version": backend.info.model_version},
                "detections": [d.to_dict() for d in detections],
            }
            print(json.dumps(record))
        else:
            print(f"{path}: {len(detections)} detection(s)")
            for d in detections:
                x1, y1, x2, y2 = d.box
                print(f"  {d.label:<16} {d.score:.2f}  [{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}]")
    return EXIT_FAILURE if failures else EXIT_OK


def read_image(path: Path) -> Any:
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ImageError(f"cannot decode image {path} (not an image, or corrupt)")
    return image


# -- bench and demo ----------------------------------------------------------------------------
def _video_source(args: argparse.Namespace, pace: str):
    from agent.demo_inputs import open_demo_source

    try:
        return open_demo_source(args.source, getattr(args, "shared", None), pace)
    except LookupError as exc:
        raise UsageError(str(exc)) from None


def _demo_model(args: argparse.Namespace) -> Path:
    from agent.demo_inputs import DEMO_MODEL, require_shared_dir

    if args.model is not None:
        return args.model
    try:
        return require_shared_dir(args.shared) / DEMO_MODEL
    except LookupError as exc:
        raise UsageError(str(exc)) from None


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.bench import print_bench, run_benchmark

    backend = load_backend("onnxruntime", args.model, _model_options(args))
    _video_source(args, pace="fast").close()  # fail early; also builds the cached demo video
    report = run_benchmark(
        backend, lambda: _video_source(args, pace="fast"), args.frames, args.rounds
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_bench(report)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if not args.no_services:
        return _demo_story(args)
    from agent.vision import ActiveModel, Pipeline, StdoutSink

    _setup_logging("WARNING")
    model_path = _demo_model(args)
    backend = load_backend(
        "onnxruntime", model_path, _model_options(argparse.Namespace(model=model_path))
    )
    source = _video_source(args, pace="fast")
    print(
        f"demo: {backend.info.model_name} ({backend.info.precision}) on {source.name}",
        file=sys.stderr,
    )
    config = build_config({"model": {"path": str(model_path)}}, "demo defaults")
    pipeline = Pipeline(
        source,
        ActiveModel(backend),
        [StdoutSink("json" if args.json else "text")],
        config.detection,
        config.pipeline,
        emit_empty=True,
        max_frames=args.frames,
    )
    _install_stop_handlers(pipeline.stop)
    pipeline.run()
    source.close()
    snap = pipeline.stats.snapshot()
    print(
        f"\nprocessed {snap['frames_out']} frames at {snap['fps_out'] or 0:.1f} fps "
        f"(dropped {snap['dropped']}, errors {snap['errors']})"
    )
    print(f"{'stage':<12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for stage, values in snap["latency_ms"].items():
        cells = "".join(
            f"{values[k] if values[k] is not None else '-':>9}" for k in ("p50", "p95", "p99")
        )
        print(f"{stage:<12}{cells}")
    if pipeline.error is not None:
        raise pipeline.error
    return EXIT_OK


# -- config ------------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    if config.cameras:
        sources = "cameras " + ", ".join(f"{c.name} ({c.uri})" for c in config.cameras)
    else:
        sources = f"source {config.source.uri}"
    print(f"{args.file}: OK (device {config.device_id}, model {config.model.path}, {sources})")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(yaml.safe_dump(redacted(config), sort_keys=False), end="")
    return EXIT_OK


# -- parser ------------------------------------------------------------------------------------
def _class_list(text: str) -> list[int | str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected class names or ids separated by commas")
    return [int(item) if item.isdigit() else item for item in items]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _add_state_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="config file (for its state_dir)")
    parser.add_argument(
        "--state-dir", type=Path, help="state directory (default /var/lib/edge-agent)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="wait for the agent (s)")
    parser.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="Run quantized YOLOv8 detection on a camera or video and report what it sees.",
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run", help="run the agent with a config file (the systemd service runs this)"
    )
    run.add_argument("-c", "--config", type=Path, required=True, help="YAML config file")
    run.add_argument("--frames", type=_positive_int, help="stop after this many frames")
    run.set_defaults(func=cmd_run)

    detect = sub.add_parser("detect", help="detect objects in image files")
    detect.add_argument("--model", type=Path, required=True, help="YOLOv8 ONNX model")
    detect.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    detect.add_argument("--json", action="store_true", help="one JSON object per image")
    detect.add_argument("--conf", type=float, default=0.25, help="confidence threshold (0.25)")
    detect.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold (0.45)")
    detect.add_argument(
        "--classes", type=_class_list, metavar="A,B", help="keep only these class names or ids"
    )
    detect.add_argument(
        "--threads", type=int, default=0, help="inference threads (0: runtime default)"
    )
    detect.set_defaults(func=cmd_detect)

    bench = sub.add_parser("bench", help="measure bare inference and pipeline throughput")
    bench.add_argument("--model", type=Path, required=True)
    bench.add_argument("--source", help="video or folder (default: synthesised 1080p demo video)")
    bench.add_argument(
        "--frames", type=_positive_int, default=100, help="pipeline frames per round"
    )
    bench.add_argument("--rounds", type=_positive_int, default=8, help="bare/pipeline rounds (8)")
    bench.add_argument("--threads", type=int, default=0)
    bench.add_argument("--shared", type=Path, help="shared data folder (default: ../shared)")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    demo = sub.add_parser(
        "demo",
        help="the whole story on a demo video: broker, channel, agent, INT8 over the air "
        "(--no-services: the detection loop alone, from a file)",
    )
    demo.add_argument(
        "--no-services",
        action="store_true",
        help="no broker or channel: the loop alone, detections printed (--model/--source/--frames)",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("demo-output"), help="annotated video and summary here"
    )
    demo.add_argument("--int8", type=Path, help="an INT8 model to ship (default: quantized here)")
    demo.add_argument("--target", help="deployment target (default: this machine's)")
    demo.add_argument("--before", type=float, default=12.0, help="seconds measured on float")
    demo.add_argument("--after", type=float, default=12.0, help="seconds measured on INT8")
    demo.add_argument("--fps", type=float, default=10.0, help="camera frame rate of the clip")
    demo.add_argument(
        "--model", type=Path, help="model (default: ../shared/models/yolov8n-coco-fp32.onnx)"
    )
    demo.add_argument("--source", help="video or folder (default: synthesised 1080p video)")
    demo.add_argument("--shared", type=Path, help="shared data folder (default: ../shared)")
    demo.add_argument("--frames", type=_positive_int, help="stop after this many frames")
    demo.add_argument("--json", action="store_true", help="print detections as JSON lines")
    demo.set_defaults(func=cmd_demo)

    svc = sub.add_parser("service", help="install, uninstall or inspect the systemd service")
    svc.add_argument("action", choices=["install", "uninstall", "status"])
    svc.add_argument("--dry-run", action="store_true", help="print every step instead of doing it")
    svc.add_argument(
        "--root", type=Path, default=Path("/"), help="install into this folder (packaging)"
    )
    svc.add_argument(
        "--no-enable", action="store_true", help="install without enabling and starting"
    )
    svc.add_argument(
        "--purge", action="store_true", help="uninstall: also remove config, state and user"
    )
    svc.set_defaults(func=cmd_service)

    health = sub.add_parser(
        "health", help="exit 0 if the running agent is healthy, else 1 with the reason"
    )
    health.add_argument("-c", "--config", type=Path, help="config file (for its state_dir)")
    health.add_argument(
        "--state-dir", type=Path, help="state directory (default /var/lib/edge-agent)"
    )
    health.add_argument(
        "--max-age", type=float, default=10.0, help="seconds before a heartbeat is stale"
    )
    health.set_defaults(func=cmd_health)

    target = sub.add_parser(
        "target",
        help="this machine's deployment target, the CPU features it rests on, and the model line "
        "and target this device follows (with --config: as that config makes it)",
    )
    target.add_argument("-c", "--config", type=Path, help="the agent's config (default: defaults)")
    target.add_argument("--json", action="store_true")
    target.set_defaults(func=cmd_target)

    model = sub.add_parser("model", help="the active model: status, rollback, pin")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    for action, helptext, func in (
        ("status", "active, previous, staged models, probation and pin", cmd_model_status),
        ("rollback", "go back to the previous model now", cmd_model_rollback),
        ("pin", "follow exactly VERSION (--clear: follow the newest)", cmd_model_pin),
    ):
        sub_parser = model_sub.add_parser(action, help=helptext)
        if action == "pin":
            sub_parser.add_argument("version", nargs="?", metavar="VERSION")
            sub_parser.add_argument("--clear", action="store_true", help="remove the pin")
        _add_state_options(sub_parser)
        sub_parser.set_defaults(func=func)

    ota = sub.add_parser("ota", help="the OTA channel")
    ota_sub = ota.add_subparsers(dest="ota_command", metavar="ACTION", required=True)
    ota_check = ota_sub.add_parser(
        "check", help="check the channel now (the running agent installs what it finds)"
    )
    ota_check.add_argument("-c", "--config", type=Path, required=True, help="YAML config file")
    ota_check.add_argument("--timeout", type=float, default=600.0)
    ota_check.add_argument("--json", action="store_true")
    ota_check.set_defaults(func=cmd_ota_check)

    config = sub.add_parser("config", help="check or show configuration")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_sub.add_parser(
        "check", help="validate a config file (and EDGE_AGENT_* overrides)"
    )
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_config_check)
    show = config_sub.add_parser("show", help="print the effective config, secrets masked")
    show.add_argument("-c", "--config", type=Path, help="YAML config file")
    show.set_defaults(func=cmd_config_show)

    watch = sub.add_parser(
        "watch", help="a live view of the fleet, built only from its MQTT topics"
    )
    add_watch_arguments(watch)
    watch.set_defaults(func=cmd_watch)
    return parser


def _demo_story(args: argparse.Namespace) -> int:
    from agent.demo_inputs import require_shared_dir
    from agent_demo import StoryOptions, run

    _setup_logging("WARNING")
    try:
        shared = require_shared_dir(args.shared)
    except LookupError as exc:
        raise UsageError(f"{exc}; add --no-services for the file-only demo") from None
    options = StoryOptions(
        shared=shared,
        out_dir=args.out,
        int8=args.int8,
        target=args.target,
        before_s=args.before,
        fps=args.fps,
        after_s=args.after,
        say=lambda text: print(f"[demo] {text}", file=sys.stderr, flush=True),
    )
    return run(options)


def cmd_watch(args: argparse.Namespace) -> int:
    from agent.fleet_screen import run_watch

    return run_watch(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as exc:
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The ``edge-agent`` command. After ``run`` it leaves without Python's finalization: a
    daemon thread may still be blocked in native code (a camera read abandoned after a stall,
    inside OpenCV), and finalization kills such a thread on its way out, which OpenCV's
    catch-all turns into abort() (exit status -6 instead of the agent's own, seen in the soak).
    The agent has shut down in order by then; logs and standard streams are flushed first."""
    code = main()
    if _RAN_AGENT:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
