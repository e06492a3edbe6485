"""Model files into backends, with this agent's backend and options; the active model from disk.

One place decides how a model file is loaded (backend name, providers, threads, the engine cache
under ``state_dir/engines`` and OpenVINO's compiled-model cache under ``state_dir/openvino``
unless configured, each run's share of the cores when several inferences run at once), so the
start, an OTA candidate and the watchdog's reload all load a model the same way.
"""

from __future__ import annotations

from pathlib import Path

from agent.config import AgentConfig, ModelConfig
from agent.updates import ModelManager, with_identity
from agent.vision import Backend, inference_workers, load_backend, threads_per_run


def options_for_workers(options: ModelConfig, workers: int) -> ModelConfig:
    """With several runs at once, each gets its share of the device where not configured: an
    ONNX Runtime run its share of the cores, OpenVINO a stream per run, an RK3588 a context per
    NPU core (up to its three)."""
    if workers <= 1:
        return options
    if options.backend == "onnxruntime" and options.threads == 0:
        options = options.model_copy(update={"threads": threads_per_run(workers)})
    if options.backend == "openvino" and options.openvino.streams == 0:
        streams = options.openvino.model_copy(update={"streams": workers})
        options = options.model_copy(update={"openvino": streams})
    if options.backend == "rknn" and options.rknn.contexts == 0:
        contexts = options.rknn.model_copy(update={"contexts": min(workers, 3)})
        options = options.model_copy(update={"rknn": contexts})
    return options


class ModelLoader:
    def __init__(self, config: AgentConfig) -> None:
        options = config.model
        if options.engine_cache_dir is None:
            options = options.model_copy(update={"engine_cache_dir": config.state_dir / "engines"})
        if options.openvino.cache_dir is None:
            openvino = options.openvino.model_copy(
                update={"cache_dir": config.state_dir / "openvino"}
            )
            options = options.model_copy(update={"openvino": openvino})
        workers = inference_workers(config.pipeline.inference_workers, len(config.camera_list()))
        self.options = options_for_workers(options, workers)
        self.manager: ModelManager | None = None  # set when OTA is on: the active model is a slot

    def load(self, path: Path) -> Backend:
        options = self.options
        return load_backend(options.backend, path, options.model_copy(update={"path": path}))

    def active(self) -> Backend:
        """The active model again, from disk: the base model, or its OTA slot."""
        if self.manager is None:
            return self.load(self.options.path)
        record = self.manager.active_record()
        assert record is not None
        return with_identity(self.load(Path(record.path)), record)
