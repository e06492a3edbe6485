"""Outputs the factory writes: refused if they exist, written whole or not at all."""

from __future__ import annotations

from pathlib import Path

from agent.contract import atomic_path
from models.errors import FactoryError

__all__ = ["atomic_path", "refuse_existing"]


def refuse_existing(path: Path, overwrite: bool = False) -> None:
    if path.exists() and not overwrite:
        raise FactoryError(f"output {path} already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise FactoryError(f"output folder {path.parent} does not exist")
