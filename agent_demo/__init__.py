"""The showcase, outside the daemon: ``edge-agent demo`` tells the whole story with real parts.

``run(StoryOptions(...))`` starts a broker, a signed channel and the agent, then ships an INT8
model over the air through the factory's API and prints before/after figures read from the MQTT
topics. ``agent_demo.services`` holds the local services it starts (the tests use them too).
"""

from agent_demo.story import StoryError, StoryOptions, run

__all__ = ["StoryError", "StoryOptions", "run"]
