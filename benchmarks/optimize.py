"""The accuracy-vs-latency curve of pruning on real data, in one run (long: not in CI).

For each --ratios (share of channels removed, rounded to 8): `edge-models prune` without
recovery (--steps 0), the same with --steps of distillation from the float model on
--frames (../shared/frames/voc2007-train: unlabelled, none of them an evaluation image), then this
machine's INT8 recipe on top of the distilled model (`edge-models quantize`, 300 of the same
frames) and, with --qat-steps, quantization-aware training of the distilled model instead
(`edge-models qat --teacher` the float model: it goes on recovering what pruning lost). One
`evaluate` run then measures every model side by side on voc2007-val (990 photos):
mAP50-95 with the paired bootstrap 95 % interval of its change, latency ratio to fp32
(interleaved rounds on this CPU), size, MACs. Each point's recovery wall time and steps are
printed with the hardware.

Goal (issue 27) on a 2-core x86 CPU within 60 minutes of recovery a point: prune + distill +
INT8 <= 0.45 x fp32 latency at <= 3 points of mAP50-95 below fp32.

Run it with the training environment's Python (torch): `$(bash scripts/setup-train.sh)
benchmarks/optimize.py`. About --steps x 0.8 s a ratio at 640 px on a quiet 2-core AMD EPYC
(Zen 5): 4200 steps is the goal's 60 minutes there; about 1.2 s on a Zen 3 EPYC, 1.0 s on an
Intel Xeon (family 6 model 167).

Usage: python benchmarks/optimize.py [--ratios 0.1,0.2,0.3,0.4] [--steps 2400] [--size 640]
       [--lr 1e-4] [--qat-steps 0] [--qat-lr 1e-4] [--rounds 40] [--report DIR] [--data DIR]
       [--frames DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, shared_dir_or_exit

from agent.contract import detect
from agent.demo_inputs import DEMO_MODEL
from models.datasets import load_dataset
from models.evaluate import evaluate
from models.report import table, write_report


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4", help="pruning ratios")
    parser.add_argument("--steps", type=int, default=2400, help="recovery steps a ratio (2400)")
    parser.add_argument("--size", type=int, default=640, help="training input size (640)")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    parser.add_argument(
        "--qat-steps",
        type=int,
        default=0,
        help="QAT steps on top of each distilled model, taught by fp32 (0: none)",
    )
    parser.add_argument("--qat-lr", type=float, default=1e-4, help="QAT's peak rate (1e-4)")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved latency rounds")
    parser.add_argument("--data", type=Path, help="evaluation set (default: voc2007-val)")
    parser.add_argument("--frames", type=Path, help="recovery frames (default: voc2007-train)")
    parser.add_argument("--report", type=Path, help="keep the report and the models here")
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    data = args.data or shared / "datasets" / "voc2007-val"
    frames = args.frames or shared / "frames" / "voc2007-train"
    ratios = [float(r) for r in args.ratios.split(",")]
    host = detect()
    fp32 = shared / DEMO_MODEL
    print(f"this machine: {host.describe()}", file=sys.stderr)

    def cli(*arguments: object) -> float:
        started = time.monotonic()
        # the training environment's Python finds the project by path, from any folder
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run([sys.executable, "-m", "models.cli", *map(str, arguments)], env=env)
        if done.returncode != 0:
            raise SystemExit(done.returncode)
        return time.monotonic() - started

    with tempfile.TemporaryDirectory(prefix="edge-curve-") as tmp:
        work = args.report / "models" if args.report else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        common = ["--frames", frames, "--data", data, "--size", args.size, "--overwrite"]
        models, seconds = [fp32], {}
        ptq = work / "ptq.onnx"
        cli("quantize", "--model", fp32, "--frames", frames, "--data", data, "--out", ptq,
            "--target", host.target, "--quiet", "--overwrite")  # fmt: skip
        models.append(ptq)
        for ratio in ratios:
            name = f"prune{round(ratio * 100)}"
            bare, distilled = work / f"{name}.onnx", work / f"{name}+distill.onnx"
            cli("prune", "--model", fp32, "--ratio", ratio, "--steps", 0,
                "--stages", args.stages, "--out", bare, *common)  # fmt: skip
            seconds[ratio] = cli("prune", "--model", fp32, "--ratio", ratio, "--steps",
                                 args.steps, "--stages", args.stages, "--lr", args.lr,
                                 "--out", distilled, *common)  # fmt: skip
            final = work / f"{name}+distill+int8.onnx"
            cli("quantize", "--model", distilled, "--frames", frames, "--data", data, "--out",
                final, "--target", host.target, "--quiet", "--overwrite")  # fmt: skip
            models += [bare, distilled, final]
            if args.qat_steps:
                taught = work / f"{name}+distill+qat.onnx"
                seconds[f"{ratio}+qat"] = cli(
                    "qat", "--model", distilled, "--teacher", fp32, "--target", host.target,
                    "--steps", args.qat_steps, "--lr", args.qat_lr, "--out", taught,
                    *common)  # fmt: skip
                models.append(taught)
        dataset = load_dataset(data)
        results = evaluate(models, dataset, latency_rounds=args.rounds)
        if args.report:
            write_report(results, dataset, args.report, __doc__ or "")
    print(table(results))
    print(f"\nCPU: {host.describe()}; recovery {args.steps} steps at {args.size} px in "
          f"{args.stages} stages, peak learning rate {args.lr:g}, on {frames.name}, on this "
          "CPU")  # fmt: skip
    reference = results[0]
    for ratio in ratios:
        for last, extra in (("int8", 0.0), ("qat", seconds.get(f"{ratio}+qat", 0.0))):
            name = f"prune{round(ratio * 100)}+distill+{last}"
            final = next((r for r in results if r.name.startswith(name)), None)
            if final is None:
                continue
            latency = final.latency_p50_ms / reference.latency_p50_ms
            drop = (reference.map50_95 - final.map50_95) * 100
            verdict = "PASS" if latency <= 0.45 and drop <= 3.0 else "MISS"
            print(f"{ratio:.0%} + distill + {last.upper()}: latency {latency:.3f} x fp32, "
                  f"mAP50-95 {-drop:+.2f} points, training {(seconds[ratio] + extra) / 60:.0f} "
                  f"min: {verdict} (goal <= 0.45 x at <= 3 points)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
