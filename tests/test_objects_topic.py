"""Object events end to end: the agent tracks a real car-park clip with the real YOLOv8n and
publishes ``objects`` through the outbox to a real Mosquitto; a subscriber follows the scene."""

from __future__ import annotations

from collections import defaultdict

from tests.brokers import Subscriber
from tests.conftest import AgentProcess, agent_config
from tests.schemas import validate

PREFIX = "edge/dev1"


def test_a_subscriber_follows_a_real_scene_from_objects_alone(tmp_path, broker, fp32_model,
                                                              shared):  # fmt: skip
    clip = shared / "videos" / "person-bicycle-car-detection.mp4"
    sub = Subscriber(broker.port, ["edge/#"]).start()
    config = agent_config(
        tmp_path,
        fp32_model,
        {"uri": str(clip), "pace": "fast", "name": "carpark"},
        {"port": broker.port},
        tracking={"enabled": True},
        zones=[{"name": "right", "polygon": [[0.9, 0], [1, 0], [1, 1], [0.9, 1]]}],
        lines=[{"name": "middle", "points": [[0, 0.5], [1, 0.5]]}],
    )
    agent = AgentProcess(config)
    assert agent.wait(timeout=600) == 0, agent.log()
    sub.wait_topic(f"{PREFIX}/status", where=lambda m: m.json()["state"] == "stopped")
    sub.stop()
    objects = [m.json() for m in sub.messages if m.topic == f"{PREFIX}/objects"]
    detections = [m.json() for m in sub.messages if m.topic == f"{PREFIX}/detections"]
    for message in sub.messages:
        if message.topic.startswith(PREFIX) and "/cmd/" not in message.topic:
            validate(message.topic, message.json())

    lives: dict[int, list[str]] = defaultdict(list)
    for event in objects:
        assert event["camera"] == "carpark"
        lives[event["track_id"]].append(event["event"])
    assert len(lives) >= 5, lives  # persons, bicycles and cars come and go in 38 s
    for track_id, life in lives.items():  # each object: new, maybe updates, then one end
        assert life[0] == "new" and life[-1] == "end", (track_id, life)
        assert set(life[1:-1]) <= {"update"}, (track_id, life)
    tracked = {d["track_id"] for m in detections for d in m["detections"] if "track_id" in d}
    assert tracked and tracked <= set(lives)
    entered = [c for e in objects for c in e["changes"] if c == "entered:right"]
    crossed = [c for e in objects for c in e["changes"] if c.startswith("crossed:middle:")]
    assert entered  # people and bicycles leave by the right edge of the frame
    assert crossed  # a car drives from the bottom of the frame past its middle
    assert len(objects) * 5 < len(detections), (len(objects), len(detections))
    telemetry = [m.json() for m in sub.messages if m.topic == f"{PREFIX}/telemetry"]
    scenes = [t["cameras"]["carpark"]["scene"] for t in telemetry]
    assert scenes and scenes[-1]["camera"] == "carpark"
    assert "Traceback" not in agent.log()
