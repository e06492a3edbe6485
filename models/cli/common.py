"""What every ``edge-models`` command group shares: exit codes and the repeated arguments."""

from __future__ import annotations

import argparse

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
