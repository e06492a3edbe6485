"""Releasing a model: choose its target, convert it where the target needs it, gate it on that
target's kernels, record its golden self-test there, and publish it into a signed channel.

``release(request)`` is the factory's core as a plain Python API: ``edge-models publish`` parses
its arguments into a ``ReleaseRequest`` and prints what comes back; the demo, the rollout tests
and anyone scripting a factory call the same function. A failed gate is an answer
(``GateFailed``), not an exception: nothing is published and the reasons say why. Bad input
(unknown target, unreadable golden set, a model made for other kernels) raises ``FactoryError``
before anything is written.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from itertools import chain
from pathlib import Path
from typing import Any

from agent import __version__
from models.errors import FactoryError

# targets whose models the factory converts from the float ONNX itself, verified in one go
CONVERTED_TARGETS = ("rk3588",)


@dataclass(frozen=True)
class GateSettings:
    """The quality gate a release must pass (``skip``: publish without it, on record)."""

    reference: Path | None = None  # the float model, or a stored report.json
    data: Path | None = None  # the evaluation set
    max_map_drop: float = 1.0  # mAP50-95 points
    max_latency_ratio: float = 1.10  # vs the reference, when both ran on this machine's kernels
    rounds: int = 20
    skip: bool = False


@dataclass(frozen=True)
class ReleaseRequest:
    """One model released as ``name`` ``version`` for ``target`` into ``channel``."""

    channel: Path
    keys: Path  # the channel's online keys (``edge-models keys init``)
    model: Path  # .onnx, .engine or .rknn to ship (the float ONNX for converted targets)
    version: str
    name: str | None = None  # the model line devices follow (default: the model's name)
    target: str | None = None  # default: what the model was made for, else this machine's
    unverified_target: bool = False  # judge float semantics where the kernels cannot run here
    rollout_percent: float = 100.0
    min_agent_version: str = __version__
    info: Path | None = None  # for an engine: the ONNX it was built from
    calib: Path | None = None  # converted targets: calibration images
    engines: tuple[Path, ...] = ()  # jetson-*: TensorRT engines prebuilt from ``model``
    golden: Path | None = None  # a recorded golden set
    golden_images: tuple[Path, ...] = ()  # or the photos to record it from, on the target
    gate: GateSettings = field(default_factory=GateSettings)


@dataclass(frozen=True)
class Published:
    """What went into the channel, and the gate's record that travels in its descriptor."""

    name: str
    version: str
    target: str
    length: int
    sha256: str
    timestamp_version: int
    rollout_percent: float
    gate: dict[str, Any]


@dataclass(frozen=True)
class GateFailed:
    """The gate said no: nothing was published."""

    model: str
    target: str
    reasons: list[str]
    checks: dict[str, Any]


Say = Callable[[str], None]


def release(request: ReleaseRequest, warn: Say | None = None) -> Published | GateFailed:
    """Gate ``request.model`` on its target's kernels and publish it; ``warn`` hears what a
    user should know before it happens (a skipped gate).

    Raises:
        FactoryError: bad input (target, golden set, engines, missing gate inputs), named.
    """
    from models.channel import inspect_onnx
    from models.kernels import verification

    evaluated = request.info or request.model
    target = target_for(evaluated, request.target)
    if target in CONVERTED_TARGETS:
        with tempfile.TemporaryDirectory(prefix="edge-models-release-") as work:
            shipped, runner, info = _converted(request, target, Path(work))
            return _gate_and_publish(request, target, shipped, request.model, runner, info, warn)
    info = inspect_onnx(request.info) if request.info is not None else None
    runner = verification(target, request.unverified_target)
    engines = _engines(request)
    return _gate_and_publish(request, target, request.model, evaluated, runner, info, warn, engines)


def host_target() -> str:
    """This machine's deployment target."""
    from agent.contract import detect

    return detect().target


def made_for(model: Path) -> str | None:
    """The target an ONNX model records it was made for (``edge-models quantize --target``)."""
    if model.suffix.lower() != ".onnx":
        return None
    import onnx

    try:
        props = onnx.load(str(model), load_external_data=False).metadata_props
    except Exception:
        return None  # the loaders after this say what is wrong with the file
    return next((p.value for p in props if p.key == "target"), None)


def target_for(model: Path, explicit: str | None) -> str:
    """The target to verify and ship ``model`` for: ``explicit``, else the one it was made for,
    else this machine's. A model made for other kernels than a target's devices run is refused.
    """
    from agent.contract import targets
    from models.kernels import known_target

    made = made_for(model)
    target = explicit or made or host_target()
    known_target(target)
    if made and made not in targets.preferences(target):
        fix = (
            f"{target} quantizes the float model itself: publish the float ONNX with --calib"
            if target in CONVERTED_TARGETS
            else f"quantize it with --target {target}"
        )
        raise FactoryError(
            f"{model.name} was made for {made}; {target} devices do not run {made} models ({fix})"
        )
    return target


