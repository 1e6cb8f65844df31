"""Agents: λ-returns, training in the dream with 0 and 2 Ray workers, a killed worker replaced,
checkpoints round trip and resume, evaluation in the real game."""

import csv
import json

import numpy as np
import pytest
import torch

from worldflow.agents import ActorCritic, AgentConfig, AgentPolicy, AgentSpec, load_agent, save_agent, train_agent
from worldflow.agents.actor_critic import lambda_returns
from worldflow.agents.evaluate import PeriodicPolicy, evaluate_agent
from worldflow.agents.rollouts import RolloutPool
from worldflow.agents.scripted import FIRE, LEFT, NOOP, RIGHT, BreakoutTracker, falling_landing, landing_column
from worldflow.cli import main
from worldflow.collect import shard_paths


def _rows(run):
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_lambda_returns_stop_at_termination_and_bootstrap_at_truncation():
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[10.0], [20.0], [30.0], [40.0]])
    never = torch.zeros(3, 1, dtype=torch.bool)
    g, lam = 0.5, 1.0  # λ=1: discounted Monte-Carlo return bootstrapped at the end
    assert torch.allclose(lambda_returns(rewards, values, never, never, g, lam)[:, 0],
                          torch.tensor([1 + g * 2 + g * g * 3 + g**3 * 40, 2 + g * 3 + g * g * 40, 3 + g * 40]))
    terminated = torch.tensor([[False], [True], [False]])
    out = lambda_returns(rewards, values, terminated, never, g, lam)[:, 0]
    assert out[1] == 2.0 and out[0] == 1 + g * 2  # nothing flows back across a termination
    truncated = torch.tensor([[False], [True], [False]])
    out = lambda_returns(rewards, values, never, truncated, g, lam)[:, 0]
    assert out[1] == 2 + g * 30  # truncation bootstraps from the final observation's value
    lam0 = lambda_returns(rewards, values, never, never, g, 0.0)[:, 0]  # λ=0: one-step TD targets
    assert torch.allclose(lam0, rewards[:, 0] + g * values[1:, 0])


def test_event_shaping_telescopes_and_punishes_rising_risk():
    from worldflow.agents.train import shaped_rewards

    risk = torch.tensor([[0.1], [0.2], [0.9], [0.4]])  # (T+1, N)
    rewards, never, g = torch.tensor([[0.0], [1.0], [0.0]]), torch.zeros(3, 1, dtype=torch.bool), 0.9
    shaped = shaped_rewards(rewards, risk, never, g, penalty=2.0)
    assert shaped[1, 0] < rewards[1, 0] and shaped[2, 0] > 0  # risk rising costs, falling pays
    discounts = g ** torch.arange(3.0)[:, None]
    # Σ γ^t F_t = γ^T Φ(s_T) - Φ(s_0), Φ = -2·risk: the shaping adds no return of its own
    assert torch.allclose(((shaped - rewards) * discounts).sum(), -2.0 * (g**3 * risk[3] - risk[0]))
    ended = torch.tensor([[False], [False], [True]])
    assert torch.allclose(shaped_rewards(rewards, risk, ended, g, 2.0)[2], 2.0 * risk[2])  # terminal Φ = 0
    assert torch.equal(shaped_rewards(rewards, risk, never, g, 0.0), rewards)


def test_event_cost_charges_every_state_reached():
    from worldflow.agents.train import shaped_rewards

    risk = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1]])  # two dreams from one state: one stays at risk
    rewards, never = torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool)
    costed = shaped_rewards(rewards, risk, never, 0.9, penalty=0.0, cost=3.0)
    assert torch.allclose(costed, -3.0 * risk[1:])
    # unlike the potential, the cost does not telescope away: the dream kept at risk returns less
    assert costed[:, 0].sum() < costed[:, 1].sum()


