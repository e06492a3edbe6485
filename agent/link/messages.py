"""Builders of the payloads the agent publishes, each with its ``schema`` id.

agent/link/schemas/ holds the JSON Schema of each, and the tests validate every message the agent
sends against it."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from agent import __version__
from agent.vision import BackendInfo

STATUS = "edge-agent/status/v1"
TELEMETRY = "edge-agent/telemetry/v1"
EVENT = "edge-agent/event/v1"
MODEL = "edge-agent/model/v1"
COMMAND_RESULT = "edge-agent/command-result/v1"


MAX_ANNOUNCE_SPREAD_S = 6 * 3600.0
MAX_ANNOUNCE_BYTES = 4096  # an announce is a few fields; anything bigger is not one


class BadPayload(ValueError):
    """A received payload the agent will not act on: too big, not JSON, too deep, not an object."""


def parse_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    """The JSON object in an untrusted payload (anyone with publish rights may have sent it).

    Raises:
        BadPayload: larger than ``max_bytes``, not UTF-8 JSON, nested deeper than the parser
            can follow (a 100 KB ``[[[[...`` made json.loads raise RecursionError), or not an
            object. Never anything else.
    """
    if len(payload) > max_bytes:
        raise BadPayload(f"payload too large: {len(payload)} bytes (max {max_bytes})")
    try:
        body = json.loads(payload.decode("utf-8")) if payload.strip() else {}
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadPayload(f"payload is not valid UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise BadPayload("payload is nested too deeply to parse") from None
    if not isinstance(body, dict):
        raise BadPayload(f"payload must be a JSON object, got {type(body).__name__}")
    return body


def announce_spread(payload: bytes, own_jitter_s: float) -> float:
    """How long a device may wait before it checks after an announce: its own jitter, or longer
    when the announce asks the fleet to spread its downloads out (``spread_s``, at most 6 h).
    Never shorter: a stray or hostile announce cannot make a fleet arrive at once."""
    try:
        asked = parse_object(payload, MAX_ANNOUNCE_BYTES).get("spread_s")
    except BadPayload:
        return own_jitter_s
    if isinstance(asked, bool) or not isinstance(asked, int | float) or math.isnan(asked):
        return own_jitter_s
    return max(own_jitter_s, min(float(asked), MAX_ANNOUNCE_SPREAD_S))


def model_ref(info: BackendInfo | None) -> dict[str, str] | None:
    if info is None:
        return None
    return {"name": info.model_name, "version": info.model_version, "precision": info.precision}


def status(state: str, device_id: str, session: str, model: BackendInfo | None) -> dict[str, Any]:
    return {
        "schema": STATUS,
        "state": state,
        "device_id": device_id,
        "session": session,
        "agent_version": __version__,
        "model": model_ref(model),
        "timestamp": round(time.time(), 3),
    }


def model_state(
    device_id: str, info: BackendInfo, ota: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The retained ``model`` message: the active model, and the OTA state when OTA is on."""
    message: dict[str, Any] = {
        "schema": MODEL,
        "device_id": device_id,
        "active": {**info.summary(), "classes": info.num_classes},
        "timestamp": round(time.time(), 3),
    }
    if ota is not None:
        message["ota"] = ota
    return message


def event(
    kind: str, message: str, level: str, device_id: str, details: dict[str, Any]
) -> dict[str, Any]:
    return {
        "schema": EVENT,
        "kind": kind,
        "level": level,
        "message": message,
        "device_id": device_id,
        "details": details,
        "timestamp": round(time.time(), 3),
    }


def command_result(
    name: str, request_id: str | int | None, ok: bool, result: Any = None, error: str | None = None
) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "schema": COMMAND_RESULT,
        "command": name,
        "id": request_id,
        "ok": ok,
        "timestamp": round(time.time(), 3),
    }
    if ok:
        reply["result"] = result
    else:
        reply["error"] = error
    return reply


def encode(payload: dict[str, Any]) -> bytes:
    """Compact JSON, the wire format of every payload."""
    return json.dumps(payload, separators=(",", ":")).encode()
