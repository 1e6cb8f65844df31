"""WorldFlow-v0: Gymnasium's checker, determinism, the native vector env, constant memory, bad input."""

import shutil

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import worldflow  # noqa: F401  (registers WorldFlow-v0)
from worldflow.envs import WorldFlowEnv, WorldFlowVectorEnv


@pytest.fixture(scope="module")
def world(tiny_run):
    return tiny_run[1]


def test_gymnasium_env_checker_passes(world):
    env = gym.make("WorldFlow-v0", checkpoint=str(world))
    check_env(env.unwrapped)
    assert env.observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert env.action_space == gym.spaces.Discrete(4) and env.metadata["render_fps"] > 0


def test_same_seed_and_actions_give_identical_frames(world):
    runs = []
    for _ in range(2):
        env = gym.make("WorldFlow-v0", checkpoint=str(world), render_mode="rgb_array")
        obs, _ = env.reset(seed=42)
        frames = [obs] + [env.step(a)[0] for a in (1, 2, 3, 0, 2)]
        assert np.array_equal(env.render(), frames[-1])
        runs.append(frames)
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    assert not np.array_equal(runs[0][1], runs[0][2])  # frames change between steps
    other = gym.make("WorldFlow-v0", checkpoint=str(world))
    other.reset(seed=43)
    assert not np.array_equal(other.step(1)[0], runs[0][1])


def test_step_info_reports_surprise_jacobi_iterations_and_event_risk(world):
    env = gym.make("WorldFlow-v0", checkpoint=str(world), sampler="sequential", denoiser="tweedie")
    assert env.unwrapped.event_names == ["life_lost"]
    assert env.unwrapped.get_action_meanings() == ["NOOP", "FIRE", "RIGHT", "LEFT"]
    _, info = env.reset(seed=0)
    assert info["event_risk"].shape == (1,) and 0.0 < info["event_risk"][0] < 1.0  # the head on the last real frame
    _, reward, terminated, truncated, info = env.step(1)
    assert reward in (-1.0, 0.0, 1.0) and isinstance(terminated, bool) and not truncated
    assert np.isfinite(info["bits_per_dim"]) and info["jacobi_iterations"] >= 1
    assert 0.0 < info["event_risk"][0] < 1.0


def test_gymnasiums_time_limit_owns_truncation(endless_world):
    env = gym.make("WorldFlow-v0", checkpoint=str(endless_world))
    assert env.spec.max_episode_steps == 1000  # the registered default, applied by TimeLimit
    env = gym.make("WorldFlow-v0", checkpoint=str(endless_world), max_episode_steps=3)
    env.reset(seed=0)
    assert [env.step(0)[3] for _ in range(3)] == [False, False, True]
    raw = WorldFlowEnv(checkpoint=str(endless_world))  # the env itself keeps no second limit
    raw.reset(seed=0)
    assert not any(raw.step(0)[3] for _ in range(5))


def test_sampled_termination_ends_episodes_with_the_heads_probability(world):
    env = WorldFlowEnv(checkpoint=str(world), sample_termination=True)
    with torch.no_grad():
        env.model.heads.out[-1].bias[3] = 0.0
        env.model.heads.out[-1].weight[3] = 0.0  # p = 0.5 exactly, whatever the frame
    env.reset(seed=0)
    ends = [env.step(0)[2] for _ in range(200)]
    assert 60 < sum(ends) < 140  # Binomial(200, 0.5): far from "never" (the threshold's answer at 0.5)
    env.reset(seed=0)
    assert [env.step(0)[2] for _ in range(200)] == ends  # drawn from the seeded stream


def test_reset_from_given_real_frames(world):
    env = gym.make("WorldFlow-v0", checkpoint=str(world))
    frames = env.unwrapped.start_frames[3, :3].numpy()
    obs, _ = env.reset(seed=0, options={"frames": frames, "actions": np.array([1, 2])})
    assert np.array_equal(obs, frames[-1])
    with pytest.raises(ValueError, match="options\\['actions'\\] must lie in"):
        env.reset(options={"frames": frames, "actions": np.array([1, 9])})
    with pytest.raises(ValueError, match=r"the 2 integer actions taken between the 3 given frames.*shape \(7,\)"):
        env.reset(options={"frames": frames, "actions": np.zeros(7, np.int64)})
    with pytest.raises(ValueError, match=r"uint8 of shape \(K, 64, 64, 3\).*got uint8 of shape \(10, 10, 3\)"):
        env.reset(options={"frames": np.zeros((10, 10, 3), np.uint8)})  # the user's shape, not an internal one
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"frame": frames})


