"""Files that are either wholly old or wholly new: what a crash or a full disk may leave behind.

Every record the agent and the factory keep (the slots' state, descriptors, engines and their
records, channel metadata, health files, models the factory writes) is written the same way: a
temporary file beside it, fsync, rename, then fsync of the folder, so a power cut leaves the
previous version or the new one, never half. ``write_atomic`` takes bytes; ``atomic_path`` hands
a temporary path to code that writes files itself (ONNX, torch, OpenCV) and does the rest.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync of the folder."""
    with atomic_path(path) as partial:
        partial.write_bytes(data)


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".partial") -> Iterator[Path]:
    """A temporary path beside ``path`` (ending in ``suffix``, for writers that pick the format
    by name); fsynced and renamed onto ``path`` only if the block succeeds, removed otherwise."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)  # mkstemp makes 0600; files get the usual permissions
        with temporary.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the folder's entry, not only the file's bytes)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
