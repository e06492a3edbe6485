"""The OTA channel on the publisher's side: add a model, change a rollout, re-sign metadata.

A channel is a folder any static web server, object store or CDN can serve::

    metadata/  1.root.json root.json  N.targets.json  M.snapshot.json  timestamp.json
    targets/   index.json and models/<name>/<version>/<target>/{model.onnx,descriptor.json},
               each stored as <sha256>.<file name> (TUF consistent snapshots)

Files are written first, then targets, then snapshot, and ``timestamp.json`` last by atomic
rename: a device that reads the channel mid-publish sees the old release or the new one, whole.
Only the online keys (targets, snapshot, timestamp) are used here; the root key stays offline.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent import __version__
from agent.contract import (
    DESCRIPTOR_SCHEMA,
    INDEX_SCHEMA,
    INDEX_TARGET,
    ChannelFormatError,
    ChannelIndex,
    ModelDescriptor,
    Release,
    Variant,
    check_semver,
    parse,
    write_atomic,
)
from agent.vision import BackendInfo, gpu_slug
from models.channel.keys import ONLINE_ROLES, key_path, load_signer
from models.errors import FactoryError

EXPIRY_DAYS = {"targets": 90, "snapshot": 30, "timestamp": 7}
FORMATS = {".onnx": "onnx", ".engine": "engine", ".plan": "engine", ".rknn": "rknn"}


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


@dataclass
class Repository:
    """The channel's current signed state, loaded from disk, and how to sign the next one."""

    folder: Path
    keys: Path
    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]

    @property
    def metadata_dir(self) -> Path:
        return self.folder / "metadata"

    @property
    def targets_dir(self) -> Path:
        return self.folder / "targets"

    def add_target(self, path: str, data: bytes) -> TargetFile:
        """Store a file under its hash-prefixed name and list it in targets."""
        target = TargetFile.from_data(path, data, ["sha256"])
        stored = self.stored_path(path, target)
        if not stored.exists():
            _write_atomic(stored, data)
        self.targets.signed.targets[path] = target
        return target

    def read_target(self, path: str) -> bytes | None:
        target = self.targets.signed.targets.get(path)
        if target is None:
            return None
        return self.stored_path(path, target).read_bytes()

    def stored_path(self, path: str, target: TargetFile) -> Path:
        """Where a target's bytes live: its name prefixed with its hash (consistent snapshot)."""
        folder, _, name = path.rpartition("/")
        return self.targets_dir / folder / f"{target.hashes['sha256']}.{name}"

    def index(self) -> ChannelIndex:
        raw = self.read_target(INDEX_TARGET)
        if raw is None:
            return ChannelIndex.model_validate({"schema": INDEX_SCHEMA, "channel": "default"})
        return parse(ChannelIndex, raw, "channel index")

    def write_index(self, index: ChannelIndex) -> None:
        data = index.model_dump_json(by_alias=True, indent=1).encode()
        self.add_target(INDEX_TARGET, data)

    def commit(self, expires: dict[str, datetime] | None = None, sign_targets: bool = True) -> int:
        """Sign and write targets (if changed), snapshot, then timestamp; returns the new
        timestamp version. ``expires`` overrides a role's expiry (tests make stale channels)."""
        expires = expires or {}
        now = _now()
        signers = {role: load_signer(key_path(self.keys, role)) for role in ONLINE_ROLES}

        def bump(document: Metadata[Any], role: str) -> int:
            signed = document.signed
            signed.version += 1
            signed.expires = expires.get(role, now + timedelta(days=EXPIRY_DAYS[role]))
            document.sign(signers[role])
            return signed.version

        documents: list[tuple[Metadata[Any], Path]] = []
        if sign_targets:
            version = bump(self.targets, "targets")
            documents.append((self.targets, self.metadata_dir / f"{version}.targets.json"))
            self.snapshot.signed.meta["targets.json"] = MetaFile(version=version)
        version = bump(self.snapshot, "snapshot")
        documents.append((self.snapshot, self.metadata_dir / f"{version}.snapshot.json"))
        self.timestamp.signed.snapshot_meta = MetaFile(version=version)
        bump(self.timestamp, "timestamp")
        documents.append((self.timestamp, self.metadata_dir / "timestamp.json"))
        serializer = JSONSerializer(compact=False)
        for document, path in documents:  # timestamp.json last: it makes the rest visible
            _write_atomic(path, document.to_bytes(serializer))
        return self.timestamp.signed.version


def create(folder: Path, keys: Path, root: Metadata[Root], channel: str) -> Repository:
    """Write root.json and the first targets/snapshot/timestamp (an empty index)."""
    serializer = JSONSerializer(compact=False)
    metadata = folder / "metadata"
    metadata.mkdir(parents=True, exist_ok=True)
    (folder / "targets").mkdir(exist_ok=True)
    raw = root.to_bytes(serializer)
    _write_atomic(metadata / f"{root.signed.version}.root.json", raw)
    _write_atomic(metadata / "root.json", raw)
    repo = Repository(
        folder,
        keys,
        root,
        Metadata(Targets()),
        Metadata(Snapshot()),
        Metadata(Timestamp()),
    )
    repo.write_index(
        ChannelIndex.model_validate({"schema": INDEX_SCHEMA, "channel": channel, "releases": []})
    )
    repo.commit()
    return repo


