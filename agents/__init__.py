"""RL agents trained inside WorldFlow worlds (imported as worldflow.agents)."""

from .actor_critic import ActorCritic, AgentPolicy, AgentSpec, load_agent, save_agent
from .train import AgentConfig, train_agent

__all__ = ["ActorCritic", "AgentConfig", "AgentPolicy", "AgentSpec", "load_agent", "save_agent", "train_agent"]
