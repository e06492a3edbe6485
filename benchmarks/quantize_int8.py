"""INT8 per target, side by side in one run: every target whose kernels run here.

For this machine's target (natively, timed) and for cpu-aarch64 (ONNX Runtime's aarch64 build
under qemu, accuracy only) it makes the target's recipe (`edge-models quantize --target`) and
prints scheme, size ratio, latency ratio to fp32 (interleaved: one inference per model per round)
and mAP50-95 on ../shared/datasets/voc2007-val (990 photos) with its drop and the drop's paired
bootstrap 95 % interval. For contrast it also runs, on this CPU, the same recipe with min-max
ranges (the recipe before percentile ranges), the other x86 recipe (full-range
U8S8 is wrong here without VNNI; the 7-bit one is right everywhere), S8S8 and the shared
int8-dynamic model. The aarch64 model runs under qemu (slow): on the first ``--arm-images`` of
the set, beside the fp32 model on the same images.

Targets on this machine class: plain x86 INT8 <= 0.7 x fp32 latency with <= 1 point drop;
aarch64 accuracy within 1 point of fp32. Calibration uses ``--calib-frames`` frames spread over
../shared/frames/voc2007-train (none of them an evaluation image).

Usage: python benchmarks/quantize_int8.py [--report DIR] [--rounds 60] [--calib-frames 300]
       [--data DIR] [--arm-images 100] [--no-aarch64]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from common import shared_dir_or_exit

from agent.contract import detect
from agent.demo_inputs import DEMO_MODEL
from models.calibration import calibration_images
from models.datasets import load_dataset
from models.evaluate import evaluate
from models.kernels import runner_for
from models.quantize import QuantizeSettings, quantize
from models.recipes import recipe
from models.report import table, write_report

NOTES = """## Why these recipes

- Activation ranges end at the 99.999th percentile of every value the calibration frames
  produce (exact, streamed). Min-max ranges are set by a few outliers in hundreds of frames and
  widen every INT8 step: on voc2007-val they cost about 3 points more (the `-minmax` row).
- Static QDQ fixes activation scales at calibration, so ONNX Runtime fuses DequantizeLinear ->
  Conv -> QuantizeLinear into integer convolutions: that is the speed-up. The shared
  `int8-dynamic` model quantizes activations on every inference and is no faster than fp32.
- On x86 ONNX Runtime fuses QDQ only with uint8 activations (U8S8); S8S8 stays float between Q/DQ
  pairs there, slower than fp32. Without VNNI its kernels (vpmaddubsw) add pairs of u8 x s8
  products in 16 bits and saturate where full-range weights meet bright pixels: the first conv.
  `cpu-x86_64` therefore uses 7-bit weights in the first conv only; `cpu-x86_64-vnni` keeps full
  range (VNNI accumulates in 32 bits).
- `cpu-aarch64` uses S8S8, ONNX Runtime's default form, which its ARM kernels fuse; its accuracy
  is measured on those kernels under qemu (speed cannot be, there).
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--shared", type=Path)
    parser.add_argument("--report", type=Path, help="also write report.md/json/png here")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--no-aarch64", action="store_true", help="skip the emulated target")
    parser.add_argument("--data", type=Path, help="evaluation set (default: voc2007-val)")
    parser.add_argument("--calib-frames", type=int, default=300)
    parser.add_argument("--arm-images", type=int, default=100, help="emulated: images judged")
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    data = args.data or shared / "datasets" / "voc2007-val"
    fp32 = shared / DEMO_MODEL
    dynamic = shared / "models" / "yolov8n-coco-int8-dynamic.onnx"
    host = detect()
    print(f"this machine: {host.describe()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib"
        calib.mkdir()
        frames = calibration_images(shared / "frames" / "voc2007-train", "calibration")
        for path in frames[:: max(1, len(frames) // args.calib_frames)][: args.calib_frames]:
            shutil.copy(path, calib / path.name)

        def made(name: str, target: str, settings: QuantizeSettings) -> Path:
            out = work / f"{name}.onnx"
            quantize(fp32, calib, out, settings, progress=False, target=target)
            return out

        models, runners = [fp32], [None]
        own = made(f"int8-{host.target}", host.target, recipe(host.target))
        models.append(own)
        runners.append(None)
        minmax = recipe(host.target, method="minmax")  # the recipe before issue 27, for contrast
        models.append(made(f"int8-{host.target}-minmax", host.target, minmax))
        runners.append(None)
        if host.arch == "x86_64":
            other = "cpu-x86_64-vnni" if host.target == "cpu-x86_64" else "cpu-x86_64"
            models.append(made(f"int8-{other}-on-this-cpu", other, recipe(other)))
            runners.append(None)
            models.append(made("int8-s8s8-on-this-cpu", "", QuantizeSettings(activations="int8")))
            runners.append(None)
        models.append(dynamic)
        runners.append(None)
        dataset = load_dataset(data)
        results = evaluate(models, dataset, latency_rounds=args.rounds, runners=runners)
        if args.report:
            write_report(results, dataset, args.report, NOTES)
        arm_results = []
        if not args.no_aarch64 and host.arch != "aarch64":
            arm = made("int8-cpu-aarch64-on-arm-kernels", "cpu-aarch64", recipe("cpu-aarch64"))
            subset = replace(dataset, samples=dataset.samples[: args.arm_images])
            arm_results = evaluate([fp32, arm], subset, latency_rounds=0,
                                   runners=[None, runner_for("cpu-aarch64", host)])  # fmt: skip
    print(f"{dataset.name}: {len(dataset.samples)} images; calibration: {args.calib_frames} "
          "frames of voc2007-train")  # fmt: skip
    print(table(results))
    if arm_results:
        print(f"\ncpu-aarch64 on ARM kernels (qemu), first {len(subset.samples)} images:")
        print(table(arm_results))
    print(f"\nCPU: {host.describe()}")
    reference = results[0]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    ship = results[1]
    latency = ship.latency_p50_ms / reference.latency_p50_ms
    drop = (reference.map50_95 - ship.map50_95) * 100
    print(
        f"{host.target} recipe here: latency {latency:.3f} x fp32 (target <= 0.7) "
        f"{verdict(latency <= 0.7)}; mAP50-95 drop {drop:+.2f} points {_interval(ship)} "
        f"(target <= 1) {verdict(drop <= 1.0)}; size "
        f"{ship.size_bytes / reference.size_bytes:.3f} x fp32"
    )
    if arm_results:
        arm = arm_results[1]
        arm_drop = (arm_results[0].map50_95 - arm.map50_95) * 100
        print(
            f"cpu-aarch64 recipe on ARM kernels (qemu): mAP50-95 drop {arm_drop:+.2f} points "
            f"{_interval(arm)} (target <= 1) {verdict(arm_drop <= 1.0)}"
        )
    return 0


def _interval(result) -> str:
    found = result.map_difference
    return (
        ""
        if found is None
        else f"(95 % interval of the change {found['low']:+.2f} … {found['high']:+.2f})"
    )


if __name__ == "__main__":
    sys.exit(main())
