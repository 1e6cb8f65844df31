"""The whole loop on a game that is not Atari: real ViZDoom Take Cover steps collected here ->
a tiny world -> WorldFlow-v0 -> an agent trained in the dream -> checked in the real game."""

import json
from pathlib import Path

import gymnasium as gym
import numpy as np

import worldflow  # noqa: F401  (registers WorldFlow-v0)
from worldflow.agents.evaluate import evaluate_agent, play_real, random_policy
from worldflow.cli import main

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")


def test_take_cover_collect_train_dream_and_agent(takecover_data, tmp_path, capsys):
    run, agent = tmp_path / "world", tmp_path / "agent"
    assert main(["train", "--config", TINY, "--data", str(takecover_data), "--out", str(run), "--device", "cpu"]) == 0
    env = gym.make("WorldFlow-v0", checkpoint=str(run), sample_termination=True, max_episode_steps=5)
    world = env.unwrapped
    assert world.model.config.env_id == "VizdoomTakeCover-v1" and world.event_names == ["HEALTH_drop"]
    assert world.get_action_meanings() == ["NOOP", "MOVE_RIGHT", "MOVE_LEFT"]
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and info["event_risk"].shape == (1,)
    steps = 0
    while True:
        obs, reward, terminated, truncated, info = env.step(2)
        steps += 1
        if terminated or truncated:
            break
    assert steps <= 5 and np.isfinite(info["event_risk"]).all()

    assert main(["agent", "train", "--checkpoint", str(run), "--steps", "32", "--envs", "2", "--horizon", "4",
                 "--event-cost", "1", "--sample-termination", "--out", str(agent), "--device", "cpu"]) == 0
    recorded = json.loads((agent / "agent.json").read_text())
    assert recorded["world"] == str(run) and recorded["config"]["event_cost"] == 1.0
    assert recorded["config"]["sample_termination"] is True
    result = evaluate_agent(agent, episodes=2, max_steps=40, progress=False, selection_episodes=1)
    assert result["env_id"] == "VizdoomTakeCover-v1"
    # the real game is made as the world's data was (the registered keywords, and any --env-arg)
    assert result["env_kwargs"] == world.model.config.env_kwargs == json.loads((agent / "latest" / "config.json").read_text())["env_kwargs"]
    assert 3 + 3 * 5 == len(result["periodic_selection"]["candidates"])  # 3 held actions, 3 pairs at 5 periods
    for name in ("agent", "random", "periodic"):  # +1 a tic alive, each capped at 40 tics
        assert result[name]["episodes"] == 2 and 0 < result[name]["mean"] <= 40
    assert list(result["agent"]["action_fractions"]) == ["NOOP", "MOVE_RIGHT", "MOVE_LEFT"]


def test_the_real_game_is_played_with_the_worlds_env_kwargs():
    returns = play_real(random_policy(3, 0), "VizdoomTakeCover-v1", episodes=1, seed=0, max_steps=10,
                        obs_key="screen", env_kwargs=dict(frame_skip=4))
    assert returns == [40.0]  # 10 steps of 4 tics, +1 a tic alive (no fireball lands in the first 40 tics)
    signs = play_real(random_policy(3, 0), "VizdoomTakeCover-v1", episodes=1, seed=0, max_steps=10,
                      obs_key="screen", env_kwargs=dict(frame_skip=4), reward_sign=True)
    assert signs == [10.0]  # the unit of a world's reward head: +1 a step
