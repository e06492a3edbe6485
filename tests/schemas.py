"""Validate published payloads against the JSON Schema files in agent/link/schemas/."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parents[1] / "agent" / "link" / "schemas"
BY_LEAF = {
    "status": "status",
    "detections": "detections",
    "telemetry": "telemetry",
    "events": "event",
    "model": "model",
    "objects": "objects",
}


@cache
def registry() -> Registry:
    resources = []
    for path in SCHEMAS.glob("*.schema.json"):
        schema = json.loads(path.read_text())
        resources.append((path.name, Resource.from_contents(schema)))
        resources.append((schema["$id"], Resource.from_contents(schema)))
    return Registry().with_resources(resources)


def schema_for(topic: str) -> dict:
    parts = topic.split("/")
    if len(parts) == 4 and parts[1] == "fleet":  # {prefix}/fleet/{channel}/rollout|announce
        leaf = parts[3]
    elif topic.endswith("/result"):
        leaf = "command-result"
    else:  # {prefix}/{device}/{leaf}, or {prefix}/{device}/{camera}/{leaf} with several cameras
        rest = topic.split("/", 2)[2]
        leaf = BY_LEAF[rest if rest in BY_LEAF else rest.split("/", 1)[1]]
    return json.loads((SCHEMAS / f"{leaf}.schema.json").read_text())


def validate(topic: str, payload: dict) -> None:
    schema = schema_for(topic)
    jsonschema.Draft202012Validator(schema, registry=registry()).validate(payload)
