"""WorldFlow: a learned simulator built on autoregressive normalizing flows.

Importing the package registers the Gymnasium environment `WorldFlow-v0` (by entry-point
string: nothing heavy is imported until gym.make is called).
"""

import gymnasium as _gym

__version__ = "0.1.0"

if "WorldFlow-v0" not in _gym.registry:
    _gym.register(
        id="WorldFlow-v0",
        entry_point="worldflow.envs.world_env:WorldFlowEnv",
        vector_entry_point="worldflow.envs.vector_env:WorldFlowVectorEnv",
        max_episode_steps=1000,  # Gymnasium's TimeLimit truncates (the env keeps no limit of its own)
    )
