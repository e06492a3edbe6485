"""Errors a user can act on.

Everything the CLI reports without a traceback derives from ``AgentError``; anything else is a bug
and keeps its traceback.
"""


class AgentError(Exception):
    """A problem with the user's input or environment, with a message that names it."""


class ConfigError(AgentError):
    """The configuration file, environment overrides or CLI arguments are invalid."""


class ModelError(AgentError):
    """A model file is missing, unreadable, or not a YOLOv8 detector."""


class ImageError(AgentError):
    """An image cannot be read or decoded."""


class SourceError(AgentError):
    """A frame source cannot be opened or has failed for good."""


class BackendUnavailable(AgentError):
    """The requested inference backend is not installed or not usable on this machine."""
