"""The model factory's user errors share the agent's base, so both CLIs report them the same way."""

from agent.contract import AgentError, ModelError


class FactoryError(AgentError):
    """Bad input to a model-factory command (calibration set, dataset, output path...)."""


__all__ = ["FactoryError", "ModelError"]
