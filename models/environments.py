"""The factory's heavy toolchains, each in a virtualenv of its own, found where scripts/ made them.

rknn-toolkit2 (``scripts/setup-rknn.sh``) and torch (``scripts/setup-train.sh``) pin versions of
numpy, onnx and onnxruntime or pull gigabytes the rest of the factory never needs, so each lives
in ``~/.cache/edge-agent/<name>-<hash of its pins>``, made once and kept, or wherever an
environment variable points.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from models.errors import FactoryError


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/edge-agent`` (``~/.cache/edge-agent``): toolchains and checkpoints."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-agent"


def cached_python(name: str, pins: str, env_var: str, setup: str, label: str) -> Path:
    """The Python of toolchain ``name`` (``label`` in messages): ``$env_var``, else the cached
    environment for ``pins``.

    Raises:
        FactoryError: it is not there (says which script makes it).
    """
    explicit = os.environ.get(env_var)
    key = hashlib.sha256(pins.encode()).hexdigest()[:12]
    python = Path(explicit) if explicit else cache_root() / f"{name}-{key}" / "bin" / "python"
    if not python.exists():
        raise FactoryError(
            f"the {label} environment is missing ({python} not found): run `bash {setup}` "
            f"or set {env_var} to a Python that has {pins}"
        )
    return python
