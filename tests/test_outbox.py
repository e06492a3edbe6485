import signal
import subprocess
import sys
import time

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
