"""WorldFlow: a learned simulator built on autoregressive normalizing flows.

Importing the package registers the Gymnasium environment `WorldFlow-v0` (by entry-point
string: nothing heavy is imported until gym.make is called).
"""

import os as _os
import sys as _sys

import gymnasium as _gym

__version__ = "0.1.0"

# OpenMP's wait at a barrier, chosen for a machine other work shares. GNU OpenMP (under PyTorch's
# CPU wheels) spins 300,000 times at each barrier before it sleeps; when another busy process holds a
# core, a 2-thread dream step (hundreds of small parallel regions) spends its time slices spinning for
# the descheduled thread: batch-1 frames/s fell to 3-27% of unloaded with one busy process per core.
# 1,000 spins (libgomp's own count when threads outnumber cores) keep 49-63% under that load, cost
# nothing at batch 64 and up to a tenth at batch 1 unloaded (docs/throughput.md). The runtime reads
# this once, when torch loads it, so it takes effect only if worldflow is imported before torch (the
# `worldflow` command always is); a value already in the environment wins.
if "torch" not in _sys.modules:
    _os.environ.setdefault("GOMP_SPINCOUNT", "1000")

if "WorldFlow-v0" not in _gym.registry:
    _gym.register(
        id="WorldFlow-v0",
        entry_point="worldflow.envs.world_env:WorldFlowEnv",
        vector_entry_point="worldflow.envs.vector_env:WorldFlowVectorEnv",
        max_episode_steps=1000,  # Gymnasium's TimeLimit truncates (the env keeps no limit of its own)
    )