def test_agent_trains_in_process_checkpoints_round_trip_and_resume(endless_world, tmp_path, capsys):
    out = tmp_path / "agent"
    assert main(["agent", "train", "--checkpoint", str(endless_world), "--workers", "0", "--steps", "64",
                 "--envs", "2", "--horizon", "5", "--entropy", "0.01", "--out", str(out)]) == 0
    assert json.loads((out / "agent.json").read_text())["config"]["entropy"] == 0.01
    rows = _rows(out)
    assert [r["update"] for r in rows] == ["1", "2"] and all(r["workers_heard"] == "0" for r in rows)
    assert int(rows[-1]["episodes"]) > 0  # horizon-5 episodes ended and were counted
    net = load_agent(out)
    assert net.spec.env_id == "ALE/Breakout-v5" and net.spec.num_actions == 4
    assert not torch.equal(net.policy.weight, torch.zeros_like(net.policy.weight))  # it learned something
    save_agent(net, tmp_path / "copy")
    again = load_agent(tmp_path / "copy")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    # more steps: the run resumes at update 2 and logs updates 3 and 4 once each
    assert main(["agent", "train", "--checkpoint", str(endless_world), "--workers", "0", "--steps", "128",
                 "--envs", "2", "--horizon", "5", "--out", str(out)]) == 2  # another entropy bonus: refused
    assert "entropy: 0.01 -> 0.001" in capsys.readouterr().err
    assert main(["agent", "train", "--checkpoint", str(endless_world), "--workers", "0", "--steps", "128",
                 "--envs", "2", "--horizon", "5", "--entropy", "0.01", "--out", str(out)]) == 0
    assert [r["update"] for r in _rows(out)] == ["1", "2", "3", "4"]
    assert json.loads((out / "latest" / "trainer.json").read_text())["update"] == 4
    assert main(["agent", "train", "--steps", "64", "--entropy", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert main(["agent", "train", "--steps", "64", "--lr", "0", "--out", str(tmp_path / "bad")]) == 2
    with pytest.raises(ValueError, match="sampler"):
        AgentConfig(sampler="newton")
    pool = RolloutPool(AgentSpec(num_actions=4), endless_world, workers=0, num_envs=2, horizon=5, seed=0,
                       sampler="sequential")
    assert pool.workers[0].env.sampler == "sequential"  # the dreams invert the flow as the config says
    pool.close()
    assert not (tmp_path / "bad").exists()


def test_two_ray_workers_feed_the_learner_and_a_killed_worker_is_replaced(endless_world, tmp_path, ray_local):
    cfg = AgentConfig(steps=2 * 2 * 4, envs_per_worker=2, rollout_steps=4, horizon=5, checkpoint_every=1,
                      sampler="sequential")
    train_agent(cfg, tmp_path / "agent", endless_world, workers=2, progress=False)
    assert _rows(tmp_path / "agent")[0]["workers_heard"] == "0 1"

    spec = AgentSpec(num_actions=4)
    net = ActorCritic(spec)
    pool = RolloutPool(spec, endless_world, workers=2, num_envs=2, horizon=5, seed=0)
    try:
        first = pool.collect(net, 3)
        assert sorted(t["worker_id"] for t in first) == [0, 1]
        assert first[0]["stacks"].shape == (4, 2, 4, 64, 64, 3) and first[0]["actions"].shape == (3, 2)
        ray_local.kill(pool.workers[0])
        survivors = pool.collect(net, 3)
        assert [t["worker_id"] for t in survivors] == [1] and pool.replaced == 1
        assert sorted(t["worker_id"] for t in pool.collect(net, 3)) == [0, 1]  # the replacement works
    finally:
        pool.close()


def test_agent_eval_plays_the_real_game_beside_random_and_the_best_periodic_policy(tmp_path, capsys):
    net = ActorCritic(AgentSpec(num_actions=4, env_id="ALE/Breakout-v5"))
    save_agent(net, tmp_path / "a")
    result = evaluate_agent(tmp_path / "a", episodes=2, max_steps=60, progress=False, selection_episodes=1)
    candidates = result["periodic_selection"]["candidates"]
    assert len(candidates) == 4 + 6 * 5  # each constant action, each pair of actions at 5 periods
    best = max(candidates, key=lambda c: c["mean"])  # chosen on the selection seeds, not the evaluation's
    chosen = PeriodicPolicy(tuple(best["actions"]), best["period"]).name(["NOOP", "FIRE", "RIGHT", "LEFT"])
    assert result["periodic_selection"]["chosen"] == chosen
    for name in ("agent", "random", "periodic"):
        assert result[name]["episodes"] == 2 and np.isfinite(result[name]["mean"])
        fractions = result[name]["action_fractions"]
        assert list(fractions) == ["NOOP", "FIRE", "RIGHT", "LEFT"] and sum(fractions.values()) == pytest.approx(1)
    assert main(["agent", "eval", "--agent", str(tmp_path / "a"), "--episodes", "2", "--max-steps", "30",
                 "--selection-episodes", "0", "--json", str(tmp_path / "eval.json")]) == 0
    assert "random in ALE/Breakout-v5" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["agent"]["episodes"] == 2
    assert main(["agent", "eval", "--agent", str(tmp_path / "a"), "--env", "ALE/Pong-v5", "--episodes", "1"]) == 2
    policy = AgentPolicy(tmp_path / "a", seed=0)
    assert 0 <= policy(np.zeros((64, 64, 3), np.uint8)) < 4


def test_latent_agent_trains_on_the_dreams_state_and_reads_real_frames_through_its_world(endless_world, tmp_path):
    out = tmp_path / "latent"
    assert main(["agent", "train", "--checkpoint", str(endless_world), "--steps", "32", "--envs", "2",
                 "--horizon", "5", "--observation", "latent", "--out", str(out)]) == 0
    net = load_agent(out)
    assert net.spec.observation == "latent" and net.spec.world == str(endless_world)
    policy = AgentPolicy(out, seed=0)
    assert net.spec.feature_size == policy.observer.feature_size > 0
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)  # real-game-sized frames
    assert all(0 <= policy(f) < 4 for f in frames)
    # what the agent saw last: the world's state after observing the three frames and the agent's own actions
    observer = policy.observer
    assert np.array_equal(policy.stack.frames[0, -1], observer.model.features(observer.state)[0].numpy())
    assert torch.equal(observer.state.last_clean, observer.model.frames_to_latents(torch.from_numpy(frames[-1:])[:, None])[:, 0])
    spec = net.spec
    spec.feature_size += 1
    save_agent(ActorCritic(spec), tmp_path / "mismatch")
    with pytest.raises(ValueError, match="features"):
        AgentPolicy(tmp_path / "mismatch")
    with pytest.raises(ValueError, match="observation"):
        AgentConfig(observation="pixels")


def test_dreams_start_from_real_clips_of_the_given_datasets(endless_world, breakout_data, takecover_data, tmp_path):
    from safetensors.torch import load_file

    from worldflow.data import ClipDataset
    from worldflow.pretrained import load_world

    out = tmp_path / "starts"
    assert main(["agent", "train", "--checkpoint", str(endless_world), "--steps", "16", "--envs", "2",
                 "--horizon", "5", "--starts", str(breakout_data), "--start-count", "6", "--out", str(out)]) == 0
    drawn = load_file(out / "start_contexts.safetensors")
    K = load_world(endless_world)[0].config.context_frames
    assert drawn["frames"].shape[:2] == (6, K) and drawn["actions"].shape == (6, K - 1)
    clips = ClipDataset(breakout_data, K, "train")  # every drawn clip is a real clip of a training episode
    real = {clips[i]["frames"].numpy().tobytes() for i in range(len(clips))}
    assert all(f.numpy().tobytes() in real for f in drawn["frames"])
    assert len({f.numpy().tobytes() for f in drawn["frames"]}) == 6  # spread, not one clip repeated
    pool = RolloutPool(AgentSpec(num_actions=4), endless_world, workers=0, num_envs=2, horizon=5, seed=0,
                       start_contexts=str(out / "start_contexts.safetensors"))
    assert torch.equal(pool.workers[0].env.start_frames, drawn["frames"])  # the dreams start from them
    pool.close()
    assert json.loads((out / "agent.json").read_text())["config"]["starts"] == [str(breakout_data)]
    # another game's data is refused by name before anything trains
    assert main(["agent", "train", "--checkpoint", str(endless_world), "--steps", "16", "--envs", "2",
                 "--starts", str(takecover_data), "--out", str(tmp_path / "doom")]) == 2
    assert not (tmp_path / "doom").exists()
    with pytest.raises(ValueError, match="start_count"):
        AgentConfig(start_count=0)


def test_missing_or_corrupt_agents_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_agent(tmp_path)
    save_agent(ActorCritic(AgentSpec(num_actions=4)), tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="corrupt"):
        load_agent(tmp_path / "a")


def test_collect_with_a_saved_agent_as_behaviour_policy(tmp_path, capsys):
    net = ActorCritic(AgentSpec(num_actions=4, env_id="ALE/Breakout-v5"))
    with torch.no_grad():
        net.policy.bias.copy_(torch.tensor([0.0, 0.0, 20.0, 0.0]))  # always RIGHT
    save_agent(net, tmp_path / "right")
    out = tmp_path / "d"
    assert main(["collect", "--env", "ALE/Breakout-v5", "--steps", "40", "--out", str(out),
                 "--policy", str(tmp_path / "right")]) == 0
    actions = np.concatenate([np.load(p)["actions"] for p in shard_paths(out)])
    assert len(actions) == 40 and (actions == 2).all()
    assert json.loads((out / "manifest.json").read_text())["policy"] == str((tmp_path / "right").resolve())
    # resuming into it with another behaviour policy would mix two datasets: refused
    assert main(["collect", "--env", "ALE/Breakout-v5", "--steps", "80", "--out", str(out)]) == 2
    assert "policy" in capsys.readouterr().err


def test_tracker_moves_the_paddle_under_the_falling_ball():
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[57, 40:47] = 200  # paddle centred on column 43
    tracker = BreakoutTracker(seed=0, epsilon=0.0)
    assert tracker(frame) == FIRE  # no ball in the field: serve
    frame[35, 20] = 200
    assert tracker(frame) == LEFT  # first sight: no velocity yet, so it heads for the ball's column
    frame[35, 20], frame[40, 25] = 0, 200  # falling 5 rows and drifting 5 columns a step: lands at 42
    assert tracker(frame) == NOOP
    assert landing_column(np.array([40.0, 50.0]), np.array([4.0, 4.0])) == pytest.approx(51.0)  # off the right wall
    assert falling_landing(np.array([35.0, 20.0]), np.array([40.0, 25.0])) == pytest.approx(42.0)
    assert falling_landing(np.array([40.0, 25.0]), np.array([35.0, 30.0])) is None  # rising
    assert falling_landing(None, np.array([40.0, 25.0])) is None  # first sight


def test_offset_tracker_aims_one_drawn_offset_off_each_fall(tmp_path):
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[57, 40:47] = 200  # paddle centred on column 43
    offsets = []
    for seed in range(16):
        tracker = BreakoutTracker(seed=seed, epsilon=0.0, aim_spread=8.0)
        path = [(35, 20), (40, 25), (45, 30), (40, 35)]  # falls (landing at 42), falls, then flies up
        actions, drawn = [], []
        for ball in path:
            f = frame.copy()
            f[ball] = 200
            actions.append(tracker(f))
            drawn.append(tracker.aim_offset)
        offset = drawn[1]
        assert -8 <= offset <= 8 and drawn[2] == offset  # drawn when the fall is first seen, kept through it
        assert drawn[0] is None and drawn[3] is None  # no fall seen yet; flying up
        target = 42 + offset
        assert actions[1] == (RIGHT if target > 44.5 else LEFT if target < 41.5 else NOOP)
        offsets.append(offset)
    assert min(offsets) < -3 and max(offsets) > 3  # it misses to either side
    out = tmp_path / "d"
    assert main(["collect", "--env", "ALE/Breakout-v5", "--steps", "40", "--out", str(out),
                 "--policy", "tracker-offset"]) == 0
    assert json.loads((out / "manifest.json").read_text())["policy"] == "tracker-offset"


def test_tracker_data_holds_more_rewards_than_random_data(breakout_data, tracker_data, tmp_path, capsys):
    def reward_rate(root):
        rewards = np.concatenate([np.load(p)["rewards"] for p in shard_paths(root)])
        return (rewards > 0).mean()

    assert json.loads((tracker_data / "manifest.json").read_text())["policy"] == "tracker"
    # the same game, the same seeds: only the behaviour policy differs
    assert reward_rate(tracker_data) > 2 * reward_rate(breakout_data) > 0
    assert main(["collect", "--env", "ALE/Pong-v5", "--steps", "10", "--out", str(tmp_path / "p"), "--policy", "tracker"]) == 2
    assert "Breakout only" in capsys.readouterr().err


def test_periodic_policy_holds_each_action_for_its_period():
    policy = PeriodicPolicy((1, 2), 3)
    assert [policy(None) for _ in range(8)] == [1, 1, 1, 2, 2, 2, 1, 1]
    policy.reset()
    assert policy(None) == 1 and policy.name(["NOOP", "MOVE_RIGHT", "MOVE_LEFT"]) == "MOVE_RIGHT/MOVE_LEFT every 3"
