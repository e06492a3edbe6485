"""Busy processes for proving that the suite does not depend on how fast this machine is.

Starts ``--processes`` children that spin on the CPU (plain arithmetic, no I/O) for at most
``--seconds``, then stops them; Ctrl-C or SIGTERM stops them at once. Bounded in count and time
by design. Issue 24 asks for the whole suite to pass with two of these beside it:

    python benchmarks/cpu_hog.py --processes 2 --seconds 3600 & bash .ci/run; kill %1
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import time


def spin(until: float) -> None:
    value = 0
    while time.monotonic() < until:
        for i in range(100_000):
            value = (value * 31 + i) % 1_000_003


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3600.0)
    args = parser.parse_args()
    if not 1 <= args.processes <= 16 or not 0 < args.seconds <= 4 * 3600:
        print("--processes 1..16 and --seconds up to 4 h", file=sys.stderr)
        return 2
    until = time.monotonic() + args.seconds
    children = [multiprocessing.Process(target=spin, args=(until,), daemon=True)
                for _ in range(args.processes)]  # fmt: skip
    for child in children:
        child.start()

    def stop(*_: object) -> None:
        for child in children:
            child.terminate()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        for child in children:
            child.join()
    except KeyboardInterrupt:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