def test_resets_start_from_a_given_start_contexts_file(world, tmp_path):
    from safetensors.torch import save_file

    shipped = WorldFlowEnv(checkpoint=str(world)).start_frames
    frames = (255 - shipped[:2]).contiguous()  # clips the world does not ship: inverted frames
    save_file({"frames": frames, "actions": torch.zeros(2, frames.shape[1] - 1, dtype=torch.int64)}, tmp_path / "c.safetensors")
    for make in (WorldFlowEnv, WorldFlowVectorEnv):
        env = make(checkpoint=str(world), start_contexts=str(tmp_path / "c.safetensors"))
        assert torch.equal(env.start_frames, frames)
        obs, _ = env.reset(seed=0)
        first = obs if obs.ndim == 3 else obs[0]
        assert any(np.array_equal(first, f[-1].numpy()) for f in frames)
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        WorldFlowEnv(checkpoint=str(world), start_contexts=str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="bad.safetensors is corrupt"):
        WorldFlowVectorEnv(checkpoint=str(world), start_contexts=str(tmp_path / "bad.safetensors"))
    save_file({"frames": frames[:, :, :32].contiguous(), "actions": torch.zeros(2, frames.shape[1] - 1, dtype=torch.int64)},
              tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="start context frames"):
        WorldFlowEnv(checkpoint=str(world), start_contexts=str(tmp_path / "small.safetensors"))


def test_vector_env_is_native_and_matches_single_envs_frame_for_frame(endless_world):
    vec = gym.make_vec("WorldFlow-v0", num_envs=3, checkpoint=str(endless_world), max_episode_steps=3)
    assert isinstance(vec, WorldFlowVectorEnv) and vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP
    singles = [gym.make("WorldFlow-v0", checkpoint=str(endless_world), max_episode_steps=3) for _ in range(3)]
    obs, infos = vec.reset(seed=10)
    ref = [env.reset(seed=10 + i) for i, env in enumerate(singles)]
    assert all(np.array_equal(obs[i], ref[i][0]) for i in range(3))
    assert np.allclose(infos["event_risk"], [info["event_risk"] for _, info in ref], atol=1e-5)
    done, resets = np.zeros(3, bool), 0
    for t in range(8):
        actions = np.array([(t + i) % 4 for i in range(3)])
        obs, rewards, terminated, truncated, infos = vec.step(actions)
        for i, env in enumerate(singles):
            if done[i]:  # NEXT_STEP autoreset: this step returned the new episode's first frame
                (expected, info), r, resets = env.reset(), 0.0, resets + 1
            else:
                expected, r, term, trunc, info = env.step(int(actions[i]))
                assert (term, trunc) == (terminated[i], truncated[i])
            assert np.abs(obs[i].astype(int) - expected.astype(int)).max() <= 1  # batched float rounding
            assert rewards[i] == r
            assert np.abs(infos["event_risk"][i] - info["event_risk"]).max() < 1e-4  # a reset row: its new start's
        done = terminated | truncated
    assert resets == 6  # every sub-env truncated at step 3 and step 6 and was reset the step after


def test_invalid_actions_raise_clear_errors(world):
    env = gym.make("WorldFlow-v0", checkpoint=str(world))
    env.reset(seed=0)
    for bad, match in ((4, "out of range"), (-1, "out of range"), (1.0, "integer"), ("1", "integer"),
                       (True, "integer"), (np.array([1, 2]), "integer")):
        with pytest.raises(ValueError, match=match):
            env.step(bad)
    vec = WorldFlowVectorEnv(num_envs=2, checkpoint=str(world))
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        vec.step(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="out of range"):
        vec.step(np.array([1, 7]))


