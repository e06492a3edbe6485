"""The update flow: check the channel -> download -> stage -> load -> self-test -> hand over.

What is newer (or pinned) for this device's target is downloaded with resume, verified, staged in
a free slot, loaded beside the running model, warmed up and self-tested on its golden set. A model
that passes goes to the live model (swap and probation); one that fails is rejected on record and
never tried again, and the running model is never touched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.config import OtaConfig
from agent.contract.descriptor import EngineEnvironment, ModelDescriptor, parse
from agent.updates.live_model import LiveModel, ManagerError, with_identity
from agent.updates.model_store import SlotRecord, StoreError, StoreState
from agent.updates.ota import ChannelClient, Offer, OtaError
from agent.updates.selftest import run_self_test
from agent.vision import Backend


def compatibility_problems(descriptor: ModelDescriptor, backend: Backend) -> list[str]:
    info = backend.info
    problems = []
    if (descriptor.input.height, descriptor.input.width) != info.imgsz:
        problems.append(
            f"descriptor input {descriptor.input.height}x{descriptor.input.width} "
            f"but the model takes {info.imgsz[0]}x{info.imgsz[1]}"
        )
    if dict(descriptor.class_names) != dict(info.class_names):
        problems.append(
            f"descriptor lists {len(descriptor.class_names)} classes that differ from the model's "
            f"{info.num_classes}"
        )
    return problems


class UpdateFlow:
    """Brings a newer model as far as "self-tested, ready"; the live model takes it from there."""

    def __init__(
        self,
        ota: OtaConfig,
        client: ChannelClient,
        live: LiveModel,
        target: str,
        engines: EngineEnvironment | None = None,
    ) -> None:
        self.ota = ota
        self.engines = engines
        self.client = client
        self.live = live
        self.store = live.store
        self.target = target

    def _failed(self, exc: OtaError, version: str | None = None) -> dict[str, Any]:
        self.live.update(
            lambda s: setattr(
                s, "last_outcome", {"result": "failed", "kind": exc.kind, "reason": str(exc)}
            )
        )
        self.live.emit("ota_failed", str(exc), "error", check=exc.kind, version=version)
        self.live.progress = {}
        self.live.on_change()
        return {"updated": False, "error": str(exc), "kind": exc.kind}

    def check(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Look at the channel; download, stage and activate what is newer (or pinned)."""
        if self.live.probation is not None:
            return {"updated": False, "busy": f"{self.live.probation.version} is on probation"}
        state = self.live.state
        active = self.live.active_record()
        active_version = active.version if active else None
        try:
            offer = self.client.find(
                self.live.model_name or "",
                self.target,
                active_version,
                state.pinned,
                state.rejected,
                self.engines,
            )
        except OtaError as exc:
            return self._failed(exc)
        if offer is None or (state.pinned is not None and offer.version == active_version):
            self.live.progress = {}
            self.live.emit(
                "ota_up_to_date",
                f"channel checked: nothing newer than {active_version} for {self.target}",
                trigger=(args or {}).get("trigger", "request"),
            )
            return {"updated": False, "active": active_version}
        if state.previous is not None and state.previous.version == offer.version:
            return self.live.rollback(f"pinned to {offer.version}", reject=False)
        try:
            staged = self._download_and_stage(offer)
        except OtaError as exc:
            return self._failed(exc, offer.version)
        return self.activate_staged(staged)

    def _download_and_stage(self, offer: Offer) -> SlotRecord:
        info = offer.model_target
        sha256 = info.hashes["sha256"]
        partial = self.store.downloads / f"{sha256}.part"
        have = partial.stat().st_size if partial.exists() else 0
        need = (info.length - have) + info.length + self.ota.free_space_margin_bytes
        free = self.store.free_bytes()
        if free < need:
            raise OtaError(
                "disk",
                f"not enough disk space for {offer.version}: {need} bytes needed "
                f"(download, slot and margin), {free} free in {self.store.root}",
            )
        self.live.progress = {"version": offer.version, "stage": "downloading", "bytes": have}
        self.live.emit(
            "ota_download_started",
            f"downloading {offer.release.name} {offer.version} for {offer.target} "
            f"({info.length} bytes{', resuming at ' + str(have) if have else ''})",
            version=offer.version,
            length=info.length,
            resume_from=have,
        )
        fetcher = self.client.fetcher
        fetched_before, resumes_before = fetcher.bytes_received, fetcher.resumes
        started = time.monotonic()

        def progress(done: int) -> None:
            self.live.progress["bytes"] = done

        self.client.download(offer, partial, progress)
        fetched = fetcher.bytes_received - fetched_before
        self.live.emit(
            "ota_downloaded",
            f"{offer.version} downloaded and verified ({fetched} bytes fetched this time)",
            version=offer.version,
            length=info.length,
            bytes_fetched=fetched,
            resumed_from=have,
            reconnects=fetcher.resumes - resumes_before,
            seconds=round(time.monotonic() - started, 3),
        )
        self.live.progress["stage"] = "staging"
        record = SlotRecord(
            path="",
            name=offer.release.name,
            version=offer.version,
            sha256=sha256,
            length=info.length,
            target=offer.target,
        )
        suffix = Path(offer.file.path).suffix or ".bin"
        try:
            with self.live.lock, self.store.locked():
                staged = self.store.stage(partial, f"model{suffix}", offer.descriptor_bytes, record)
        except StoreError as exc:
            raise OtaError("disk", str(exc)) from None
        partial.unlink(missing_ok=True)
        self.live.emit(
            "ota_staged", f"{offer.version} staged in slot {staged.slot}", version=offer.version
        )
        return staged

    def activate_staged(self, staged: SlotRecord | None = None) -> dict[str, Any]:
        """Load, warm up and self-test the staged model beside the running one; then swap."""
        staged = staged or self.live.state.staged
        if staged is None or staged.slot is None:
            raise ManagerError("nothing is staged")
        self.live.update(lambda s: s.count_load(staged, staged=True))
        self.live.progress = {"version": staged.version, "stage": "loading"}
        try:
            descriptor = parse(
                ModelDescriptor,
                (Path(staged.path).parent / "descriptor.json").read_bytes(),
                "staged descriptor",
            )
            backend = with_identity(self.live.loader(Path(staged.path)), staged)
        except Exception as exc:
            return self._reject_staged(staged, "load_failed", f"failed to load or warm up: {exc}")
        problems = compatibility_problems(descriptor, backend)
        details: dict[str, Any] = {}
        if not problems:
            self.live.progress["stage"] = "self-test"
            result = run_self_test(backend, descriptor.golden, self.ota.self_test_min_recall)
            problems, details = result.reasons, result.details
        if problems:
            backend.close()
            return self._reject_staged(staged, "self_test_failed", "; ".join(problems), **details)

        return self.live.go_live(staged, backend)

    def _reject_staged(
        self, staged: SlotRecord, kind: str, reason: str, **details: Any
    ) -> dict[str, Any]:
        def reject(state: StoreState) -> None:
            state.staged = None
            state.rejected[staged.version] = reason
            state.last_outcome = {
                "result": "rejected",
                "version": staged.version,
                "kind": kind,
                "reason": reason,
            }

        self.live.update(reject)
        self.store.drop_unreferenced()
        self.live.progress = {}
        self.live.emit(
            "ota_rejected",
            f"{staged.label()} never went live: {reason}",
            "error",
            version=staged.version,
            check=kind,
            **details,
        )
        self.live.on_change()
        return {"updated": False, "rejected": staged.version, "kind": kind, "reason": reason}
