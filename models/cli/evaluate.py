"""``edge-models evaluate``, ``gate`` and ``golden``: measuring models and recording references."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.vision import BACKEND_MODULES
from models.cli.common import EXIT_GATE, EXIT_OK, EXIT_USAGE, target_arguments


def resample_count(text: str) -> int:
    """0 (no interval) or at least 200: fewer gives a 95 % interval's ends from a handful."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value != 0 and value < 200:
        raise argparse.ArgumentTypeError(f"{value} resamples: use 0 (no interval) or >= 200")
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    from models.datasets import load_dataset
    from models.evaluate import evaluate
    from models.report import table, write_report

    runtimes = args.runtime or ["onnxruntime"]
    if len(runtimes) == 1:
        runtimes = runtimes * len(args.model)
    if len(runtimes) != len(args.model):
        print(
            f"error: {len(runtimes)} --runtime for {len(args.model)} --model: give one for all, "
            "or one per model in the same order",
            file=sys.stderr,
        )
        return EXIT_USAGE
    dataset = load_dataset(args.data)
    results = evaluate(
        args.model,
        dataset,
        latency_rounds=args.rounds,
        threads=args.threads,
        runtimes=runtimes,
        resamples=args.resamples,
        progress=not (args.json or args.quiet),
    )
    if args.report:
        write_report(results, dataset, args.report)
    for warning in (w for r in results for w in r.warnings):
        print(f"warning: {warning}", file=sys.stderr)
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
    from models.release import target_for

    runner = verification(target_for(args.candidate, args.target), args.unverified_target)
    result = gate_model(
        args.candidate,
        args.reference,
        args.data,
        args.rounds,
        args.max_map_drop,
        args.max_latency_ratio,
        runner,
        resamples=args.resamples,
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return EXIT_OK if result.passed else EXIT_GATE
    if result.passed:
        print(
            f"PASS {args.candidate.name}: "
            + ", ".join(f"{k} {v}" for k, v in result.checks.items())
        )
    else:
        print(f"FAIL {args.candidate.name}:", file=sys.stderr)
        for reason in result.reasons:
            print(f"  - {reason}", file=sys.stderr)
    if "map50_95_difference_interval" in result.checks:
        low, high = result.checks["map50_95_difference_interval"]
        drop = result.checks["map50_95_drop_points"]
        print(f"mAP50-95 {-drop:+.2f} points, 95 % interval {low:+.2f} … {high:+.2f} "
              f"({result.checks['images']} images)")  # fmt: skip
    return EXIT_OK if result.passed else EXIT_GATE


def cmd_golden(args: argparse.Namespace) -> int:
    from models.golden import record_golden, write_golden

    golden = record_golden(args.model, args.images)
    write_golden(golden, args.out, overwrite=args.overwrite)
    count = sum(len(e["detections"]) for e in golden["images"])
    print(f"wrote {args.out}: {len(golden['images'])} image(s), {count} reference detection(s)")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
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
    e.add_argument(
        "--resamples", type=resample_count, default=200, help="bootstrap resamples (0: none)"
    )
    e.add_argument(
        "--runtime",
        action="append",
        choices=sorted(BACKEND_MODULES),
        help="the agent backend that runs the models: once for all, or once per --model "
        "(default onnxruntime); the same file can be compared across runtimes",
    )
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--json", action="store_true")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
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
    g.add_argument(
        "--resamples", type=resample_count, default=200, help="bootstrap resamples (0: none)"
    )
    target_arguments(g)
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_gate)

    d = sub.add_parser("golden", help="record the golden self-test set that travels with a model")
    d.add_argument("--model", type=Path, required=True)
    d.add_argument("--images", type=Path, nargs="+", required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_golden)