@contextlib.contextmanager
def open_repository(folder: Path, keys: Path) -> Iterator[Repository]:
    """The channel under an exclusive lock (two publishers never interleave)."""
    metadata = folder / "metadata"
    if not (metadata / "timestamp.json").is_file():
        raise FactoryError(f"{folder} is not a channel (run `edge-models keys init` first)")
    with (folder / ".publish.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            root = Metadata[Root].from_file(str(metadata / "root.json"))
            timestamp = Metadata[Timestamp].from_file(str(metadata / "timestamp.json"))
            snap_version = timestamp.signed.snapshot_meta.version
            snapshot = Metadata[Snapshot].from_file(str(metadata / f"{snap_version}.snapshot.json"))
            targets_version = snapshot.signed.meta["targets.json"].version
            targets = Metadata[Targets].from_file(str(metadata / f"{targets_version}.targets.json"))
        except (OSError, ValueError, KeyError) as exc:
            raise FactoryError(f"channel {folder} metadata cannot be read: {exc}") from None
        yield Repository(folder, keys, root, targets, snapshot, timestamp)


# -- what a model is ----------------------------------------------------------------------------
def inspect_onnx(path: Path) -> BackendInfo:
    """Name, input, classes and precision from the file alone: the publisher never runs a
    model it has not gated (a broken one may crash on its first inference)."""
    import onnx
    import onnx.shape_inference

    from agent.vision import ONNX_QUANTIZED_OPS, file_digest, resolve_detect_head

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise FactoryError(f"{path} is not a readable ONNX model: {exc}") from None
    graph = model.graph
    metadata = {p.key: p.value for p in model.metadata_props}

    def dims(value: Any) -> list[Any]:
        return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]

    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise FactoryError(f"{path}: expected one image input, got {len(inputs)}")
    head = resolve_detect_head(path, dims(inputs[0]), [dims(o) for o in graph.output], metadata)
    precision = "int8" if any(n.op_type in ONNX_QUANTIZED_OPS for n in graph.node) else "fp32"
    return BackendInfo(
        backend="onnx",
        provider="",
        model_path=str(path),
        model_name=metadata.get("model_name", path.stem),
        model_version=metadata.get("model_version", "sha256:" + file_digest(path)[:12]),
        input_name=inputs[0].name,
        input_shape=head.input_shape,
        input_dtype="float32",
        output_name=graph.output[0].name,
        output_shape=head.output_shape,
        class_names=head.class_names,
        stride=int(metadata.get("stride", 32) or 32),
        precision=precision,
        metadata=metadata,
    )


@dataclass
class Publication:
    name: str
    version: str
    target: str
    model_path: str
    descriptor_path: str
    length: int
    sha256: str
    timestamp_version: int


