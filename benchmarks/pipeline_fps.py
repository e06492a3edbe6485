"""Issue 2 targets, measured in one run on the 1080p demo video:

- pipeline FPS >= 0.95 x bare inference FPS (median of interleaved rounds);
- preprocess + postprocess <= 3 ms p50 per 1080p frame.

Usage: python benchmarks/pipeline_fps.py [--model M] [--frames N] [--rounds R] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import shared_dir_or_exit

from agent.bench import print_bench, run_benchmark
from agent.config import ModelConfig
from agent.demo_inputs import DEMO_MODEL, open_demo_source
from agent.vision.backends import load_backend


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--source")
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the full report here")
    args = parser.parse_args()
    if args.model is None:
        args.model = shared_dir_or_exit(args.shared) / DEMO_MODEL
    backend = load_backend(
        "onnxruntime", args.model, ModelConfig(path=args.model, threads=args.threads)
    )
    report = run_benchmark(
        backend,
        lambda: open_demo_source(args.source, args.shared, "fast"),
        args.frames,
        args.rounds,
    )
    print_bench(report)
    alone = report["pre_post_isolated"]["sum_p50_ms"]
    ratio = report["pipeline_over_bare"]
    print()
    print(
        f"pipeline_fps / bare_inference_fps = {ratio:.3f}   target >= 0.95  "
        f"{'PASS' if ratio >= 0.95 else 'MISS'}"
    )
    print(
        f"preprocess + postprocess p50      = {alone:.2f} ms (alone on a 1080p frame), "
        f"{report['pre_post_p50_ms_in_pipeline']:.2f} ms (wall, inside the pipeline)   "
        f"target <= 3 ms  {'PASS' if alone <= 3.0 else 'MISS'}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
