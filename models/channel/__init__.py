"""The factory's channel wing: signing keys, publishing releases, rollout (tuf.api).

A channel is a static folder of TUF metadata and targets that devices follow; everything that
writes it is here. The online keys sign; the root key is needed only to create the channel.
"""

from models.channel.keys import init_keys
from models.channel.publish import (
    Publication,
    create,
    inspect_onnx,
    open_repository,
    publish,
    refresh,
    set_rollout,
    withdraw,
)

__all__ = [
    "Publication",
    "create",
    "init_keys",
    "inspect_onnx",
    "open_repository",
    "publish",
    "refresh",
    "set_rollout",
    "withdraw",
]
