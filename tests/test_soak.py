"""The soak's 4-minute version: the real agent on a live camera under scheduled faults (broker
SIGTERM, SIGKILL and freeze, SIGHUP, malformed commands, a camera stall, an OTA update, a bad
update that probation must send back, a full disk) exits 0, delivers every frame in order and
keeps its fds and threads; ``benchmarks/soak.py --minutes 50`` is the long run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_four_minutes_of_scheduled_faults_leave_the_agent_whole(shared, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "soak.py", "--minutes", "4", "--json", "--shared", str(shared),
         "--keep", str(tmp_path / "soak")],
        cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    log = (tmp_path / "soak" / "agent.log").read_text()[-3000:]
    assert report["exit_code"] == 0, log
    assert report["in_order"], report
    assert (
        report["frames_arrived"] > 0
        and report["frames_missing"] == report["frames_missing_at_broker_sigkill"]
    ), report
    assert report["fds_threads_recovered"], report["faults"]
    assert [f["fault"] for f in report["faults"]] == [
        "broker_sigterm", "sighup", "bad_commands", "camera_stall", "broker_frozen", "ota_swap",
        "ota_rollback", "disk_full", "broker_sigkill",
    ]  # fmt: skip
    assert report["camera_reconnected_after_stall"] and report["update_committed"], report
    assert report["bad_update_sent_back"], report
    if os.geteuid() == 0:  # the full disk needs a tmpfs mounted
        assert not report["skipped"], report["skipped"]
    assert result.returncode == 0 and report["pass"], report
