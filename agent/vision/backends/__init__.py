"""Inference backends, loaded by name through the registry in ``base``."""

import importlib
from types import ModuleType

from agent.vision.backends.base import Backend, BackendInfo, available_backends, load_backend


def tensorrt_toolkit() -> ModuleType:
    """The TensorRT backend module, imported only now (ImportError where TensorRT is absent):
    ``edge-models build-engine`` builds engines with it exactly as devices build their own."""
    return importlib.import_module("agent.vision.backends.tensorrt")


__all__ = ["Backend", "BackendInfo", "available_backends", "load_backend", "tensorrt_toolkit"]
