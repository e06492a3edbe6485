"""What every ``edge-models`` command group shares: exit codes and the repeated arguments."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATE, EXIT_HALTED = 0, 1, 2, 3, 4


def target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        help="devices it is for (default: what the model was made for, else this machine's); "
        "verified on that target's kernels, here or under emulation",
    )
    parser.add_argument(
        "--unverified-target",
        action="store_true",
        help="a target whose kernels cannot run here: judge the model's float semantics "
        "instead (recorded in the descriptor)",
    )


def device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="where distillation and QAT train: "
        "auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda, cuda:N",
    )


def bounded(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable:
    """An argparse type: the text ``convert``ed, refused in one line unless ``ok`` (``what`` it
    must be)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse
