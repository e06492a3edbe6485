"""The channel client: what is on offer for this device, and fetching it through TUF.

Trust comes from python-tuf's ngclient: root -> timestamp -> snapshot -> targets, each signed,
versioned and expiring, so tampered files, replayed older metadata, stale metadata and files of
unexpected size are refused before anything is used. The channel's ``index.json`` (a signed
target) lists releases; each variant names a descriptor (signed target) which names the model
file (signed target). The model itself is fetched with ``ChannelFetcher.download_to`` so that a
cut connection, or a restart, resumes; its length and hashes are then checked against the signed
``TargetFile`` exactly as ngclient would.

Every failure leaves as an ``OtaError`` whose ``kind`` says which check refused it.
"""

from __future__ import annotations

import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from agent import __version__
from agent.config import OtaConfig
from agent.contract import targets
from agent.contract.descriptor import (
    INDEX_TARGET,
    ChannelFormatError,
    ChannelIndex,
    EngineEnvironment,
    ModelDescriptor,
    ModelFile,
    Release,
    Variant,
    file_for,
    in_rollout,
    parse,
)
from agent.contract.versions import semver_key
from agent.updates.fetcher import ChannelFetcher, is_local, local_path

log = logging.getLogger(__name__)

MAX_INDEX_BYTES = 1024 * 1024
MAX_DESCRIPTOR_BYTES = 4 * 1024 * 1024


