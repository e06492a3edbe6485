"""Runs inside the rknn-toolkit2 virtualenv (scripts/setup-rknn.sh), never in the factory's own.

rknn-toolkit2 pins numpy 1.26, onnx <= 1.18 and its own onnxruntime and torch, so the factory
calls this file in a subprocess with that environment's Python. It imports only the toolkit and
numpy. It reads one JSON job on stdin: convert the ONNX file to INT8 for the RK3588 (calibrating
on the given NCHW uint8 tensors), write the .rknn, and run the given inputs on the toolkit's
simulator in the same process (a .rknn loaded back from a file cannot run on the simulator).
It prints one JSON line: ``{"ok": true}`` or ``{"ok": false, "stage": ..., "error": ...}``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def run(job: dict) -> dict:
    import numpy as np
    from rknn.api import RKNN

    log = io.StringIO()
    rknn = RKNN(verbose=False)
    where = ["start"]

    def step(stage: str, call) -> None:
        where[0] = stage
        code = call()
        if code != 0:
            raise RuntimeError(f"code {code}: {log.getvalue().strip()[-600:]}")

    try:
        with contextlib.redirect_stdout(log):
            step("config", lambda: rknn.config(
                mean_values=[[0, 0, 0]], std_values=[[255, 255, 255]],
                target_platform=job["platform"],
                quantized_algorithm=job.get("algorithm", "normal"),
                auto_hybrid_cos_thresh=job.get("hybrid") or 0.98,
            ))  # fmt: skip
            step("load_onnx", lambda: rknn.load_onnx(model=job["model"]))
            step(
                "build",
                lambda: rknn.build(
                    do_quantization=True,
                    dataset=job["dataset"],
                    auto_hybrid=job.get("hybrid") is not None,
                ),
            )
            step("export_rknn", lambda: rknn.export_rknn(job["out"]))
            if job.get("inputs"):
                step("init_runtime (simulator)", rknn.init_runtime)
                where[0] = "inference (simulator)"
                # one file per input as it is run: a whole evaluation set's outputs never
                # sit in memory (990 images' are 4.8 GB)
                os.makedirs(job["outputs"], exist_ok=True)
                for i, path in enumerate(job["inputs"]):
                    outputs = rknn.inference(inputs=[np.load(path)], data_format="nchw")
                    if outputs is None:
                        raise RuntimeError(f"simulator inference failed on {path}")
                    np.savez(os.path.join(job["outputs"], f"{i:05d}.npz"), *outputs)
    except Exception as exc:
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:800]
        return {"ok": False, "stage": where[0], "error": last}
    finally:
        rknn.release()
    return {"ok": True}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.stdin.read()))))
