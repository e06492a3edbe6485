"""INT8 per target, side by side in one run: every target whose kernels run here.

For this machine's target (natively, timed) and for cpu-aarch64 (ONNX Runtime's aarch64 build
under qemu, accuracy only) it makes the target's recipe (`edge-models quantize --target`) and
prints scheme, size ratio, latency ratio to fp32 (interleaved: one inference per model per round)
and mAP50-95 on coco8 with its drop. For contrast it also runs, on this CPU, the other x86
recipe (full-range U8S8 is wrong here without VNNI; the 7-bit one is right everywhere), S8S8 and
the shared int8-dynamic model.

Targets on this machine class: plain x86 INT8 <= 0.7 x fp32 latency with <= 1 point drop;
aarch64 accuracy within 1 point of fp32. Calibration uses only ../shared/images (bus.jpg,
zidane.jpg), multiplied into 32 frames; coco8 is evaluation only.

Usage: python benchmarks/quantize_int8.py [--report DIR] [--rounds 60] [--no-aarch64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import shared_dir_or_exit

from agent.contract import detect
from agent.demo_inputs import DEMO_MODEL
from models.calibration import synthesise
from models.datasets import load_dataset
from models.evaluate import evaluate
from models.kernels import runner_for
from models.quantize import QuantizeSettings, quantize
from models.recipes import recipe
from models.report import table, write_report

NOTES = """## Why these recipes

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
    args = parser.parse_args()
    shared = shared_dir_or_exit(args.shared)
    fp32 = shared / DEMO_MODEL
    dynamic = shared / "models" / "yolov8n-coco-int8-dynamic.onnx"
    host = detect()
    print(f"this machine: {host.describe()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = work / "calib"
        synthesise([shared / "images" / "bus.jpg", shared / "images" / "zidane.jpg"], calib, 16)

        def made(name: str, target: str, settings: QuantizeSettings) -> Path:
            out = work / f"{name}.onnx"
            quantize(fp32, calib, out, settings, progress=False, target=target)
            return out

        models, runners = [fp32], [None]
        own = made(f"int8-{host.target}", host.target, recipe(host.target))
        models.append(own)
        runners.append(None)
        if host.arch == "x86_64":
            other = "cpu-x86_64-vnni" if host.target == "cpu-x86_64" else "cpu-x86_64"
            models.append(made(f"int8-{other}-on-this-cpu", other, recipe(other)))
            runners.append(None)
            models.append(made("int8-s8s8-on-this-cpu", "", QuantizeSettings(activations="int8")))
            runners.append(None)
        models.append(dynamic)
        runners.append(None)
        if not args.no_aarch64 and host.arch != "aarch64":
            models.append(
                made("int8-cpu-aarch64-on-arm-kernels", "cpu-aarch64", recipe("cpu-aarch64"))
            )
            runners.append(runner_for("cpu-aarch64", host))
        dataset = load_dataset(shared / "datasets" / "coco8")
        results = evaluate(models, dataset, latency_rounds=args.rounds, runners=runners)
        if args.report:
            write_report(results, dataset, args.report, NOTES)
    print(table(results))
    print(f"\nCPU: {host.describe()}")
    reference = results[0]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    ship = results[1]
    latency = ship.latency_p50_ms / reference.latency_p50_ms
    drop = (reference.map50_95 - ship.map50_95) * 100
    print(
        f"{host.target} recipe here: latency {latency:.3f} x fp32 (target <= 0.7) "
        f"{verdict(latency <= 0.7)}; mAP50-95 drop {drop:+.2f} points (target <= 1) "
        f"{verdict(drop <= 1.0)}; size {ship.size_bytes / reference.size_bytes:.3f} x fp32"
    )
    arm = next((r for r in results if "aarch64" in r.name), None)
    if arm is not None:
        arm_drop = (reference.map50_95 - arm.map50_95) * 100
        print(
            f"cpu-aarch64 recipe on ARM kernels (qemu): mAP50-95 drop {arm_drop:+.2f} points "
            f"(target <= 1) {verdict(arm_drop <= 1.0)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