class OtaError(Exception):
    """An update refused or failed; ``kind`` names the check (expired, bad_signature, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def classify(exc: BaseException) -> OtaError:
    """One named kind per way a channel can be wrong, for events and dashboards."""
    if isinstance(exc, OtaError):
        return exc
    kinds: list[tuple[type[BaseException], str, str]] = [
        (tuf_errors.ExpiredMetadataError, "expired", "channel metadata has expired"),
        (tuf_errors.BadVersionNumberError, "replayed", "channel metadata is older than trusted"),
        (tuf_errors.UnsignedMetadataError, "bad_signature", "channel metadata signature invalid"),
        (tuf_errors.LengthOrHashMismatchError, "corrupt", "file does not match its signed hash"),
        (tuf_errors.DownloadLengthMismatchError, "wrong_size", "file size differs from signed"),
        (tuf_errors.DownloadHTTPError, "unavailable", "channel server refused a file"),
        (tuf_errors.DownloadError, "unreachable", "channel unreachable"),
        (tuf_errors.RepositoryError, "untrusted", "channel metadata failed verification"),
        (ChannelFormatError, "bad_metadata", "channel metadata is not valid"),
        (OSError, "disk", "local disk error"),
    ]
    for kind_type, kind, summary in kinds:
        if isinstance(exc, kind_type):
            if kind == "bad_metadata" and "unsafe target path" in str(exc):
                kind = "unsafe_path"
            return OtaError(kind, f"{summary}: {exc}")
    return OtaError("error", f"{type(exc).__name__}: {exc}")


def poll_delay(config: OtaConfig, first: bool = False) -> float:
    """Seconds to the next poll: interval x (1 +- jitter), so a fleet started together drifts."""
    base = config.first_check_s if first else config.poll_interval_s
    return max(0.0, base * (1 + random.uniform(-config.poll_jitter, config.poll_jitter)))


def announce_delay(config: OtaConfig, max_delay_s: float | None = None) -> float:
    """Seconds from an announce to the check: random 0..jitter, so a fleet does not come at once."""
    spread = config.announce_jitter_s if max_delay_s is None else max_delay_s
    return random.uniform(0, spread)


@dataclass
class Offer:
    """A release this device should install, with its signed descriptor and model target."""

    release: Release
    target: str
    variant: Variant
    descriptor: ModelDescriptor
    descriptor_bytes: bytes
    model_target: TargetFile
    file: ModelFile  # what is downloaded: the descriptor's file, or a prebuilt engine of it
    file_format: str = "onnx"

    @property
    def version(self) -> str:
        return self.release.version


def choose(
    index: ChannelIndex,
    name: str,
    target: str,
    device_id: str,
    active_version: str | None,
    pinned: str | None = None,
    rejected: dict[str, str] | None = None,
) -> tuple[Release, str, Variant] | None:
    """The newest release for this model line, target and device; None: nothing to do.

    A pin selects exactly that version (rollout, withdrawal and rejections aside: a person asked
    for it). Otherwise only newer versions this agent can run, inside their rollout, not withdrawn,
    not rejected here.
    """
    rejected = rejected or {}
    agent = semver_key(__version__)
    best: tuple[Release, str, Variant] | None = None
    for release in index.releases:
        if release.name != name:
            continue
        if pinned is not None:
            if release.version != pinned:
                continue
        else:
            if release.withdrawn is not None or release.version in rejected:
                continue
            if semver_key(release.min_agent_version) > agent:
                continue
            if active_version is not None and semver_key(release.version) <= semver_key(
                active_version
            ):
                continue
            if not in_rollout(device_id, release.name, release.version, release.rollout_percent):
                continue
        for preferred in targets.preferences(target):
            if preferred in release.variants:
                if best is None or semver_key(release.version) > semver_key(best[0].version):
                    best = (release, preferred, release.variants[preferred])
                break
    return best


class ChannelClient:
    def __init__(self, config: OtaConfig, metadata_dir: Path, device_id: str) -> None:
        self.config = config
        self.metadata_dir = metadata_dir
        self.device_id = device_id
        self.fetcher = ChannelFetcher(config.timeout_s, config.retries, config.retry_backoff_s)
        base = config.channel.rstrip("/")
        if is_local(base):
            base = local_path(base).resolve().as_uri()
        self.metadata_url = f"{base}/metadata/"
        self.targets_url = f"{base}/targets/"

    def _updater(self) -> Updater:
        if self.config.root is None:
            raise OtaError("config", "ota.root (the channel's trusted root.json) is not set")
        try:
            bootstrap = self.config.root.read_bytes()
        except OSError as exc:
            raise OtaError("config", f"ota.root {self.config.root}: {exc}") from None
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        try:
            return Updater(
                str(self.metadata_dir),
                self.metadata_url,
                target_base_url=self.targets_url,
                fetcher=self.fetcher,
                config=UpdaterConfig(app_user_agent=f"edge-agent/{__version__}"),
                bootstrap=bootstrap,
            )
        except (ValueError, tuf_errors.RepositoryError) as exc:
            message = f"ota.root {self.config.root} is not a TUF root: {exc}"
            raise OtaError("config", message) from None

    def _small_target(self, updater: Updater, path: str, limit: int) -> bytes:
        info = updater.get_targetinfo(path)
        if info is None:
            raise OtaError("missing", f"{path} is not in the signed channel metadata")
        if info.length > limit:
            raise OtaError("oversized", f"{path} is {info.length} bytes; the limit is {limit}")
        with tempfile.TemporaryDirectory(prefix="edge-agent-ota-") as folder:
            local = updater.download_target(info, str(Path(folder) / "file"))
            return Path(local).read_bytes()

    def find(
        self,
        name: str,
        target: str,
        active_version: str | None,
        pinned: str | None = None,
        rejected: dict[str, str] | None = None,
        engines: EngineEnvironment | None = None,
    ) -> Offer | None:
        """Refresh trusted metadata and return the release to install, if any; with
        ``engines`` (a TensorRT device), its prebuilt engine where one matches.

        Raises:
            OtaError: metadata untrusted, expired, replayed, malformed; a descriptor that
                disagrees with its index entry; a model bigger than ``ota.max_model_bytes``.
        """
        try:
            updater = self._updater()
            updater.refresh()
            index = parse(
                ChannelIndex, self._small_target(updater, INDEX_TARGET, MAX_INDEX_BYTES), "index"
            )
            choice = choose(index, name, target, self.device_id, active_version, pinned, rejected)
            if choice is None:
                return None
            release, variant_target, variant = choice
            raw = self._small_target(updater, variant.descriptor, MAX_DESCRIPTOR_BYTES)
            descriptor = parse(ModelDescriptor, raw, f"descriptor {variant.descriptor}")
            self._cross_check(release, variant_target, variant, descriptor)
            chosen, file_format = file_for(descriptor, engines)
            model_target = updater.get_targetinfo(chosen.path)
        except Exception as exc:
            raise classify(exc) from None
        if model_target is None:
            raise OtaError("missing", f"{chosen.path} is not in the signed metadata")
        if model_target.length > self.config.max_model_bytes:
            raise OtaError(
                "oversized",
                f"{chosen.path} is {model_target.length} bytes; "
                f"ota.max_model_bytes is {self.config.max_model_bytes}",
            )
        if (
            model_target.length != chosen.length
            or model_target.hashes.get("sha256") != chosen.sha256
        ):
            raise OtaError(
                "bad_metadata", f"descriptor of {release.version} disagrees with its signed target"
            )
        return Offer(
            release, variant_target, variant, descriptor, raw, model_target, chosen, file_format
        )

    @staticmethod
    def _cross_check(
        release: Release, target: str, variant: Variant, descriptor: ModelDescriptor
    ) -> None:
        mismatches = [
            f"{field} {theirs!r} != {ours!r}"
            for field, theirs, ours in (
                ("name", descriptor.name, release.name),
                ("version", descriptor.version, release.version),
                ("target", descriptor.target, target),
                ("length", descriptor.file.length, variant.model_length),
            )
            if theirs != ours
        ]
        if mismatches:
            raise ChannelFormatError(
                f"descriptor {variant.descriptor} disagrees with the index: {'; '.join(mismatches)}"
            )

    def model_url(self, info: TargetFile) -> str:
        """Consistent-snapshot URL: the file name prefixed with its hash, as ngclient does."""
        folder, sep, basename = info.path.rpartition("/")
        return f"{self.targets_url}{folder}{sep}{info.hashes['sha256']}.{basename}"

    def download(self, offer: Offer, partial: Path, progress: Any = None) -> Path:
        """Fetch (resuming) and verify the model; a file that fails the hash is deleted.

        Raises:
            OtaError: wrong size, corrupt, unreachable, disk.
        """
        info = offer.model_target
        try:
            self.fetcher.download_to(self.model_url(info), partial, info.length, progress)
            with partial.open("rb") as handle:
                info.verify_length_and_hashes(handle)
        except tuf_errors.LengthOrHashMismatchError as exc:
            partial.unlink(missing_ok=True)  # never resume from bytes that do not verify
            raise classify(exc) from None
        except tuf_errors.DownloadLengthMismatchError as exc:
            partial.unlink(missing_ok=True)
            raise classify(exc) from None
        except Exception as exc:
            raise classify(exc) from None
        return partial
