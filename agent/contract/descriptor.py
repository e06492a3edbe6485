"""What an OTA channel says about its models: the index, the releases and the model descriptor.

Both ends share these types: the publisher (``edge-models publish``) writes them, the device
reads them. They travel as TUF targets, so their bytes are signed; these checks are about their
meaning: a name that climbs out of its folder, a version that is not semantic, a descriptor that
disagrees with its index entry. Anything that fails here is refused with a message that says
which field and why, and changes nothing on the device.
"""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from agent.contract.golden import GOLDEN_SCHEMA
from agent.contract.versions import SemVer

INDEX_TARGET = "index.json"
INDEX_SCHEMA = "edge-agent/channel-index/v1"
DESCRIPTOR_SCHEMA = "edge-agent/model-descriptor/v1"

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


class ChannelFormatError(ValueError):
    """Channel metadata that is signed but makes no sense (bad path, version, field)."""


def check_target_path(path: str) -> str:
    """A target name stays inside the channel: relative, plain segments, no ``..``."""
    if len(path) > 300 or "\\" in path or path.startswith("/"):
        raise ValueError(f"unsafe target path {path!r}: must be a short relative path")
    for segment in path.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise ValueError(
                f"unsafe target path {path!r}: segment {segment!r} is not a plain file name"
            )
    return path


TargetPath = Annotated[str, AfterValidator(check_target_path)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Target = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


class _Lenient(BaseModel):
    # newer publishers may add fields; older agents ignore what they do not know
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ModelFile(_Lenient):
    path: TargetPath
    length: int = Field(gt=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class InputSpec(_Lenient):
    height: int = Field(gt=0, le=8192)
    width: int = Field(gt=0, le=8192)
    layout: Literal["NCHW"] = "NCHW"
    dtype: str = "float32"


class PrebuiltEngine(_Lenient):
    """A TensorRT engine built from the descriptor's ONNX on one TensorRT version and GPU model."""

    file: ModelFile
    tensorrt: str = Field(min_length=1, max_length=40)
    gpu: str = Field(min_length=1, max_length=120)
    compute_capability: str = Field(pattern=r"^[0-9]{1,2}\.[0-9]{1,2}$")
    precision: str = "int8"


class EngineEnvironment(_Lenient):
    """What a device's TensorRT engines are tied to."""

    tensorrt: str
    gpu: str
    compute_capability: str


class ModelDescriptor(_Lenient):
    """Everything a device needs to judge a model before it runs it."""

    schema_id: Literal["edge-agent/model-descriptor/v1"] = Field(alias="schema")
    name: Name
    version: SemVer
    task: Literal["detect"] = "detect"
    input: InputSpec
    class_names: dict[int, str] = Field(min_length=1)
    format: Literal["onnx", "engine", "rknn"]
    precision: str
    target: Target
    min_agent_version: SemVer = "0.0.0"
    file: ModelFile
    golden: dict[str, Any]
    published: str | None = None
    gate: dict[str, Any] | None = None
    engines: list[PrebuiltEngine] = Field(default_factory=list, max_length=32)

    def model_post_init(self, _: Any) -> None:
        if self.golden.get("schema") != GOLDEN_SCHEMA or not self.golden.get("images"):
            raise ValueError("golden: not a golden self-test set (schema or images missing)")


def file_for(
    descriptor: ModelDescriptor, environment: EngineEnvironment | None
) -> tuple[ModelFile, str]:
    """The file this device downloads, and why: a prebuilt engine only when its TensorRT version
    and GPU are exactly this device's (an engine runs nowhere else); otherwise the ONNX it came
    from, which the device builds into an engine itself."""
    if descriptor.format != "onnx" or environment is None:
        return descriptor.file, descriptor.format
    for engine in descriptor.engines:
        if (engine.tensorrt, engine.gpu, engine.compute_capability) == (
            environment.tensorrt,
            environment.gpu,
            environment.compute_capability,
        ):
            return engine.file, "engine"
    return descriptor.file, "onnx"


class Variant(_Lenient):
    descriptor: TargetPath
    model_length: int = Field(gt=0)


class Release(_Lenient):
    name: Name
    version: SemVer
    rollout_percent: float = Field(100.0, ge=0.0, le=100.0)
    min_agent_version: SemVer = "0.0.0"
    variants: dict[Target, Variant] = Field(min_length=1)
    published: str | None = None
    rollout_updated: str | None = None  # when rollout_percent last changed (ISO 8601, UTC)
    withdrawn: str | None = None  # why: devices that have not taken it never will


class ChannelIndex(_Lenient):
    schema_id: Literal["edge-agent/channel-index/v1"] = Field(alias="schema")
    channel: Name
    releases: list[Release] = Field(default_factory=list)

    def release(self, name: str, version: str) -> Release | None:
        return next((r for r in self.releases if r.name == name and r.version == version), None)


def parse(model: type[_Lenient], data: bytes, what: str) -> Any:
    """Validate channel JSON; every problem becomes one ChannelFormatError naming its field."""
    try:
        return model.model_validate_json(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise ChannelFormatError(f"{what} is not valid: {problems}") from None


def in_rollout(device_id: str, name: str, version: str, percent: float) -> bool:
    """Stable per device and release: raising the percentage only ever adds devices."""
    if percent >= 100.0:
        return True
    digest = hashlib.sha256(f"{name}/{version}/{device_id}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64 * 100.0
    return bucket < percent
