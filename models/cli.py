"""``edge-models``: the model-factory command (subcommands arrive with the model-factory issue)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from agent import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-models",
        description="Quantize, evaluate, gate and publish YOLOv8 models for edge-agent devices.",
    )
    parser.add_argument("--version", action="version", version=f"edge-models {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
