"""Home Assistant MQTT discovery: a binary sensor per camera and watched class, an occupancy
sensor per zone, sensors for fps and inference.

Published retained on every (re)connect when ``mqtt.home_assistant.enabled``; availability
follows the agent's own retained ``status`` topic, so HA shows the device offline with its will.
"""

from __future__ import annotations

from typing import Any

from agent import __version__
from agent.config import AgentConfig


def seen_template(label: str) -> str:
    """A Jinja template that is ON when ``label`` is among a detections message's labels."""
    quoted = label.replace("'", "")
    match = f"selectattr('label', 'equalto', '{quoted}') | list | count > 0"
    return "{{ 'ON' if value_json.detections | " + match + " else 'OFF' }}"


def home_assistant_configs(config: AgentConfig, topics: Any) -> list[tuple[str, dict[str, Any]]]:
    """MQTT discovery: a binary sensor per watched class, sensors for fps and inference time."""
    ha = config.mqtt.home_assistant
    device_id = config.device_id
    device = {
        "identifiers": [f"edge-agent-{device_id}"],
        "name": f"edge-agent {device_id}",
        "sw_version": __version__,
        "manufacturer": "edge-agent",
    }
    availability = {
        "availability_topic": topics.status,
        "availability_template": "{{ 'online' if value_json.state == 'online' else 'offline' }}",
    }
    configs = []
    cameras = config.camera_list()
    for camera in cameras:
        # one camera keeps the ids it always had; several get theirs under the camera's name
        where = f"{camera.name}_" if config.cameras else ""
        seen_on = f" on {camera.name}" if config.cameras else ""
        for label in ha.classes:
            slug = where + "".join(c if c.isalnum() else "_" for c in label)
            configs.append(
                (
                    f"{ha.discovery_prefix}/binary_sensor/{device_id}/{slug}/config",
                    {
                        "name": f"{label} detected{seen_on}",
                        "unique_id": f"edge-agent-{device_id}-{slug}",
                        "state_topic": topics.of_camera(camera.name, "detections"),
                        "value_template": seen_template(label),
                        "off_delay": ha.off_delay_s,
                        "device_class": "occupancy",
                        "device": device,
                        **availability,
                    },
                )
            )
        for zone in camera.zones if camera.tracking.enabled else ():
            slug = f"{camera.name}_{zone.name}_occupancy"
            path = f"value_json.cameras['{camera.name}'].scene.occupancy['{zone.name}']"
            configs.append(
                (
                    f"{ha.discovery_prefix}/sensor/{device_id}/{slug}/config",
                    {
                        "name": f"objects in {zone.name}{seen_on}",
                        "unique_id": f"edge-agent-{device_id}-{slug}",
                        "state_topic": topics.telemetry,
                        "value_template": f"{{{{ {path}.values() | sum }}}}",
                        "state_class": "measurement",
                        "device": device,
                        **availability,
                    },
                )
            )
    for key, name, unit in (
        ("fps_out", "detection fps", "fps"),
        ("inference_ms", "inference time", "ms"),
    ):
        configs.append(
            (
                f"{ha.discovery_prefix}/sensor/{device_id}/{key}/config",
                {
                    "name": name,
                    "unique_id": f"edge-agent-{device_id}-{key}",
                    "state_topic": topics.telemetry,
                    "value_template": f"{{{{ value_json.{key} }}}}",
                    "unit_of_measurement": unit,
                    "state_class": "measurement",
                    "device": device,
                    **availability,
                },
            )
        )
    return configs
