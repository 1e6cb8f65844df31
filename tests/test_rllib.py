"""Compatibility with an RL library nobody here wrote: RLlib's PPO trains on WorldFlow-v0 via register_env."""

import numpy as np
import pytest
from gymnasium.wrappers import DtypeObservation, RescaleObservation, TimeLimit

from worldflow.envs import WorldFlowEnv


def test_rllib_ppo_trains_one_iteration_on_worldflow(endless_world, ray_local):
    pytest.importorskip("ray.rllib")
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    from ray.tune.registry import register_env

    # RLlib's default CNN expects float observations: Gymnasium's own wrappers scale the uint8 frames to
    # [0, 1]; Gymnasium's TimeLimit truncates, as gym.make would
    register_env("WorldFlow-float", lambda cfg: RescaleObservation(
        DtypeObservation(TimeLimit(WorldFlowEnv(**cfg), max_episode_steps=8), np.float32), 0.0, 1.0))
    config = (PPOConfig()
              .environment("WorldFlow-float", env_config=dict(checkpoint=str(endless_world)))
              .env_runners(num_env_runners=0, rollout_fragment_length=16)
              .training(train_batch_size_per_learner=32, minibatch_size=16, num_epochs=1)
              .rl_module(model_config=DefaultModelConfig(conv_filters=[[16, [8, 8], 4], [32, [4, 4], 2],
                                                                       [64, [4, 4], 2]])))
    algo = config.build_algo()
    try:
        result = algo.train()
    finally:
        algo.stop()
    assert result["num_env_steps_sampled_lifetime"] >= 32
    assert np.isfinite(result["learners"]["default_policy"]["total_loss"])
