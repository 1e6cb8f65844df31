"""Gymnasium environments served by a learned world model."""

from .vector_env import WorldFlowVectorEnv
from .world_env import WorldFlowEnv

__all__ = ["WorldFlowEnv", "WorldFlowVectorEnv"]