def test_missing_or_corrupt_checkpoints_raise_clear_errors(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gym.make("WorldFlow-v0", checkpoint=str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    shutil.copytree(world / "latest", bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        gym.make("WorldFlow-v0", checkpoint=str(bad))
    with pytest.raises(ValueError, match="sampler"):
        gym.make("WorldFlow-v0", checkpoint=str(world), sampler="euler")
    for make in (WorldFlowEnv, WorldFlowVectorEnv):  # both envs check their options the same way
        with pytest.raises(ValueError, match="context_frames"):
            make(checkpoint=str(world), context_frames=99)
        with pytest.raises(ValueError, match="device"):
            make(checkpoint=str(world), device="tpu")
    with pytest.raises(ValueError, match="max_episode_steps"):
        WorldFlowVectorEnv(checkpoint=str(world), max_episode_steps=0)


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4  # resident pages of 4 KiB


def test_ten_thousand_steps_run_in_constant_memory(endless_world):
    env = WorldFlowEnv(checkpoint=str(endless_world))
    env.reset(seed=0)
    cache_len = None
    for t in range(1, 10_001):
        env.step(t % 4)
        if t == 1_000:
            rss_1k, cache_len = _rss_kb(), env._state.cache.length
    rss_10k = _rss_kb()
    assert env._state.cache.length == cache_len
    assert rss_10k - rss_1k < 20 * 1024, (rss_1k, rss_10k)  # under 20 MB of growth over 9,000 steps


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_dream_writes_a_readable_video_with_every_frame(world, tmp_path, suffix):
    from moviepy import VideoFileClip

    from worldflow.cli import main

    out = tmp_path / f"clip{suffix}"
    assert main(["dream", str(world), "--steps", "14", "--out", str(out), "--seed", "1"]) == 0
    clip = VideoFileClip(str(out))
    n = sum(1 for _ in clip.iter_frames())
    clip.close()
    assert n == 15 and not list(tmp_path.glob(".*tmp*"))  # 1 start frame + 14 dreamed


def test_guided_vector_env_matches_guided_single_env(endless_world):
    vec = WorldFlowVectorEnv(num_envs=2, checkpoint=str(endless_world), guidance=1.5, max_episode_steps=2)
    single = gym.make("WorldFlow-v0", checkpoint=str(endless_world), guidance=1.5, max_episode_steps=2)
    vec.reset(seed=7)
    single.reset(seed=8)  # sub-env 1
    for t, expected_reset in enumerate([False, False, True, False]):
        obs = vec.step(np.array([2, 2]))[0]
        ref = single.reset()[0] if expected_reset else single.step(2)[0]
        assert np.abs(obs[1].astype(int) - ref.astype(int)).max() <= 1, t
    assert vec._state.cache.batch_size == 4  # [cond; null] rows for 2 envs


def test_latent_observations_are_the_worlds_own_state_in_both_envs(endless_world):
    env = gym.make("WorldFlow-v0", checkpoint=str(endless_world), observation="latent", render_mode="rgb_array")
    model = env.unwrapped.model
    check_env(env.unwrapped)
    assert env.observation_space == gym.spaces.Box(-np.inf, np.inf, (model.feature_size,), np.float32)
    obs, _ = env.reset(seed=3)
    obs, *_ = env.step(1)
    state = env.unwrapped._state
    assert np.array_equal(obs, model.features(state)[0].numpy())
    assert np.array_equal(obs[model.config.width:], state.last_clean[0].flatten().numpy())  # z after h
    assert env.render().shape == (64, 64, 3)  # the frame is still what one watches
    vec = WorldFlowVectorEnv(num_envs=2, checkpoint=str(endless_world), observation="latent", max_episode_steps=2)
    obs, _ = vec.reset(seed=3)
    assert obs.shape == (2, model.feature_size) and obs.dtype == np.float32
    single = gym.make("WorldFlow-v0", checkpoint=str(endless_world), observation="latent")
    ref = single.reset(seed=3)[0]
    assert np.abs(obs[0] - ref).max() < 1e-4
    for expected_reset in (False, False, True):  # a row reset by autoreset shows its new start's state
        obs = vec.step(np.array([1, 2]))[0]
        ref = single.reset()[0] if expected_reset else single.step(1)[0]
        assert np.abs(obs[0] - ref).max() < 1e-3
    with pytest.raises(ValueError, match="observation must be one of"):
        WorldFlowEnv(checkpoint=str(endless_world), observation="pixels")


def test_observe_advances_a_state_with_real_frames(endless_world):
    from worldflow.pretrained import load_world

    model, frames, actions = load_world(endless_world)
    state = model.start(frames[:2], actions[:2])
    length = state.cache.length
    real = frames[:2, -1].flip(1)  # any real-looking frames (2, S, S, 3): mirrored
    model.observe(state, real, torch.tensor([1, 2]))
    assert state.cache.length == length  # the window slid: constant memory, as a dream's step
    assert torch.equal(state.last_clean, model.frames_to_latents(real[:, None])[:, 0])  # what it saw, not a dream
    twin = model.start(frames[:2], actions[:2])
    model.observe(twin, real, torch.tensor([2, 1]))  # the same frames after other actions
    assert not torch.allclose(state.hidden, twin.hidden)  # the state remembers what was done
    assert model.sample_next(state, torch.tensor([0, 0])).frames.shape == (2, 64, 64, 3)  # a dream goes on from it
    with pytest.raises(ValueError, match="shape"):
        model.observe(state, real[:, :32], torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="action"):
        model.observe(state, real, torch.tensor([0]))


def test_embedded_default_world_loads_with_no_arguments():
    from worldflow.pretrained import EMBEDDED, EMBEDDED_WORLDS

    # every embedded world ships inside the package with its model card: together they stay under 40 MB
    assert sum(p.stat().st_size for p in EMBEDDED.rglob("*") if p.is_file()) < 40 * 2**20
    assert all((EMBEDDED / name / "README.md").is_file() for name in EMBEDDED_WORLDS)
    env = gym.make("WorldFlow-v0")
    assert env.unwrapped.model.config.env_id == "ALE/Breakout-v5"
    obs, _ = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and obs.std() > 1
    frame, reward, terminated, truncated, info = env.step(1)
    assert frame.shape == (64, 64, 3) and np.isfinite(info["bits_per_dim"])


def test_embedded_worlds_load_by_name_and_a_real_path_wins(tmp_path, monkeypatch, endless_world):
    from worldflow.cli import WORLD_HELP
    from worldflow.pretrained import DEFAULT_WORLD, EMBEDDED, EMBEDDED_WORLDS, resolve_world

    assert resolve_world("default") == resolve_world() == DEFAULT_WORLD
    assert all(f"'{name}'" in WORLD_HELP for name in EMBEDDED_WORLDS)  # the CLI's help names them all
    fast = gym.make("WorldFlow-v0", checkpoint="fast")
    assert resolve_world("fast") == EMBEDDED / "fast"
    cfg = fast.unwrapped.model.config
    assert fast.unwrapped.model.tokens_per_frame == 16 and cfg.ae_subpixel and cfg.env_id == "ALE/Breakout-v5"
    obs, _ = fast.reset(seed=0)
    assert obs.shape == (64, 64, 3) and fast.step(1)[0].shape == (64, 64, 3)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast").symlink_to(endless_world)  # a directory of that name: the user's own world
    assert resolve_world("fast").resolve() == endless_world.resolve()
    with pytest.raises(FileNotFoundError, match="embedded worlds: default, fast, takecover"):
        resolve_world("fastest")


def test_worlds_saved_before_events_were_generic_load_with_their_one_event(tmp_path):
    """The Breakout worlds were saved with a 'life_loss' head: they load as the event 'life_lost'."""
    import json

    from safetensors.torch import load_file

    from worldflow.pretrained import EMBEDDED
    from worldflow.world_model import WorldFlowModel

    old = json.loads((EMBEDDED / "default" / "config.json").read_text())
    assert "life_loss_horizon" in old and any(k.startswith("heads.life_loss.")
                                              for k in load_file(EMBEDDED / "default" / "model.safetensors"))
    model = WorldFlowModel.from_pretrained(EMBEDDED / "default")
    assert model.config.event_names == ["life_lost"] and model.config.event_horizon == old["life_loss_horizon"]
    weights = load_file(EMBEDDED / "default" / "model.safetensors")
    assert torch.equal(model.heads.events[2].weight, weights["heads.life_loss.2.weight"])
    model.save_pretrained(tmp_path / "new")  # saved again: today's names, and the same model
    again = WorldFlowModel.from_pretrained(tmp_path / "new")
    assert "event_names" in json.loads((tmp_path / "new" / "config.json").read_text())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_the_embedded_take_cover_world_dreams_doom_with_a_damage_event():
    env = gym.make("WorldFlow-v0", checkpoint="takecover", sample_termination=True)
    world = env.unwrapped
    assert world.model.config.env_id == "VizdoomTakeCover-v1" and world.model.config.obs_key == "screen"
    assert world.get_action_meanings() == ["NOOP", "MOVE_RIGHT", "MOVE_LEFT"] and world.event_names == ["HEALTH_drop"]
    obs, info = env.reset(seed=0)
    assert obs.shape == (64, 64, 3) and info["event_risk"].shape == (1,)
    obs, reward, terminated, truncated, info = env.step(2)
    assert reward == 1.0  # +1 a tic alive, as the real game pays
    from worldflow.agents import load_agent
    from worldflow.pretrained import EMBEDDED

    agent = load_agent(EMBEDDED / "takecover" / "agent")  # the agent docs/takecover.md reports, to replay
    assert agent.spec.env_id == "VizdoomTakeCover-v1" and agent.spec.obs_key == "screen"
