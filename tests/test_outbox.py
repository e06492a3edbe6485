import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.link.outbox import Outbox


def test_messages_come_out_in_order_and_leave_only_when_acknowledged(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put("t", f"m{i}".encode()) for i in range(5)]
    batch = box.peek(0, 3)
    assert [m.payload for m in batch] == [b"m0", b"m1", b"m2"]
    box.ack(ids[1])
    assert [m.id for m in box.peek(0, 10)] == [ids[0], ids[2], ids[3], ids[4]]
    assert [m.id for m in box.peek(ids[2], 10)] == [ids[3], ids[4]]
    assert box.counters()["depth"] == 4


def test_contents_and_counters_survive_a_reopen(tmp_path):
    path = tmp_path / "o.sqlite"
    box = Outbox(path, max_messages=10)
    for i in range(15):
        box.put("t", f"{i}".encode(), qos=1, retain=i == 14)
    box.close()
    again = Outbox(path, max_messages=10)
    messages = again.peek(0, 100)
    assert [m.payload for m in messages] == [f"{i}".encode() for i in range(5, 15)]
    assert messages[-1].retain and messages[0].qos == 1
    assert again.counters() == {
        "depth": 10,
        "bytes": 15,
        "dropped_overflow": 5,
        "dropped_expired": 0,
        "dropped_unwritten": 0,
        "unwritten": 0,
        "write_failures": 0,
    }


def test_byte_bound_drops_the_oldest_and_counts_them(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_bytes=64 * 1024)
    for _ in range(10):
        box.put("t", b"x" * 10_000)
    counters = box.counters()
    assert counters["bytes"] <= 64 * 1024 and counters["depth"] == 6
    assert counters["dropped_overflow"] == 4


def test_old_messages_expire_and_are_counted(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_age_s=60)
    box.put("t", b"old")
    assert box.expire(now=time.time() + 120) == 1
    assert box.counters()["dropped_expired"] == 1 and len(box) == 0


def test_wait_newer_wakes_on_a_new_message(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    first = box.put("t", b"a")
    assert not box.wait_newer(first, 0.05)
    box.put("t", b"b")
    assert box.wait_newer(first, 0.05)


WRITER = """
import sys, time
from pathlib import Path
from agent.link.outbox import Outbox
box = Outbox(Path(sys.argv[1]))
i = 0
while True:
    box.put("t", str(i).encode())
    print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_write_leaves_a_consistent_outbox(tmp_path):
    path = tmp_path / "o.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    acknowledged = []
    for line in proc.stdout:
        acknowledged.append(int(line))
        if len(acknowledged) >= 500:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    box = Outbox(path)
    payloads = [int(m.payload) for m in box.peek(0, 100_000)]
    assert payloads == list(range(len(payloads)))  # no gaps, no torn rows
    assert len(payloads) >= len(acknowledged)  # everything the writer reported is on disk
    assert box.counters()["depth"] == len(payloads)


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB tmpfs: writes fail with ENOSPC as on a full SD card."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs: run the suite as root (CI does)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                             capture_output=True, text=True)  # fmt: skip
    assert mounted.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {mounted.stderr}"
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_keeps_the_newest_in_bounded_memory_and_resumes_by_itself(small_disk):
    box = Outbox(small_disk / "o.sqlite", max_memory_bytes=64 * 1024, retry_s=0.05)
    ballast = small_disk / "ballast"
    with contextlib.suppress(OSError), ballast.open("wb", buffering=0) as handle:
        while True:  # fill the disk to the last block
            handle.write(b"\0" * 4096)
    payload = b"x" * 1000
    started = time.monotonic()
    for number in range(400):  # 400 KB: more than the disk had left and the memory budget
        box.submit("t", payload + f"{number:04d}".encode())
    assert time.monotonic() - started < 5, "submit blocked on a full disk"
    assert box.put("events", b"an event") == 0  # no exception; waits in memory, in order
    deadline = time.monotonic() + 30
    while box.write_failures == 0:
        assert time.monotonic() < deadline, "the writer never hit the full disk"
        time.sleep(0.02)
    counters = box.counters()
    assert box.write_error and any(w in box.write_error.lower() for w in ("full", "i/o")), (
        box.write_error
    )
    assert counters["dropped_unwritten"] > 0 and box._pending_bytes <= 64 * 1024 + 2 * 1004
    assert box._writer.is_alive()

    ballast.unlink()  # space comes back: the writer resumes by itself
    deadline = time.monotonic() + 30
    while box.counters()["unwritten"]:
        assert time.monotonic() < deadline, f"the writer did not resume: {box.write_error}"
        time.sleep(0.05)
    assert box.write_error is None
    box.submit("t", b"after")
    box.flush()
    written = [m.payload for m in box.peek(0, 1000)]
    numbers = [int(p[-4:]) for p in written if p.startswith(b"x")]
    assert numbers == sorted(numbers) and numbers[-1] == 399  # the newest kept, in order
    assert written[-2:] == [b"an event", b"after"]
    dropped = box.counters()["dropped_unwritten"]
    assert len(numbers) + dropped == 400, "every message is either written or counted as dropped"
    box.close()
