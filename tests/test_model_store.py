"""Slots and state on disk: atomic writes, a full disk, and what start-up makes of a crash."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.config import build_config
from agent.contract.files import write_atomic
from agent.updates.model_manager import ModelManager
from agent.updates.model_store import ModelStore, Probation, SlotRecord, StoreError
from agent.vision.backends import load_backend
from agent.vision.backends.base import file_digest


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict]] = []

    def emit(self, kind: str, message: str, level: str = "warning", **details) -> None:
        self.seen.append((kind, message, details))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.seen]


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "state.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), so a write really fails with ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.decode()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_staging_fails_cleanly_and_changes_no_state(
    tiny_disk, dynamic_model, tmp_path
):
    store = ModelStore(tiny_disk / "models")
    store.save()
    before = store.state_path.read_bytes()
    download = tmp_path / "download.part"  # 3.5 MB: does not fit in 1 MiB
    shutil.copyfile(dynamic_model, download)
    record = SlotRecord(path="", name="m", version="1.1.0", sha256="0" * 64, length=1)
    with pytest.raises(StoreError, match="No space left"):
        store.stage(download, "model.onnx", b"{}", record)
    assert store.state.staged is None
    assert store.state_path.read_bytes() == before
    assert list(store.slots.iterdir()) == []  # the half-written slot is gone


# -- start-up after a crash ------------------------------------------------------------------------
def _config(tmp_path: Path, model: Path):
    return build_config(
        {
            "device_id": "dev1",
            "state_dir": str(tmp_path / "state"),
            "model": {"path": str(model)},
            "ota": {"enabled": True, "root": str(tmp_path / "root.json")},
        }
    )


def _loader(path: Path):
    from agent.config import ModelConfig

    return load_backend("onnxruntime", path, ModelConfig(path=path))


def _slot(store: ModelStore, name: str, model: Path, version: str) -> SlotRecord:
    folder = store.slots / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "model.onnx")
    return SlotRecord(
        slot=name,
        path=str(folder / "model.onnx"),
        name="yolov8n-coco",
        version=version,
        sha256=file_digest(model),
        length=model.stat().st_size,
    )


def _manager(tmp_path, fp32_model) -> tuple[ModelManager, Events]:
    events = Events()
    return ModelManager(_config(tmp_path, fp32_model), events, _loader), events


def _base(fp32_model) -> SlotRecord:
    return SlotRecord(path=str(fp32_model), name="yolov8n-coco-fp32", version="sha256:8868c7b16efa")


def test_start_after_a_crash_in_probation_runs_the_previous_model_and_retries_once(
    tmp_path, fp32_model, dynamic_model
):
    store = ModelStore(tmp_path / "state" / "models")
    store.state.active = _slot(store, "a", dynamic_model, "1.1.0")
    store.state.previous = _base(fp32_model)
    store.state.probation = Probation(version="1.1.0", started=0)
    store.save()

    manager, events = _manager(tmp_path, fp32_model)
    backend = manager.startup_backend(fp32_model)
    assert backend.info.model_name == "yolov8n-coco-fp32"  # the known-good model runs
    state = manager.state
    assert state.active is None and state.probation is None
    assert state.staged is not None and state.staged.version == "1.1.0"  # tried again later
    assert "ota_probation_interrupted" in events.kinds()
    manager.stop()

    # a second crash during the same version's probation rejects it for good
    with manager.store.locked() as state:
        state.active, state.staged = state.staged, None
        state.previous = _base(fp32_model)
        state.probation = Probation(version="1.1.0", started=0)
        manager.store.save()
    manager, events = _manager(tmp_path, fp32_model)
    manager.startup_backend(fp32_model)
    assert "1.1.0" in manager.state.rejected and manager.state.staged is None
    assert list(manager.store.slots.iterdir()) == []
    manager.stop()


def test_a_model_that_killed_the_agent_while_loading_is_not_loaded_again(
    tmp_path, fp32_model, dynamic_model
):
    store = ModelStore(tmp_path / "state" / "models")
    staged = _slot(store, "b", dynamic_model, "1.2.0")
    staged.load_attempts = 2  # counted before each load; never reset: it never finished
    store.state.staged = staged
    store.save()
    manager, events = _manager(tmp_path, fp32_model)
    manager.startup_backend(fp32_model)
    assert manager.state.staged is None
    assert "stopped 2 times while loading" in manager.state.rejected["1.2.0"]
    assert "ota_rejected" in events.kinds()
    manager.stop()


def test_a_damaged_active_slot_falls_back_to_the_previous_slot(tmp_path, fp32_model, dynamic_model):
    store = ModelStore(tmp_path / "state" / "models")
    store.state.active = _slot(store, "a", dynamic_model, "1.2.0")
    store.state.previous = _slot(store, "b", dynamic_model, "1.1.0")
    store.save()
    Path(store.state.active.path).write_bytes(b"\0" * 100)  # bit rot, a bad flash block
    (store.slots / "c").mkdir()  # a half-written slot from a crash while staging
    (store.slots / "c" / "model.onnx").write_bytes(b"partial")

    manager, events = _manager(tmp_path, fp32_model)
    backend = manager.startup_backend(fp32_model)
    assert backend.info.model_version == "1.1.0"
    assert "ota_rejected" in events.kinds()
    assert manager.state.active.version == "1.1.0" and manager.state.previous is None
    assert (
        "does not match" in manager.state.rejected["1.2.0"]
        or "bytes" in (manager.state.rejected["1.2.0"])
    )
    assert sorted(p.name for p in manager.store.slots.iterdir()) == ["b"]
    manager.stop()


def test_unreadable_state_is_kept_aside_and_the_base_model_runs(tmp_path, fp32_model):
    folder = tmp_path / "state" / "models"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{not json")
    manager, _ = _manager(tmp_path, fp32_model)
    backend = manager.startup_backend(fp32_model)
    assert backend.info.model_name == "yolov8n-coco-fp32"
    assert any(p.name.startswith("state.broken-") for p in folder.iterdir())
    manager.stop()


def test_a_second_agent_on_the_same_state_dir_is_refused(tmp_path, fp32_model):
    first, _ = _manager(tmp_path, fp32_model)
    first.startup_backend(fp32_model)
    second, _ = _manager(tmp_path, fp32_model)
    with pytest.raises(StoreError, match="another agent"):
        second.startup_backend(fp32_model)
    assert first.store.agent_running()
    first.stop()
    assert not first.store.agent_running()
    assert os.path.exists(first.store.root / "agent.lock")
