"""RKNN backend: an INT8 .rknn on the RK3588 NPU through rknn-toolkit-lite2 (``RKNNLite``).

The .rknn that ``edge-models convert --target rk3588`` writes ends at the head's six
convolutions; ``split_head.merge_split_head`` finishes the head on the CPU, so the usual decode and
NMS follow. Class names, input size and the model's identity come from the ``.rknn.json`` the
converter writes beside it, or from the descriptor of the OTA slot it was installed into
(``model_record``: an .rknn carries none of the ONNX metadata). One context on all three NPU
cores by default (``model.rknn.core_mask``); with several cameras, a context per core
(``model.rknn.contexts``), each run on an idle one, as Rockchip's multi-threaded YOLO examples do.
Imported only when configured: rknnlite exists only on boards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rknnlite.api import RKNNLite

from agent.contract.errors import BackendUnavailable, ModelError
from agent.vision.backends.base import BackendInfo, register, warm_up
from agent.vision.backends.contexts import ContextPool
from agent.vision.backends.model_record import read_record
from agent.vision.split_head import merge_split_head, npu_input

CORE_MASKS = {
    "auto": "NPU_CORE_AUTO",
    "0": "NPU_CORE_0",
    "1": "NPU_CORE_1",
    "2": "NPU_CORE_2",
    "0_1": "NPU_CORE_0_1",
    "0_1_2": "NPU_CORE_0_1_2",
}


def context_cores(contexts: int, core_mask: str) -> list[str]:
    """The core mask of each context: ``core_mask`` for one, a core of its own for each of
    several (the RK3588 has three)."""
    return [core_mask] if contexts <= 1 else [str(core) for core in range(min(contexts, 3))]


class RknnBackend:
    def __init__(self, path: Path, options: Any) -> None:
        if path.suffix.lower() != ".rknn":
            raise ModelError(f"{path}: the rknn backend runs .rknn files (edge-models convert)")
        record = read_record(path)
        metadata = record.metadata
        names = getattr(options, "names", None) or record.names
        height, width = record.imgsz
        if not names:
            raise ModelError(f"{path}: no class names (in its .rknn.json or model.names)")
        settings = getattr(options, "rknn", None)
        mask = getattr(settings, "core_mask", "0_1_2")
        cores = context_cores(getattr(settings, "contexts", 0), mask)
        contexts: list[Any] = []
        try:
            for core in cores:
                contexts.append(self._context(path, core))
        except Exception:
            for context in contexts:
                context.release()
            raise
        self._contexts = ContextPool(ready=contexts)
        self.concurrent = len(contexts) > 1  # several runs at once, one per context
        self.info = BackendInfo(
            backend="rknn",
            provider=f"rk3588-npu:{'+'.join(cores)}",
            model_path=str(path),
            model_name=metadata.get("model_name", path.stem),
            model_version=metadata.get("model_version", record.identity),
            input_name="images",
            input_shape=(1, 3, int(height), int(width)),
            input_dtype="float32",
            output_name="head",
            output_shape=(1, 4 + len(names), -1),
            class_names=dict(names),
            stride=32,
            precision="int8",
            metadata=metadata,
        )
        warm_up(self, path, getattr(options, "warmup_runs", 1))

    @staticmethod
    def _context(path: Path, core: str) -> Any:
        """The model loaded on the NPU runtime, bound to ``core`` (a CORE_MASKS key)."""
        context = RKNNLite(verbose=False)
        if context.load_rknn(str(path)) != 0:
            context.release()
            raise ModelError(f"cannot load {path}: not an .rknn this runtime reads")
        if context.init_runtime(core_mask=getattr(RKNNLite, CORE_MASKS[core])) != 0:
            context.release()
            raise BackendUnavailable(
                "the RK3588 NPU runtime did not start (librknnrt.so and /dev/rknpu are needed; "
                "this is not an RK3588 board or its NPU driver is missing)"
            )
        return context

    def infer(self, tensor: np.ndarray) -> np.ndarray:
        with self._contexts.context() as context:
            outputs = context.inference(inputs=[npu_input(tensor)])
        if outputs is None:
            raise RuntimeError("RKNN inference failed")
        return merge_split_head(outputs)

    def close(self) -> None:
        for context in self._contexts.all():
            context.release()


@register("rknn")
def load(path: Path, options: Any) -> RknnBackend:
    return RknnBackend(path, options)
