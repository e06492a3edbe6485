"""Start-up: recover from what a crash left in ``state.json``, then load the best model that works.

A probation the agent died in counts against that model; a model the agent died loading twice is
never loaded again; a slot that fails its checks is rejected and the next one tried, down to the
base model from the config file, so the agent always starts.
"""

from __future__ import annotations

from pathlib import Path

from agent.updates.live_model import LiveModel, with_identity
from agent.updates.model_store import SlotRecord, StoreState
from agent.vision import Backend

MAX_LOAD_ATTEMPTS = 2  # the agent died this often while loading a model: never again
MAX_INTERRUPTED_PROBATIONS = 2


def load_best(live: LiveModel, base_path: Path) -> Backend:
    """Recover from whatever a crash left, then load the best model that works.

    Order: the active slot, the previous slot, the base model from the config file. A model
    that cannot be loaded is rejected and the next one tried, so the agent always starts.
    """
    live.store.hold_running_lock()
    with live.lock, live.store.locked() as state:
        _recover(live, state)
        live.store.save()
        live.store.drop_unreferenced()
    active = live.state.active
    candidates = [active, live.state.previous] if active is not None else []
    for position, record in enumerate(candidates):
        if record is None or record.slot is None:
            continue  # the base model: loaded below
        backend = _load_at_start(live, record)
        if backend is not None:
            if position == 1:  # the active slot failed, the previous one works
                _fell_back_to_previous(live)
            if live.model_name is None:
                live.model_name = record.name
            return backend
    backend = live.loader(base_path)
    info = backend.info
    live.base = SlotRecord(
        slot=None, path=str(base_path), name=info.model_name, version=info.model_version
    )
    if live.state.active is not None:  # every slot failed: the base model runs now
        with live.lock, live.store.locked() as state:
            state.active, state.previous = None, None
            live.store.save()
            live.store.drop_unreferenced()
    if live.model_name is None:
        live.model_name = info.model_name
    return backend


def _recover(live: LiveModel, state: StoreState) -> None:
    if state.probation is not None and state.active is not None:
        version = state.probation.version
        count = state.interrupted.get(version, 0) + 1
        state.interrupted[version] = count
        interrupted = state.active
        state.active = state.previous if state.previous and state.previous.slot else None
        state.previous = None
        state.probation = None
        if count >= MAX_INTERRUPTED_PROBATIONS:
            state.rejected[version] = f"the agent stopped during its probation {count} times"
            outcome = "rejected"
        else:
            state.staged = interrupted  # tried again, through the self-test, once running
            outcome = "will be tried again"
        state.last_outcome = {"result": "probation_interrupted", "version": version}
        live.events.emit(
            "ota_probation_interrupted",
            f"the agent stopped while {interrupted.label()} was on probation: "
            f"started with the previous model; {interrupted.version} {outcome}",
            "warning",
            version=version,
            count=count,
        )
    staged = state.staged
    if staged is not None:
        problem = live.store.verify(staged)
        if staged.load_attempts >= MAX_LOAD_ATTEMPTS:
            problem = f"the agent stopped {staged.load_attempts} times while loading it"
            state.rejected[staged.version] = problem
        if problem is not None:
            state.staged = None
            live.events.emit(
                "ota_rejected",
                f"staged {staged.label()} dropped: {problem}",
                "error",
                version=staged.version,
                check="staged_invalid",
            )


def _load_at_start(live: LiveModel, record: SlotRecord) -> Backend | None:
    problem = live.store.verify(record)
    if problem is None and record.load_attempts >= MAX_LOAD_ATTEMPTS:
        problem = f"the agent stopped {record.load_attempts} times while loading it"
    if problem is None:
        live.update(lambda s: s.count_load(record))
        try:
            backend = with_identity(live.loader(Path(record.path)), record)
        except Exception as exc:
            problem = f"cannot be loaded: {exc}"
        else:
            live.update(lambda s: s.reset_loads(record))
            return backend
    live.update(lambda s: s.rejected.__setitem__(record.version, problem))
    live.events.emit(
        "ota_rejected",
        f"{record.label()} in slot {record.slot}: {problem}",
        "error",
        version=record.version,
        check="slot_invalid",
    )
    return None


def _fell_back_to_previous(live: LiveModel) -> None:
    def fall_back(state: StoreState) -> None:
        state.active, state.previous = state.previous, None

    live.update(fall_back)
    live.store.drop_unreferenced()