def _engines(request: ReleaseRequest) -> list[tuple[Path, dict]]:
    """The prebuilt engines to ship, each checked to come from the model published."""
    from models.convert.tensorrt import engine_record

    jetson = (request.target or "").startswith("jetson")
    if request.engines and (request.model.suffix.lower() != ".onnx" or not jetson):
        raise FactoryError(
            "--engine ships TensorRT engines beside their ONNX for a jetson-* target: "
            "--model ONNX --target jetson-<class>"
        )
    return [(engine, engine_record(engine, request.model)) for engine in request.engines]


def _converted(request: ReleaseRequest, target: str, work: Path) -> tuple[Path, Any, Any]:
    """Convert the float ONNX for ``target`` once, running the simulator on every image the gate
    and the golden set will judge: the file to ship, the runner that answers for it, its info."""
    from agent.config import ModelConfig
    from agent.vision import load_backend
    from models.channel import inspect_onnx
    from models.convert.rknn import SimulatorRunner, convert
    from models.datasets import load_dataset
    from models.evaluate import letterboxed
    from models.golden import golden_images, golden_inputs

    model = request.model
    if model.suffix.lower() != ".onnx" or request.info is not None:
        raise FactoryError(
            f"publish --target {target} converts the float ONNX itself (--model fp32.onnx "
            "--calib DIR): a written .rknn cannot be verified, the toolkit's simulator runs only "
            "the build it made"
        )
    if request.calib is None:
        raise FactoryError(f"publish --target {target} needs --calib DIR (calibration images)")
    info = inspect_onnx(model)
    if info.precision not in ("fp32", "fp16"):
        raise FactoryError(
            f"{model.name} is {info.precision}: {target} quantizes the float model itself"
        )
    reference = load_backend("onnxruntime", model, ModelConfig(path=model))
    shipped = work / "model.rknn"
    try:
        # handed to the conversion one image at a time: a gate set never sits in memory whole
        inputs: list[Iterable[Any]] = []
        if not request.gate.skip and request.gate.data is not None:
            dataset = load_dataset(request.gate.data)
            inputs.append(t for t, _ in letterboxed(reference, dataset))
        if request.golden is None and request.golden_images:
            entries = golden_images(list(request.golden_images))
            inputs.append(t for t, _ in golden_inputs(entries, info.imgsz, info.input_dtype))
        conversion = convert(model, request.calib, shipped, chain(*inputs), imgsz=info.imgsz)
    finally:
        reference.close()
    return shipped, SimulatorRunner.of(conversion), replace(info, precision="int8")


def _golden_for(request: ReleaseRequest, runner: object, target: str) -> dict:
    from models.golden import record_golden

    if request.golden is not None:
        try:
            return json.loads(request.golden.read_text())
        except (OSError, ValueError) as exc:
            raise FactoryError(f"cannot read the golden set {request.golden}: {exc}") from None
    if request.model.suffix.lower() != ".onnx":
        raise FactoryError("--golden-images records with ONNX models only; pass --golden FILE")
    if not request.golden_images:
        raise FactoryError("the golden self-test set needs --golden-images or --golden FILE")
    return record_golden(request.model, list(request.golden_images), runner=runner, target=target)


def _gate_and_publish(
    request: ReleaseRequest,
    target: str,
    shipped: Path,
    evaluated: Path,
    runner: Any,
    info: Any,
    warn: Say | None,
    engines: list[tuple[Path, dict]] | None = None,
) -> Published | GateFailed:
    """The quality gate on ``runner`` (``evaluated`` is what it judges), the golden set on the
    same runner, then ``shipped`` into the channel; a failed gate publishes nothing."""
    from models.channel import publish
    from models.gate import gate_model
    from models.kernels import SemanticsRunner

    settings = request.gate
    verified: dict[str, Any] = {"target": target, "kernels": runner.describe()}
    if isinstance(runner, SemanticsRunner):
        verified["unverified_target"] = True
    if settings.skip:
        if warn is not None:
            warn("--no-gate: publishing without the quality gate")
        gate: dict[str, Any] = {"skipped": True, **verified}
    else:
        if settings.reference is None or settings.data is None:
            raise FactoryError("the quality gate needs --reference and --data (or --no-gate)")
        result = gate_model(evaluated, settings.reference, settings.data, settings.rounds,
                            settings.max_map_drop, settings.max_latency_ratio, runner)  # fmt: skip
        for warning in result.warnings if warn is not None else ():
            warn(warning)
        if not result.passed:
            return GateFailed(request.model.name, target, list(result.reasons), result.checks)
        gate = {"passed": True, "checks": result.checks, **verified}
    published = publish(
        request.channel,
        request.keys,
        shipped,
        request.version,
        _golden_for(request, runner, target),
        name=request.name,
        target=target,
        rollout_percent=request.rollout_percent,
        min_agent_version=request.min_agent_version,
        info=info,
        gate=gate,
        engines=engines,
    )
    return Published(published.name, published.version, published.target, published.length,
                     published.sha256, published.timestamp_version, request.rollout_percent,
                     gate)  # fmt: skip
