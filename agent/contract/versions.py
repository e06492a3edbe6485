"""Semantic versions (semver.org): the one version type models, releases and the agent share."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
)


def check_semver(version: str) -> str:
    if not _SEMVER.match(version):
        raise ValueError(f"{version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    return version


def semver_key(version: str) -> tuple:
    """Order semantic versions as semver.org does: a pre-release sorts before its release."""
    match = _SEMVER.match(version)
    if match is None:
        return (-1,)
    major, minor, patch, pre = int(match[1]), int(match[2]), int(match[3]), match[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre[1:].split("."))
    return (major, minor, patch, 0, parts)


SemVer = Annotated[str, AfterValidator(check_semver)]
