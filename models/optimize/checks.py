"""Argument checks that run where the command starts, before the training toolchain loads."""

from __future__ import annotations

from models.errors import FactoryError


def check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 0.9:
        raise FactoryError(f"--ratio {ratio:g} is out of range: 0 < ratio < 0.9 (0.3 = 30%)")


def check_schedule(steps: int, stages: int = 1, round_to: int = 0) -> None:
    if stages < 1 or steps < 0 or round_to < 0:
        raise FactoryError("--stages must be >= 1, --steps and --round-to >= 0")


def check_learning_rate(lr: float) -> None:
    if not 0.0 < lr < 1.0:  # NaN fails too
        raise FactoryError(f"--lr {lr:g} is out of range: 0 < lr < 1 (1e-4 is the default)")
