"""``edge-models quantize`` and ``calibration-set``: INT8 post-training quantization per target."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.cli.common import EXIT_OK


def cmd_quantize(args: argparse.Namespace) -> int:
    from models.calibration import CALIBRATION_FRAMES
    from models.quantize import quantize
    from models.recipes import recipe
    from models.release import host_target

    target = args.target or host_target()
    settings = recipe(
        target,
        method=args.method,
        percentile=args.percentile,
        per_channel=args.per_channel,
        activations=args.activations,
        reduce_range=args.reduce_range,
    )
    if args.target is None:
        print(f"- target {target} (this machine; --target to choose another)", file=sys.stderr)
    evaluation = []
    if args.data is not None:
        from models.datasets import load_dataset

        evaluation = [sample.image for sample in load_dataset(args.data).samples]
    summary = quantize(
        args.model,
        args.frames or args.calib,
        args.out,
        settings,
        overwrite=args.overwrite,
        progress=not args.quiet,
        on_stage=lambda text: print(f"- {text}", file=sys.stderr),
        target=target,
        frames=(CALIBRATION_FRAMES if args.count is None else args.count) if args.frames else None,
        evaluation=evaluation,
    )
    size_ratio = args.out.stat().st_size / args.model.stat().st_size
    print(
        f"wrote {args.out} for {target} ({summary['scheme']} QDQ, {summary['method']}"
        f"{' ' + str(summary['percentile']) if summary['method'] == 'percentile' else ''}, "
        f"{'per-channel' if summary['per_channel'] else 'per-tensor'}, 7-bit weights: "
        f"{summary['reduce_range']}, {summary['calibration_images']} calibration images, "
        f"{size_ratio:.3f} x the source size)"
    )
    return EXIT_OK


def cmd_calibration_set(args: argparse.Namespace) -> int:
    from models.calibration import synthesise

    written = synthesise(args.images, args.out, per_image=args.per_image)
    print(f"wrote {len(written)} calibration images to {args.out}")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="INT8 post-training static quantization to QDQ ONNX")
    q.add_argument("--model", type=Path, required=True, help="float YOLOv8 ONNX")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--frames",
        type=Path,
        help="folder of your camera's frames: --count of them picked evenly, files that are "
        "not images or do not decode skipped and reported (never evaluation images)",
    )
    source.add_argument(
        "--calib",
        type=Path,
        help="folder of calibration images, all used, each must decode (e.g. calibration-set's)",
    )
    q.add_argument("--count", type=int, help="frames picked from --frames (default 300)")
    q.add_argument(
        "--data",
        type=Path,
        help="the evaluation set: calibration images that are also in it are refused",
    )
    q.add_argument("--out", type=Path, required=True, help="INT8 ONNX to write (must not exist)")
    q.add_argument(
        "--method",
        choices=["minmax", "entropy", "percentile"],
        help="activation ranges: percentile (default: clipped at --percentile of every value "
        "the frames produce), minmax (the extremes), entropy (ONNX Runtime's, slow)",
    )
    q.add_argument("--percentile", type=float, help="where percentile ranges clip (default 99.999)")
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

    c = sub.add_parser(
        "calibration-set", help="synthesise varied calibration frames from a few photos"
    )
    c.add_argument("--images", type=Path, nargs="+", required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--per-image", type=int, default=16)
    c.set_defaults(func=cmd_calibration_set)
