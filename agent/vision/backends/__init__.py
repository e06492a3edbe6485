"""Inference backends, loaded by name through the registry in ``base``."""

from agent.vision.backends.base import Backend, BackendInfo, available_backends, load_backend

__all__ = ["Backend", "BackendInfo", "available_backends", "load_backend"]
