"""``edge-models``: quantize, evaluate, gate and golden-record YOLOv8 models for edge-agent devices.

User errors print one line naming the problem and exit non-zero, with no traceback and no partial
output file left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent import __version__
from agent.contract import AgentError
from models.errors import FactoryError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATE, EXIT_HALTED = 0, 1, 2, 3, 4
CONVERTED_TARGETS = ("rk3588",)  # publish converts the float ONNX for these, verified in one go


def _host_target() -> str:
    from agent.contract import detect

    return detect().target


def _made_for(model: Path) -> str | None:
    """The target an ONNX model records it was made for (``edge-models quantize --target``)."""
    if model.suffix.lower() != ".onnx":
        return None
    import onnx

    try:
        props = onnx.load(str(model), load_external_data=False).metadata_props
    except Exception:
        return None  # the loaders after this say what is wrong with the file
    return next((p.value for p in props if p.key == "target"), None)


def _target_for(model: Path, explicit: str | None) -> str:
    """The target to verify and ship ``model`` for: ``--target``, else the one it was made for,
    else this machine's. A model made for other kernels than a target's devices run is refused.
    """
    from agent.contract import targets
    from models.kernels import known_target

    made_for = _made_for(model)
    target = explicit or made_for or _host_target()
    known_target(target)
    if made_for and made_for not in targets.preferences(target):
        fix = (
            f"{target} quantizes the float model itself: publish the float ONNX with --calib"
            if target in CONVERTED_TARGETS
            else f"quantize it with --target {target}"
        )
        raise FactoryError(
            f"{model.name} was made for {made_for}; {target} devices do not run {made_for} "
            f"models ({fix})"
        )
    return target


def cmd_quantize(args: argparse.Namespace) -> int:
    from models.quantize import quantize
    from models.recipes import recipe

    target = args.target or _host_target()
    settings = recipe(
        target,
        method=args.method,
        per_channel=args.per_channel,
        activations=args.activations,
        reduce_range=args.reduce_range,
    )
    if args.target is None:
        print(f"- target {target} (this machine; --target to choose another)", file=sys.stderr)
    summary = quantize(
        args.model,
        args.calib,
        args.out,
        settings,
        overwrite=args.overwrite,
        progress=not args.quiet,
        on_stage=lambda text: print(f"- {text}", file=sys.stderr),
        target=target,
    )
    size_ratio = args.out.stat().st_size / args.model.stat().st_size
    print(
        f"wrote {args.out} for {target} ({summary['scheme']} QDQ, {summary['method']}, "
        f"{'per-channel' if summary['per_channel'] else 'per-tensor'}, 7-bit weights: "
        f"{summary['reduce_range']}, {summary['calibration_images']} calibration images, "
        f"{size_ratio:.3f} x the source size)"
    )
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.datasets import load_dataset
    from models.evaluate import evaluate
    from models.report import table, write_report

    dataset = load_dataset(args.data)
    results = evaluate(args.model, dataset, latency_rounds=args.rounds, threads=args.threads)
    if args.report:
        write_report(results, dataset, args.report)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        print(table(results))
        if args.report:
            print(f"\nreport written to {args.report}/report.md")
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from models.gate import gate_model
    from models.kernels import verification

    runner = verification(_target_for(args.candidate, args.target), args.unverified_target)
    result = gate_model(
        args.candidate,
        args.reference,
        args.data,
        args.rounds,
        args.max_map_drop,
        args.max_latency_ratio,
        runner,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif result.passed:
        print(
            f"PASS {args.candidate.name}: "
            + ", ".join(f"{k} {v}" for k, v in result.checks.items())
        )
    else:
        print(f"FAIL {args.candidate.name}:", file=sys.stderr)
        for reason in result.reasons:
            print(f"  - {reason}", file=sys.stderr)
    return EXIT_OK if result.passed else EXIT_GATE


def cmd_golden(args: argparse.Namespace) -> int:
    from models.golden import record_golden, write_golden

    golden = record_golden(args.model, args.images)
    write_golden(golden, args.out, overwrite=args.overwrite)
    count = sum(len(e["detections"]) for e in golden["images"])
    print(f"wrote {args.out}: {len(golden['images'])} image(s), {count} reference detection(s)")
    return EXIT_OK


def cmd_calibration_set(args: argparse.Namespace) -> int:
    from models.calibration import synthesise

    written = synthesise(args.images, args.out, per_image=args.per_image)
    print(f"wrote {len(written)} calibration images to {args.out}")
    return EXIT_OK


def cmd_keys_init(args: argparse.Namespace) -> int:
    from models.channel import create, init_keys

    root_key, root = init_keys(args.keys, args.channel, args.root_key)
    create(args.channel, args.keys, root, args.name)
    print(f"channel {args.name!r} created in {args.channel}")
    print(f"online keys (targets, snapshot, timestamp): {args.keys}")
    print(f"ROOT KEY: {root_key}: move it to offline storage; publishing never needs it")
    print(f"provision devices with {args.channel / 'metadata' / '1.root.json'} (config ota.root)")
    return EXIT_OK


def _golden_for(args: argparse.Namespace, runner: object, target: str) -> dict:
    from models.golden import record_golden

    if args.golden is not None:
        try:
            return json.loads(args.golden.read_text())
        except (OSError, ValueError) as exc:
            raise FactoryError(f"cannot read the golden set {args.golden}: {exc}") from None
    if args.model.suffix.lower() != ".onnx":
        raise FactoryError("--golden-images records with ONNX models only; pass --golden FILE")
    if not args.golden_images:
        raise FactoryError("the golden self-test set needs --golden-images or --golden FILE")
    return record_golden(args.model, args.golden_images, runner=runner, target=target)


def cmd_publish(args: argparse.Namespace) -> int:
    from models.channel import inspect_onnx
    from models.kernels import verification

    evaluated = args.info or args.model
    target = _target_for(evaluated, args.target)
    if target in CONVERTED_TARGETS:
        with tempfile.TemporaryDirectory(prefix="edge-models-publish-") as work:
            shipped, runner, info = _converted_for(args, target, Path(work))
            return _gate_and_publish(args, target, shipped, args.model, runner, info)
    info = inspect_onnx(args.info) if args.info is not None else None
    runner = verification(target, args.unverified_target)
    return _gate_and_publish(args, target, args.model, evaluated, runner, info, _engines(args))


def _engines(args: argparse.Namespace) -> list[tuple[Path, dict]]:
    """The prebuilt engines to ship, each checked to come from the model published."""
    from models.convert.tensorrt import engine_record

    if args.engine and (args.model.suffix.lower() != ".onnx" or not args.target
                        or not args.target.startswith("jetson")):  # fmt: skip
        raise FactoryError("--engine ships TensorRT engines beside their ONNX for a jetson-* "
                           "target: --model ONNX --target jetson-<class>")  # fmt: skip
    return [(engine, engine_record(engine, args.model)) for engine in args.engine]


def _converted_for(args: argparse.Namespace, target: str, work: Path) -> tuple[Path, Any, Any]:
    """Convert the float ONNX for ``target`` once, running the simulator on every image the gate
    and the golden set will judge: the file to ship, the runner that answers for it, its info."""
    from agent.config import ModelConfig
    from agent.vision import load_backend
    from models.channel import inspect_onnx
    from models.convert.rknn import SimulatorRunner, convert
    from models.datasets import load_dataset
    from models.evaluate import letterboxed
    from models.golden import golden_images, golden_inputs

    if args.model.suffix.lower() != ".onnx" or args.info is not None:
        raise FactoryError(
            f"publish --target {target} converts the float ONNX itself (--model fp32.onnx "
            "--calib DIR): a written .rknn cannot be verified, the toolkit's simulator runs only "
            "the build it made"
        )
    if args.calib is None:
        raise FactoryError(f"publish --target {target} needs --calib DIR (calibration images)")
    info = inspect_onnx(args.model)
    if info.precision not in ("fp32", "fp16"):
        raise FactoryError(
            f"{args.model.name} is {info.precision}: {target} quantizes the float model itself"
        )
    reference = load_backend("onnxruntime", args.model, ModelConfig(path=args.model))
    try:
        tensors = []
        if not args.no_gate and args.data is not None:
            tensors += [t for t, _ in letterboxed(reference, load_dataset(args.data))]
        if args.golden is None and args.golden_images:
            entries = golden_images(args.golden_images)
            tensors += [t for t, _ in golden_inputs(entries, info.imgsz, info.input_dtype)]
    finally:
        reference.close()
    shipped = work / "model.rknn"
    conversion = convert(args.model, args.calib, shipped, tensors, imgsz=info.imgsz)
    return shipped, SimulatorRunner.of(tensors, conversion), replace(info, precision="int8")


def _gate_and_publish(
    args: argparse.Namespace,
    target: str,
    shipped: Path,
    evaluated: Path,
    runner: Any,
    info: Any,
    engines: list[tuple[Path, dict]] | None = None,
) -> int:
    """The quality gate on ``runner`` (``evaluated`` is what it judges), the golden set on the
    same runner, then ``shipped`` into the channel; a failed gate publishes nothing."""
    from models.channel import publish
    from models.gate import gate_model
    from models.kernels import SemanticsRunner

    verified = {"target": target, "kernels": runner.describe()}
    if isinstance(runner, SemanticsRunner):
        verified["unverified_target"] = True
    gate: dict = {}
    if args.no_gate:
        print("WARNING: --no-gate: publishing without the quality gate", file=sys.stderr)
        gate = {"skipped": True, **verified}
    else:
        if args.reference is None or args.data is None:
            raise FactoryError("the quality gate needs --reference and --data (or --no-gate)")
        result = gate_model(
            evaluated,
            args.reference,
            args.data,
            args.rounds,
            args.max_map_drop,
            args.max_latency_ratio,
            runner,
        )
        if not result.passed:
            print(f"FAIL {args.model.name}: not published", file=sys.stderr)
            for reason in result.reasons:
                print(f"  - {reason}", file=sys.stderr)
            return EXIT_GATE
        gate = {"passed": True, "checks": result.checks, **verified}
    published = publish(
        args.channel,
        args.keys,
        shipped,
        args.version,
        _golden_for(args, runner, target),
        name=args.name,
        target=target,
        rollout_percent=args.rollout,
        min_agent_version=args.min_agent_version,
        info=info,
        gate=gate,
        engines=engines,
    )
    print(
        f"published {published.name} {published.version} for {published.target} "
        f"({published.length} bytes, sha256 {published.sha256[:12]}; rollout {args.rollout:g}%; "
        f"timestamp v{published.timestamp_version})"
    )
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace) -> int:
    from models.channel import set_rollout, withdraw

    if args.auto:
        return _auto_rollout(args)
    if args.withdraw is not None:
        release = withdraw(args.channel, args.keys, args.name, args.version, args.withdraw)
        print(f"{args.name} {args.version}: withdrawn ({release.withdrawn}); rollout now 0%")
        return EXIT_OK
    old = set_rollout(args.channel, args.keys, args.name, args.version, args.percent)
    print(f"{args.name} {args.version}: rollout {old:g}% -> {args.percent:g}%")
    return EXIT_OK


def _auto_rollout(args: argparse.Namespace) -> int:
    """The health-gated controller: 0 while it goes well or is done, EXIT_HALTED on a halt."""
    from agent.link import broker_config
    from models.channel.rollout import RolloutPolicy, parse_steps
    from models.channel.rollout_controller import ControllerSettings, RolloutController

    if args.interval <= 0 or args.wait < 0:
        raise FactoryError("--interval must be > 0 and --wait >= 0")
    if args.egress_mbps is not None and not args.egress_mbps > 0:
        raise FactoryError(f"--egress-mbps must be > 0, got {args.egress_mbps:g}")
    try:
        policy = RolloutPolicy(
            steps=parse_steps(args.steps),
            max_failure_rate=args.max_failure_rate,
            min_outcomes=args.min_outcomes,
            success_share=args.success_share,
            soak_s=args.soak,
            withdraw_on_halt=args.withdraw_on_halt,
        )
    except ValueError as exc:
        raise FactoryError(str(exc)) from None
    settings = ControllerSettings(
        args.channel,
        args.keys,
        args.name,
        args.version,
        policy,
        args.log,
        not args.no_announce,
        args.egress_mbps,
    )
    controller = RolloutController(settings, broker_config(args))  # an unknown release stops here
    controller.connect(args.timeout, args.wait)  # and an unreachable broker here: nothing signed
    try:
        decision = controller.run(args.interval, args.once)
    finally:
        controller.close()
    return EXIT_HALTED if decision.action == "halt" else EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    """A float model for an accelerator; with --data, its mAP on the simulator beside the float."""
    from agent.config import ModelConfig
    from agent.vision import load_backend
    from models.convert.rknn import convert
    from models.datasets import load_dataset
    from models.evaluate import letterboxed, outputs_map

    reference = load_backend("onnxruntime", args.model, ModelConfig(path=args.model))
    dataset = load_dataset(args.data) if args.data is not None else None
    items = letterboxed(reference, dataset) if dataset is not None else []
    tensors = [tensor for tensor, _ in items]
    done = convert(args.model, args.calib, args.out, tensors, args.full_graph, reference.info.imgsz)
    rows = []
    if dataset is not None:
        boxes = [box for _, box in items]
        for name, runtime, outputs in (
            (args.model.name, "onnxruntime fp32", [reference.infer(t) for t in tensors]),
            (args.out.name, f"{args.target} int8 (rknn-toolkit2 simulator)", done.outputs),
        ):
            map50_95, map50 = outputs_map(dataset, outputs, boxes, reference.info.class_names)
            rows.append({"model": name, "runtime": runtime, "map50_95": map50_95, "map50": map50})
    if args.json:
        print(json.dumps({"out": str(done.rknn), "target": args.target, "results": rows}, indent=2))
        return EXIT_OK
    print(f"wrote {done.rknn} for {args.target} ({done.rknn.stat().st_size} bytes)")
    for row in rows:
        print(f"  {row['runtime']:<40} mAP50-95 {row['map50_95']:.4f}  mAP50 {row['map50']:.4f}")
    return EXIT_OK


def cmd_build_engine(args: argparse.Namespace) -> int:
    """A TensorRT engine of an ONNX model, built here (a device of the target class)."""
    from models.convert.tensorrt import build

    record = build(args.model, args.out, args.precision, args.workspace_mb)
    print(
        f"wrote {args.out} ({record['precision']}, TensorRT {record['tensorrt']}, {record['gpu']} "
        f"sm {record['compute_capability']}) and {args.out.name}.json"
    )
    return EXIT_OK


def _in_train_env(args: argparse.Namespace) -> int | None:
    """None where torch is importable here; else the exit code of this command re-run in the
    training environment."""
    from models.optimize.environment import has_toolchain, run_there

    return None if has_toolchain() else run_there(args.argv)


def cmd_prune(args: argparse.Namespace) -> int:
    from models.optimize.checks import check_ratio, check_schedule

    check_ratio(args.ratio)  # before anything heavy, here or there
    check_schedule(args.steps, args.stages, args.round_to)
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.recovery import prune_model

    record = prune_model(args.model, args.out, args.ratio, args.frames, args.steps, args.round_to,
                         args.stages, args.size, args.data, args.overwrite,
                         checkpoint_s=args.checkpoint_every, device=args.device)  # fmt: skip
    params0, params1 = record["params"]
    print(
        f"wrote {args.out}: {params0 / 1e6:.2f} M -> {params1 / 1e6:.2f} M parameters, MACs "
        f"{record['macs_ratio']:.1%} of the source's; {record['steps']} recovery step(s), loss "
        f"{record['loss'][0] if record['loss'] else '-'} -> "
        f"{record['loss'][1] if record['loss'] else '-'}"
    )
    return EXIT_OK


def cmd_distill(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise FactoryError("--steps must be >= 1")
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.recovery import distill_model

    record = distill_model(args.teacher, args.student, args.out, args.frames, args.steps,
                           args.size, args.data, args.overwrite,
                           checkpoint_s=args.checkpoint_every, device=args.device)  # fmt: skip
    print(f"wrote {args.out}: {record['steps']} step(s), loss {record['loss'][0]} -> "
          f"{record['loss'][1]} ({record['seconds']} s)")  # fmt: skip
    return EXIT_OK


def cmd_qat(args: argparse.Namespace) -> int:
    from models.kernels import known_target
    from models.optimize.checks import check_schedule
    from models.recipes import recipe

    check_schedule(args.steps)
    known_target(args.target)
    recipe(args.target)  # a target the quantizer does not make (rk3588) is refused here
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.recovery import qat_model

    record = qat_model(args.model, args.out, args.frames, args.steps, args.target, args.size,
                       args.data, args.overwrite, checkpoint_s=args.checkpoint_every,
                       device=args.device)  # fmt: skip
    print(f"wrote {args.out} for {args.target} ({record['scheme']} QDQ by quantization-aware "
          f"training: {record['fake_quantizers']} fake quantizers, {record['steps']} step(s), "
          f"loss {record['loss'][0]} -> {record['loss'][1]})")  # fmt: skip
    return EXIT_OK


def cmd_optimize(args: argparse.Namespace) -> int:
    from models.kernels import known_target
    from models.optimize.chain import parse_chains
    from models.optimize.checks import check_ratio, check_schedule
    from models.recipes import recipe

    chains = parse_chains(args.chains)
    check_ratio(args.ratio)
    check_schedule(args.steps, args.stages)
    check_schedule(args.qat_steps)
    known_target(args.target)
    recipe(args.target)
    elsewhere = _in_train_env(args)
    if elsewhere is not None:
        return elsewhere
    from models.optimize.chain import optimize

    optimize(args.model, args.frames, args.data, args.target, args.report, chains, args.ratio,
             args.steps, args.qat_steps, args.size, args.rounds, args.overwrite,
             args.stages, args.device)  # fmt: skip
    report = json.loads((args.report / "report.json").read_text())
    markdown = (args.report / "report.md").read_text().splitlines()
    print("\n".join(line for line in markdown if line.startswith("|")))
    print(f"wrote {args.report}/report.md, report.json and plots; models in {args.report}/models "
          f"({len(report['models']) - 1} optimised)")  # fmt: skip
    return EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    from models.channel import refresh

    version = refresh(args.channel, args.keys)
    print(f"re-signed snapshot and timestamp (timestamp v{version})")
    return EXIT_OK


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        help="devices it is for (default: what the model was made for, else this machine's); "
        "verified on that target's kernels, here or under emulation",
    )
    parser.add_argument(
        "--unverified-target",
        action="store_true",
        help="a target whose kernels cannot run here: judge the model's float semantics "
        "instead (recorded in the descriptor)",
    )


def _recovery_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frames", type=Path, required=True, help="unlabelled images to learn from"
    )
    parser.add_argument("--steps", type=int, default=200, help="distillation steps (200)")
    parser.add_argument("--size", type=int, default=320, help="training input size (320)")
    parser.add_argument("--data", type=Path, help="the evaluation set: frames in it are refused")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--checkpoint-every", type=float, default=60.0, metavar="S",
        help="save the training state every S seconds (60); the same command run again after "
        "an interruption resumes from it (Ctrl-C once: stop after this step, state saved)",
    )  # fmt: skip
    _device_argument(parser)


def _device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="where distillation and QAT train: "
        "auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, cuda:N",
    )


def build_parser() -> argparse.ArgumentParser:
    from agent.link import add_broker_arguments

    parser = argparse.ArgumentParser(
        prog="edge-models",
        description="Quantize, evaluate, gate and golden-record YOLOv8 models for edge-agent.",
    )
    parser.add_argument("--version", action="version", version=f"edge-models {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser("quantize", help="INT8 post-training static quantization to QDQ ONNX")
    q.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    q.add_argument(
        "--calib",
        type=Path,
        required=True,
        help="folder of calibration images (not evaluation images)",
    )
    q.add_argument("--out", type=Path, required=True, help="INT8 ONNX to write (must not exist)")
    q.add_argument("--method", choices=["minmax", "entropy", "percentile"], default="minmax")
    q.add_argument(
        "--per-channel",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="per-channel weight scales (default on)",
    )
    q.add_argument(
        "--target",
        help="deployment target (default: this machine's; `edge-agent target` prints it): "
        "picks the recipe its kernels run fast and right",
    )
    q.add_argument(
        "--activations",
        choices=["int8", "uint8"],
        help="override the target's recipe: int8 = S8S8, uint8 = U8S8",
    )
    q.add_argument(
        "--reduce-range",
        choices=["none", "first", "all"],
        help="override the target's recipe: 7-bit weights in no, the first, or every conv",
    )
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser(
        "evaluate", help="mAP, latency, size, parameters and agreement, side by side"
    )
    e.add_argument(
        "--model",
        type=Path,
        action="append",
        required=True,
        help="repeat; the first is the reference",
    )
    e.add_argument(
        "--data", type=Path, required=True, help="YOLO folder (images/ + labels/) or COCO .json"
    )
    e.add_argument(
        "--report", type=Path, help="write report.md, report.json and comparison.png here"
    )
    e.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    g = sub.add_parser(
        "gate", help="pass or fail a candidate against a reference model or stored result"
    )
    g.add_argument("--candidate", type=Path, required=True)
    g.add_argument(
        "--reference", type=Path, required=True, help="the float model, or a stored report.json"
    )
    g.add_argument("--data", type=Path, required=True)
    g.add_argument("--max-map-drop", type=float, default=1.0, help="mAP50-95 points (default 1.0)")
    g.add_argument(
        "--max-latency-ratio",
        type=float,
        default=1.10,
        help="vs the reference model (default 1.10)",
    )
    g.add_argument("--rounds", type=int, default=20)
    _target_arguments(g)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_gate)

    d = sub.add_parser("golden", help="record the golden self-test set that travels with a model")
    d.add_argument("--model", type=Path, required=True)
    d.add_argument("--images", type=Path, nargs="+", required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_golden)

    c = sub.add_parser(
        "calibration-set", help="synthesise varied calibration frames from a few photos"
    )
    c.add_argument("--images", type=Path, nargs="+", required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--per-image", type=int, default=16)
    c.set_defaults(func=cmd_calibration_set)

    k = sub.add_parser("keys", help="signing keys of an OTA channel")
    k_sub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    ki = k_sub.add_parser("init", help="make Ed25519 keys and a new, empty signed channel")
    ki.add_argument("--keys", type=Path, required=True, help="folder for the online keys")
    ki.add_argument("--channel", type=Path, required=True, help="channel folder to create")
    ki.add_argument("--root-key", type=Path, help="root key file (default <keys>/offline/root.pem)")
    ki.add_argument("--name", default="stable", help="channel name (default stable)")
    ki.set_defaults(func=cmd_keys_init)

    p = sub.add_parser("publish", help="gate a model and publish it to an OTA channel")
    p.add_argument("--channel", type=Path, required=True)
    p.add_argument("--keys", type=Path, required=True, help="online keys (keys init)")
    p.add_argument("--model", type=Path, required=True, help="model file (.onnx, .engine, .rknn)")
    p.add_argument("--version", dest="version", required=True, help="semantic version, 1.2.0")
    p.add_argument("--name", help="model line devices follow (default: the model's name)")
    p.add_argument("--rollout", type=float, default=100.0, help="percent of devices (100)")
    p.add_argument("--min-agent-version", default=__version__)
    p.add_argument("--info", type=Path, help="for an engine: the ONNX it was built from")
    p.add_argument(
        "--calib", type=Path, help="rk3588: calibration images (the float model is converted)"
    )
    p.add_argument(
        "--engine",
        type=Path,
        action="append",
        default=[],
        help="jetson-*: a TensorRT engine built from --model by build-engine (repeatable: one per "
        "TensorRT version and GPU); devices that match take it, others build their own",
    )
    p.add_argument("--golden", type=Path, help="golden set (edge-models golden)")
    p.add_argument("--golden-images", type=Path, nargs="+", help="record the golden set here")
    p.add_argument("--reference", type=Path, help="gate: float model or stored report.json")
    p.add_argument("--data", type=Path, help="gate: evaluation dataset")
    p.add_argument("--max-map-drop", type=float, default=1.0)
    p.add_argument("--max-latency-ratio", type=float, default=1.10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--no-gate", action="store_true", help="skip the quality gate (recorded)")
    _target_arguments(p)
    p.set_defaults(func=cmd_publish)

    r = sub.add_parser(
        "rollout",
        help="set, withdraw or drive (--auto) the share of devices a release goes to",
        description="--percent sets the share by hand; --withdraw stops every device that has "
        "not taken the release; --auto raises the share step by step while the devices that took "
        "it commit it, and halts when failures in the cohort pass --max-failure-rate (exit 4).",
    )
    r.add_argument("--channel", type=Path, required=True)
    r.add_argument("--keys", type=Path, required=True, help="online keys (no root key needed)")
    r.add_argument("--name", required=True)
    r.add_argument("--version", dest="version", required=True)
    mode = r.add_mutually_exclusive_group(required=True)
    mode.add_argument("--percent", type=float, help="set the share (0-100)")
    mode.add_argument("--withdraw", metavar="REASON", help="withdraw the release, saying why")
    mode.add_argument("--auto", action="store_true", help="health-gated staged rollout")
    auto = r.add_argument_group("--auto")
    auto.add_argument("--steps", default="1,5,25,100", help="percent steps (default 1,5,25,100)")
    auto.add_argument("--max-failure-rate", type=float, default=0.10, help="halt above (0.10)")
    auto.add_argument(
        "--min-outcomes", type=int, default=5, help="outcomes before a halt can trigger (5)"
    )
    auto.add_argument(
        "--success-share", type=float, default=0.90, help="committed share before a raise (0.90)"
    )
    auto.add_argument("--soak", type=float, default=600.0, help="seconds at a step, at least (600)")
    auto.add_argument("--interval", type=float, default=30.0, help="seconds between decisions")
    auto.add_argument("--once", action="store_true", help="one decision, then exit (for cron)")
    auto.add_argument("--withdraw-on-halt", action="store_true", help="a halt also withdraws")
    auto.add_argument("--no-announce", action="store_true", help="do not announce a raise")
    auto.add_argument(
        "--egress-mbps",
        type=float,
        help="a raise asks the devices it adds to spread their downloads so the channel serves "
        "at most this many Mbit/s on average (devices never wait less than their own jitter)",
    )
    auto.add_argument("--log", type=Path, help="append every decision to this JSON-lines file")
    auto.add_argument(
        "--wait", type=float, default=5.0, help="at most this long to read retained state (5 s)"
    )
    add_broker_arguments(auto)
    r.set_defaults(func=cmd_rollout)

    c = sub.add_parser(
        "convert",
        help="convert a float model for an accelerator (rk3588: INT8 .rknn, checked on the "
        "toolkit's simulator)",
    )
    c.add_argument("--target", required=True, choices=["rk3588"])
    c.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    c.add_argument("--calib", type=Path, required=True, help="calibration images folder")
    c.add_argument("--out", type=Path, required=True, help="the .rknn to write")
    c.add_argument(
        "--data", type=Path, help="also evaluate on the simulator beside the float model"
    )
    c.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument(
        "--full-graph",
        action="store_true",
        help="try the whole graph in INT8 (refused: shown on the simulator to collapse scores)",
    )
    c.set_defaults(func=cmd_convert)

    b = sub.add_parser(
        "build-engine",
        help="build a TensorRT engine here (run it on a device of the target class: an engine "
        "runs only on the TensorRT version and GPU that built it)",
    )
    b.add_argument("--model", type=Path, required=True, help="ONNX (QDQ INT8 or float)")
    b.add_argument("--out", type=Path, required=True, help="the .engine to write")
    b.add_argument("--precision", choices=["auto", "int8", "fp16", "fp32"], default="auto",
                   help="auto: int8 for a QDQ model, fp16 for a float one")  # fmt: skip
    b.add_argument("--workspace-mb", type=int, default=1024)
    b.set_defaults(func=cmd_build_engine)

    pr = sub.add_parser(
        "prune",
        help="structured (DepGraph) pruning with sensitivity analysis and distillation recovery",
        description="Prunes channels by dependency groups (torch-pruning), less in the blocks "
        "that hurt most, in --stages steps each followed by distillation from the unpruned model "
        "on unlabelled --frames. Runs in the training environment (scripts/setup-train.sh).",
    )
    pr.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    pr.add_argument("--ratio", type=float, required=True, help="share of channels to remove (0.3)")
    pr.add_argument("--round-to", type=int, default=8, help="keep channel counts multiples of N")
    _recovery_arguments(pr)
    pr.add_argument("--stages", type=int, default=3, help="prune in this many steps (3)")
    pr.set_defaults(func=cmd_prune)

    di = sub.add_parser("distill", help="distil a teacher into a student of the same head")
    di.add_argument("--teacher", type=Path, required=True)
    di.add_argument("--student", type=Path, required=True)
    _recovery_arguments(di)
    di.set_defaults(func=cmd_distill)

    qa = sub.add_parser(
        "qat",
        help="quantization-aware training: fake-quantized fine-tuning with distillation from the "
        "float model, exported as the target's QDQ form",
    )
    qa.add_argument("--model", type=Path, required=True, help="float (or pruned) YOLOv8 ONNX")
    qa.add_argument("--target", required=True, help="deployment target (its INT8 recipe)")
    _recovery_arguments(qa)
    qa.set_defaults(func=cmd_qat)

    op = sub.add_parser(
        "optimize",
        help="run optimisation chains (ptq, prune, prune+ptq, qat) and write one before/after "
        "report",
    )
    op.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    op.add_argument("--frames", type=Path, required=True, help="unlabelled frames (calibration, "
                    "recovery, QAT)")  # fmt: skip
    op.add_argument("--data", type=Path, required=True, help="the evaluation set")
    op.add_argument("--target", required=True, help="deployment target")
    op.add_argument("--report", type=Path, required=True, help="report folder to write")
    op.add_argument("--chains", default="ptq,prune,prune+ptq,qat")
    op.add_argument("--ratio", type=float, default=0.3)
    op.add_argument("--steps", type=int, default=300, help="recovery steps after pruning (300)")
    op.add_argument("--stages", type=int, default=3, help="prune in this many steps (3)")
    op.add_argument("--qat-steps", type=int, default=100)
    op.add_argument("--size", type=int, default=320, help="training input size (320)")
    op.add_argument("--rounds", type=int, default=30, help="latency rounds (30)")
    op.add_argument("--overwrite", action="store_true")
    _device_argument(op)
    op.set_defaults(func=cmd_optimize)

    f = sub.add_parser("refresh", help="re-sign snapshot and timestamp before they expire")
    f.add_argument("--channel", type=Path, required=True)
    f.add_argument("--keys", type=Path, required=True)
    f.set_defaults(func=cmd_refresh)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AgentError as exc:
        print(f"edge-models: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
