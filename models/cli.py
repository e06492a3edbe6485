"""``edge-models``: quantize, evaluate, gate and golden-record YOLOv8 models for edge-agent devices.

User errors print one line naming the problem and exit non-zero, with no traceback and no partial
output file left behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.errors import AgentError
from models.errors import FactoryError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATE = 0, 1, 2, 3


def cmd_quantize(args: argparse.Namespace) -> int:
    from models.quantize import QuantizeSettings, quantize

    settings = QuantizeSettings(
        method=args.method, per_channel=args.per_channel, activations=args.activations
    )
    summary = quantize(
        args.model,
        args.calib,
        args.out,
        settings,
        overwrite=args.overwrite,
        progress=not args.quiet,
        on_stage=lambda text: print(f"- {text}", file=sys.stderr),
    )
    size_ratio = args.out.stat().st_size / args.model.stat().st_size
    print(
        f"wrote {args.out} ({summary['scheme']} QDQ, {summary['method']}, "
        f"{'per-channel' if summary['per_channel'] else 'per-tensor'}, "
        f"{summary['calibration_images']} calibration images, {size_ratio:.3f} x the source size)"
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


def _reference_entry(path: Path) -> dict:
    """A stored result: report.json (its first model) or a single ModelResult json."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FactoryError(f"cannot read the stored reference {path}: {exc}") from None
    entry = data["models"][0] if isinstance(data, dict) and "models" in data else data
    needed = {"map50_95", "mean_top_score", "detections_per_image"}
    if not isinstance(entry, dict) or not needed <= set(entry):
        raise FactoryError(
            f"{path} is not an evaluation result (needs {', '.join(sorted(needed))})"
        )
    return entry


def cmd_gate(args: argparse.Namespace) -> int:
    from models.datasets import load_dataset
    from models.evaluate import evaluate
    from models.gate import GateLimits, check

    dataset = load_dataset(args.data)
    stored = args.reference.suffix == ".json"
    models = [args.candidate] if stored else [args.reference, args.candidate]
    results = evaluate(models, dataset, latency_rounds=args.rounds)
    candidate = results[-1].to_dict()
    reference = _reference_entry(args.reference) if stored else results[0].to_dict()
    limits = GateLimits(
        max_map_drop_points=args.max_map_drop,
        max_latency_ratio=None if stored else args.max_latency_ratio,
    )
    result = check(candidate, reference, limits)
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


def build_parser() -> argparse.ArgumentParser:
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
        "--activations",
        choices=["int8", "uint8"],
        default="int8",
        help="int8 = S8S8 (default; aarch64, TensorRT); uint8 = U8S8 (x86-64 ONNX Runtime CPU)",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
