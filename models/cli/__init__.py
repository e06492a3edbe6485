"""``edge-models``: quantize, evaluate, gate, convert, optimize and publish YOLOv8 models for
edge-agent devices.

One module per command group parses its arguments and prints what the factory's functions
answer (the release pipeline itself is ``models.release``). User errors print one line naming
the problem and exit non-zero, with no traceback and no partial output file left behind.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from agent import __version__
from agent.contract import AgentError
from models.cli import channel, convert, evaluate, optimize, quantize
from models.cli.common import EXIT_FAILURE, EXIT_GATE, EXIT_HALTED, EXIT_OK, EXIT_USAGE

GROUPS = (quantize, evaluate, channel, convert, optimize)  # the order of ``--help``

__all__ = ["EXIT_FAILURE", "EXIT_GATE", "EXIT_HALTED", "EXIT_OK", "EXIT_USAGE", "build_parser",
           "main"]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-models",
        description="Quantize, evaluate, gate and golden-record YOLOv8 models for edge-agent.",
    )
    parser.add_argument("--version", action="version", version=f"edge-models {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except AgentError as exc:
        print(f"edge-models: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
