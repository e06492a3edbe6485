"""Runs inside the emulated interpreter: ONNX Runtime on this architecture's own kernels.

Standalone on purpose (numpy and onnxruntime only: the emulated sysroot has nothing else).
Reads ``{model, inputs.npz}`` paths from argv, writes ``outputs.npz`` with one array per input,
in the same order. Letterbox, decode, NMS and mAP stay on the host, in the agent's own code.

Usage: python emulated_inference.py MODEL INPUTS_NPZ OUTPUTS_NPZ [THREADS]
"""

import sys
import time

import numpy as np
import onnxruntime as ort


def main(model: str, inputs: str, outputs: str, threads: int = 0) -> int:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    arrays = np.load(inputs)
    results = {}
    for key in sorted(arrays.files, key=int):
        started = time.monotonic()
        results[key] = session.run(None, {name: arrays[key]})[0]
        print(f"input {key}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    np.savez(outputs, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4], *(int(a) for a in sys.argv[4:5])))
