"""``edge-models convert`` and ``build-engine``: models in the formats accelerators run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.cli.common import EXIT_OK, bounded


def cmd_convert(args: argparse.Namespace) -> int:
    """A float model for an accelerator; with --data, its mAP on the simulator beside the float."""
    from models.convert.rknn import convert_and_compare

    done, rows = convert_and_compare(
        args.model, args.calib, args.out, args.data, args.full_graph, args.target,
        algorithm=args.algorithm, hybrid=args.hybrid,
        **({"count": args.count} if args.count is not None else {}),
    )  # fmt: skip
    if args.json:
        print(json.dumps({"out": str(done.rknn), "target": args.target, "results": rows}, indent=2))
        return EXIT_OK
    print(f"wrote {done.rknn} for {args.target} ({done.rknn.stat().st_size} bytes)")
    for row in rows:
        delta = ""
        if "delta_points" in row:
            low, high = row["interval_points"]
            delta = f"  {row['delta_points']:+.2f} pt (95 % {low:+.2f} … {high:+.2f})"
        print(f"  {row['runtime']:<40} mAP50-95 {row['map50_95']:.4f}  mAP50 {row['map50']:.4f}"
              + delta)  # fmt: skip
    return EXIT_OK


cosine = bounded(float, lambda v: 0 < v <= 1, "a cosine similarity in (0, 1]")
positive = bounded(int, lambda v: v >= 1, "a whole number of at least 1")


def cmd_build_engine(args: argparse.Namespace) -> int:
    """A TensorRT engine of an ONNX model, built here (a device of the target class)."""
    from models.convert.tensorrt import build

    record = build(args.model, args.out, args.precision, args.workspace_mb)
    print(
        f"wrote {args.out} ({record['precision']}, TensorRT {record['tensorrt']}, {record['gpu']} "
        f"sm {record['compute_capability']}) and {args.out.name}.json"
    )
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert",
        help="convert a float model for an accelerator (rk3588: INT8 .rknn, checked on the "
        "toolkit's simulator)",
    )
    c.add_argument("--target", required=True, choices=["rk3588"])
    c.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    c.add_argument("--calib", type=Path, required=True, help="calibration images folder")
    c.add_argument(
        "--count",
        type=positive,
        help="calibrate on this many of them, picked evenly (default 32: the toolkit's ranges "
        "are min-max, so more frames only widen them)",
    )
    c.add_argument("--out", type=Path, required=True, help="the .rknn to write")
    c.add_argument(
        "--data", type=Path, help="also evaluate on the simulator beside the float model"
    )
    c.add_argument(
        "--algorithm",
        choices=["normal", "kl_divergence", "mmse"],
        default="normal",
        help="how rknn-toolkit2 picks each tensor's range (normal: min-max)",
    )
    c.add_argument(
        "--hybrid",
        type=cosine,
        metavar="COSINE",
        help="keep in float16 the layers whose INT8 output falls below this cosine similarity "
        "to float on the calibration frames (rknn-toolkit2's auto hybrid; slower on the NPU: on "
        "YOLOv8n 0.95 kept a quarter of the MACs in float16)",
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