def publish(
    channel: Path,
    keys: Path,
    model: Path,
    version: str,
    golden: dict[str, Any],
    name: str | None = None,
    target: str = "cpu-x86_64",
    rollout_percent: float = 100.0,
    min_agent_version: str = __version__,
    info: BackendInfo | None = None,
    gate: dict[str, Any] | None = None,
    engines: list[tuple[Path, dict[str, Any]]] | None = None,
) -> Publication:
    """Add ``model`` as ``target`` of release ``name`` ``version``; sign and write.

    ``info`` describes a non-ONNX file (an engine) by the ONNX it was built from. ``engines``
    are TensorRT engines prebuilt from the ONNX ``model`` (each with its ``build-engine``
    record): devices whose TensorRT and GPU match one take it; others take the ONNX.

    Raises:
        FactoryError: a bad version or target, a variant already published with other bytes,
            an unreadable model, or a rollout that would shrink.
    """
    try:
        check_semver(version)
        check_semver(min_agent_version)
    except ValueError as exc:
        raise FactoryError(str(exc)) from None
    fmt = FORMATS.get(model.suffix.lower())
    if fmt is None:
        raise FactoryError(f"{model}: unknown model format (expected {', '.join(FORMATS)})")
    if info is None:
        if fmt != "onnx":
            raise FactoryError(f"{model}: a {fmt} file needs the ONNX it was built from (--info)")
        info = inspect_onnx(model)
    name = name or info.model_name
    data = model.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    folder = f"models/{name}/{version}/{target}"
    model_path = f"{folder}/model{model.suffix.lower()}"
    descriptor = {
        "schema": DESCRIPTOR_SCHEMA,
        "name": name,
        "version": version,
        "task": "detect",
        "input": {
            "height": info.imgsz[0],
            "width": info.imgsz[1],
            "layout": "NCHW",
            "dtype": info.input_dtype,
        },
        "class_names": {str(k): v for k, v in info.class_names.items()},
        "format": fmt,
        "precision": info.precision,
        "target": target,
        "min_agent_version": min_agent_version,
        "file": {"path": model_path, "length": len(data), "sha256": sha256},
        "golden": golden,
        "published": _now().isoformat(),
        "gate": gate,
    }
    prebuilt = []
    for engine, record in engines or []:
        slug = gpu_slug(record["gpu"], record["compute_capability"], record["tensorrt"])
        engine_bytes = engine.read_bytes()
        entry = {
            "file": {
                "path": f"{folder}/engine-{slug}.engine",
                "length": len(engine_bytes),
                "sha256": hashlib.sha256(engine_bytes).hexdigest(),
            },
            "tensorrt": record["tensorrt"],
            "gpu": record["gpu"],
            "compute_capability": record["compute_capability"],
            "precision": record.get("precision", info.precision),
        }
        prebuilt.append((entry, engine_bytes))
    if prebuilt:
        if fmt != "onnx":
            raise FactoryError("prebuilt engines ship beside the ONNX they came from: --model ONNX")
        descriptor["engines"] = [entry for entry, _ in prebuilt]
    raw_descriptor = json.dumps(descriptor, indent=1).encode()
    try:
        parse(ModelDescriptor, raw_descriptor, "descriptor")  # what devices will check
    except ChannelFormatError as exc:
        raise FactoryError(str(exc)) from None
    with open_repository(channel, keys) as repo:
        index = repo.index()
        release = index.release(name, version)
        existing = release.variants.get(target) if release else None
        if existing is not None:
            old = repo.targets.signed.targets.get(model_path)
            if old is None or old.hashes.get("sha256") != sha256:
                raise FactoryError(
                    f"{name} {version} already has a {target} model with other bytes: "
                    "publish a new version instead"
                )
        descriptor_path = f"{folder}/descriptor.json"
        repo.add_target(model_path, data)
        for entry, engine_bytes in prebuilt:
            repo.add_target(entry["file"]["path"], engine_bytes)
        repo.add_target(descriptor_path, raw_descriptor)
        variant = Variant(descriptor=descriptor_path, model_length=len(data))
        if release is None:
            release = Release(
                name=name,
                version=version,
                rollout_percent=rollout_percent,
                min_agent_version=min_agent_version,
                variants={target: variant},
                published=_now().isoformat(),
                rollout_updated=_now().isoformat(),
            )
            index.releases.append(release)
        else:
            release.variants[target] = variant
        repo.write_index(index)
        timestamp_version = repo.commit()
    return Publication(
        name, version, target, model_path, descriptor_path, len(data), sha256, timestamp_version
    )


def _edit_release(
    channel: Path, keys: Path, name: str, version: str, change: Any
) -> tuple[Release, int]:
    """Apply ``change(release)`` to one release of the index and sign the result (online keys)."""
    with open_repository(channel, keys) as repo:
        index = repo.index()
        release = index.release(name, version)
        if release is None:
            raise FactoryError(f"{name} {version} is not in channel {channel}")
        change(release)
        repo.write_index(index)
        return release, repo.commit()


def set_rollout(channel: Path, keys: Path, name: str, version: str, percent: float) -> float:
    """Change a release's rollout percentage; returns the old one.

    Raises:
        FactoryError: percent out of 0..100, an unknown or a withdrawn release.
    """
    if not 0.0 <= percent <= 100.0:
        raise FactoryError(f"rollout must be between 0 and 100, got {percent:g}")
    old: list[float] = []

    def change(release: Release) -> None:
        if release.withdrawn is not None:
            raise FactoryError(
                f"{name} {version} was withdrawn ({release.withdrawn}): publish a new version"
            )
        old.append(release.rollout_percent)
        release.rollout_percent = percent
        release.rollout_updated = _now().isoformat()

    _edit_release(channel, keys, name, version, change)
    return old[0]


def withdraw(channel: Path, keys: Path, name: str, version: str, reason: str) -> Release:
    """Mark a release withdrawn: devices that have not taken it never will.

    Its rollout also drops to 0 so that agents older than the ``withdrawn`` field stop too.
    Devices already running it keep it (a rollback is a device's own decision, or a pin)."""
    if not reason.strip():
        raise FactoryError("a withdrawal needs a reason (devices and operators read it)")

    def change(release: Release) -> None:
        release.withdrawn = reason.strip()
        release.rollout_percent = 0.0
        release.rollout_updated = _now().isoformat()

    release, _ = _edit_release(channel, keys, name, version, change)
    return release


def refresh(channel: Path, keys: Path) -> int:
    """Re-sign snapshot and timestamp with fresh expiry (run daily: devices refuse stale
    metadata, by design)."""
    with open_repository(channel, keys) as repo:
        return repo.commit(sign_targets=False)
