"""What the agent says and hears over MQTT: the session, commands, events, telemetry, payloads.

The wiring uses the names below; paho, the outbox's sqlite and the topic layout stay inside.
This wing imports ``agent.vision`` (it reports on the loop) and never ``agent.updates``: the
model commands reach the model manager through the ``ModelControl`` interface the wiring fills.
"""

from agent.link.commands import CommandError, CommandRouter
from agent.link.events import CounterWatch, Events, Watched
from agent.link.fleet_view import DeviceView, FleetView
from agent.link.handlers import CommandHandlers, ModelControl
from agent.link.housekeeping import Housekeeper
from agent.link.messages import announce_spread, encode, model_ref, model_state, status
from agent.link.mqtt import describe_reason, new_client
from agent.link.outbox import Outbox
from agent.link.probes import SystemProbes
from agent.link.session import Link, MqttSink
from agent.link.telemetry import Telemetry
from agent.link.watcher import Watcher, WatchError, add_broker_arguments, broker_config, settle

__all__ = [
    "CommandError",
    "CommandHandlers",
    "CommandRouter",
    "CounterWatch",
    "DeviceView",
    "Events",
    "FleetView",
    "Housekeeper",
    "Link",
    "ModelControl",
    "MqttSink",
    "Outbox",
    "SystemProbes",
    "Telemetry",
    "WatchError",
    "Watched",
    "Watcher",
    "add_broker_arguments",
    "announce_spread",
    "broker_config",
    "describe_reason",
    "encode",
    "model_ref",
    "model_state",
    "new_client",
    "settle",
    "status",
]
