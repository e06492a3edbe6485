"""Models over the air: the TUF channel client, slots on disk, self-test, swap, probation, rollback.

The wiring uses the names below; the channel formats, the fetcher and the store's records are the
machinery behind them. This wing imports ``agent.vision`` (it loads and tests models) and never
``agent.link``: it reports through the events object and callbacks the wiring hands it.
"""

from agent.updates.following import Following, followed_target, following
from agent.updates.kernel_check import cpu_session
from agent.updates.live_model import ManagerError, with_identity
from agent.updates.model_manager import ModelManager, file_request
from agent.updates.model_store import ModelStore
from agent.updates.ota import ChannelClient, OtaError
from agent.updates.selftest import run_self_test

__all__ = [
    "ChannelClient",
    "Following",
    "ManagerError",
    "ModelManager",
    "ModelStore",
    "OtaError",
    "cpu_session",
    "file_request",
    "followed_target",
    "following",
    "run_self_test",
    "with_identity",
]
