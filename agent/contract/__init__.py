"""What the factory and the device agree on, in one place both import: the stable face.

The model descriptor and channel index (``descriptor``), the golden self-test format
(``golden``), deployment targets (``targets``), semantic versions (``versions``), files written
whole or not at all (``files``) and the error types every command reports (``errors``). These
modules import nothing else of the agent, so the factory can depend on them without reaching
into the daemon; a change here is a change of what devices in the field read, so it is made
compatibly (new fields optional, old ones kept).
"""

from agent.contract import targets
from agent.contract.descriptor import (
    DESCRIPTOR_SCHEMA,
    INDEX_SCHEMA,
    INDEX_TARGET,
    ChannelFormatError,
    ChannelIndex,
    EngineEnvironment,
    InputSpec,
    ModelDescriptor,
    ModelFile,
    PrebuiltEngine,
    Release,
    Variant,
    check_target_path,
    file_for,
    in_rollout,
    parse,
)
from agent.contract.errors import (
    AgentError,
    BackendUnavailable,
    ConfigError,
    ImageError,
    ModelError,
    SourceError,
)
from agent.contract.files import atomic_path, fsync_dir, write_atomic
from agent.contract.golden import GOLDEN_SCHEMA, decode_image
from agent.contract.targets import Detected, Target, UnknownTarget, detect
from agent.contract.versions import SemVer, check_semver, semver_key

__all__ = [
    "DESCRIPTOR_SCHEMA",
    "GOLDEN_SCHEMA",
    "INDEX_SCHEMA",
    "INDEX_TARGET",
    "AgentError",
    "BackendUnavailable",
    "ChannelFormatError",
    "ChannelIndex",
    "ConfigError",
    "Detected",
    "EngineEnvironment",
    "ImageError",
    "InputSpec",
    "ModelDescriptor",
    "ModelError",
    "ModelFile",
    "PrebuiltEngine",
    "Release",
    "SemVer",
    "SourceError",
    "Target",
    "UnknownTarget",
    "Variant",
    "atomic_path",
    "check_semver",
    "check_target_path",
    "decode_image",
    "detect",
    "file_for",
    "fsync_dir",
    "in_rollout",
    "parse",
    "semver_key",
    "targets",
    "write_atomic",
]
