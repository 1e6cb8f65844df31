"""Collection writes whole episodes atomically, resumes exactly, and feeds fixed-length clips."""

import json
import shutil

import numpy as np
import pytest
import torch

from worldflow.cli import main
from worldflow.collect import HeldRandom, collect, make_env, shard_paths, shard_steps
from worldflow.data import NO_EVENT, ClipDataset, load_manifest, steps_to_event


def test_collection_writes_episodes_and_manifest(breakout_data):
    manifest = json.loads((breakout_data / "manifest.json").read_text())
    assert manifest["env_id"] == "ALE/Breakout-v5" and manifest["num_actions"] == 4
    assert manifest["action_meanings"] == ["NOOP", "FIRE", "RIGHT", "LEFT"] and manifest["frame_size"] == 64
    assert manifest["event_names"] == ["life_lost"] and manifest["obs_key"] is None  # ALE reports lives
    shards = shard_paths(breakout_data)
    assert len(shards) >= 3 and sum(shard_steps(p) for p in shards) == 800
    with np.load(shards[0]) as ep:
        L = len(ep["actions"])
        assert ep["frames"].shape == (L + 1, 64, 64, 3) and ep["frames"].dtype == np.uint8
        assert ep["rewards"].shape == ep["terminated"].shape == (L,)
        assert ep["terminated"][-1] or ep["truncated"][-1]  # an episode ends where its shard ends
        assert ep["frames"].std() > 1  # real pixels, not a blank screen
        assert ep["events"].shape == (L, 1) and ep["events"].dtype == bool
        if ep["terminated"][-1]:  # Breakout's 5 lives: a game over has lost all of them, the last at its end
            assert ep["events"].sum() == 5 and ep["events"][-1, 0]
    with np.load(shards[-1]) as last:
        assert last["truncated"][-1]  # the step budget cut the last episode


def test_steps_to_event_counts_to_each_events_next_step():
    happened = np.array([[0, 0], [0, 1], [1, 0], [0, 0], [1, 0], [0, 0], [0, 0]], bool)
    assert steps_to_event(happened)[:, 0].tolist() == [2, 1, 0, 1, 0, NO_EVENT, NO_EVENT]
    assert steps_to_event(happened)[:, 1].tolist() == [1, 0] + [NO_EVENT] * 5
    assert steps_to_event(np.zeros((4, 0), bool)).shape == (4, 0)  # a game without events


def test_clips_carry_each_steps_distance_to_an_event_and_old_shards_still_load(breakout_data, tmp_path):
    clips = ClipDataset(breakout_data, clip_frames=4, split="all")
    ep = clips.episodes[0]
    with np.load(shard_paths(breakout_data)[0]) as shard:
        lost = np.flatnonzero(shard["events"][:, 0])
        old = {k: shard[k] for k in shard.files if k != "events"}
    assert len(lost) >= 1 and (ep["steps_to_event"][lost, 0] == 0).all()
    item = clips[0]
    assert torch.equal(item["steps_to_event"], torch.from_numpy(ep["steps_to_event"][:3]))
    # a shard from before events were generic holds ALE's life counter: its drops are the same event
    stale = tmp_path / "stale"
    shutil.copytree(breakout_data, stale)
    lost_at = np.isin(np.arange(len(old["actions"])), lost)
    lives = 5 - np.concatenate([[0], np.cumsum(lost_at)])
    np.savez_compressed(shard_paths(stale)[0], lives=lives.astype(np.int16), **old)
    assert lost_at.any() and np.array_equal(
        ClipDataset(stale, clip_frames=4, split="all").episodes[0]["steps_to_event"], ep["steps_to_event"])
    np.savez_compressed(shard_paths(stale)[0], **old)  # neither events nor lives
    with pytest.raises(ValueError, match="collect it again"):
        ClipDataset(stale, clip_frames=4, split="all")


def test_a_vizdoom_collection_reads_dict_observations_and_records_damage(takecover_data):
    manifest = json.loads((takecover_data / "manifest.json").read_text())
    assert manifest["obs_key"] == "screen" and manifest["event_names"] == ["HEALTH_drop"]
    assert manifest["action_meanings"] == ["NOOP", "MOVE_RIGHT", "MOVE_LEFT"]
    shards = shard_paths(takecover_data)
    with np.load(shards[0]) as ep:
        assert ep["frames"].shape[1:] == (64, 64, 3) and ep["frames"].std() > 1
        assert (ep["rewards"] == 1).all()  # Take Cover: +1 per tic alive
        if ep["terminated"][-1]:  # death: the health falls to 0 at the episode's last step
            assert ep["events"][-1, 0]


def test_held_random_holds_each_random_action_for_one_to_max_hold_steps():
    policy = HeldRandom(seed=3, num_actions=3, max_hold=5)
    actions = [policy(np.zeros((64, 64, 3), np.uint8)) for _ in range(2000)]
    assert set(actions) == {0, 1, 2}
    runs, length = [], 1
    for prev, cur in zip(actions, actions[1:]):
        if cur == prev:
            length += 1
        else:
            runs.append(length)
            length = 1
    assert max(runs) > 5  # two holds of one action can meet, so a run can exceed one hold
    assert np.mean(runs) > 2.5  # uniform 1..5 holds (mean 3, lengthened by meetings); iid actions: 1.5
    again = HeldRandom(seed=3, num_actions=3, max_hold=5)
    assert [again(None) for _ in range(2000)] == actions  # seeded: a resumed collection replays it
    with pytest.raises(ValueError, match="max_hold"):
        HeldRandom(seed=0, num_actions=3, max_hold=0)


def test_cli_collects_with_held_random_and_names_it_in_the_manifest(tmp_path, capsys):
    out = tmp_path / "held"
    assert main(["collect", "--env", "ALE/Breakout-v5", "--steps", "120", "--policy", "held-random",
                 "--max-hold", "8", "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["policy"] == "held-random (1..8 steps)"
    assert main(["collect", "--env", "ALE/Breakout-v5", "--steps", "10", "--policy", "held-random",
                 "--max-hold", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--max-hold" in capsys.readouterr().err


def test_env_args_make_the_game_and_the_manifest_remembers_them(tmp_path, capsys):
    out = tmp_path / "skip4"
    assert main(["collect", "--env", "VizdoomTakeCover-v1", "--env-arg", "frame_skip=4", "--steps", "30",
                 "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["env_kwargs"]["frame_skip"] == 4
    with np.load(shard_paths(out)[0]) as shard:  # +1 a tic alive: 4 tics a step
        assert (shard["rewards"] == 4).all()
    assert main(["collect", "--env", "VizdoomTakeCover-v1", "--steps", "40", "--out", str(out)]) == 2
    assert "env_kwargs" in capsys.readouterr().err  # a resumed collection must make the same game
    for bad in ("frame_skip", "=4", "frame_skip=[4]"):
        assert main(["collect", "--env", "VizdoomTakeCover-v1", "--env-arg", bad, "--steps", "10",
                     "--out", str(tmp_path / "bad")]) == 2
        assert "--env-arg" in capsys.readouterr().err


def test_missing_or_unknown_envs_and_non_pixel_envs_are_clear_errors():
    with pytest.raises(ValueError, match="cannot make 'NoSuchGame-v0'"):
        make_env("NoSuchGame-v0")
    with pytest.raises(ValueError, match="RGB pixel observations"):
        make_env("CartPole-v1")
    with pytest.raises(ValueError, match="obs key 'nope'"):
        make_env("VizdoomTakeCover-v1", obs_key="nope")


def test_clip_dataset_splits_by_episode(breakout_data):
    train = ClipDataset(breakout_data, clip_frames=6, split="train")
    val = ClipDataset(breakout_data, clip_frames=6, split="val")
    assert len(val.episodes) >= 1 and len(train.episodes) >= 2
    train_firsts = {ep["frames"][0].tobytes() + ep["frames"][5].tobytes() for ep in train.episodes}
    assert all(ep["frames"][0].tobytes() + ep["frames"][5].tobytes() not in train_firsts for ep in val.episodes)
    item = train[len(train) - 1]
    assert item["frames"].shape == (6, 64, 64, 3) and item["actions"].shape == (5,)
    with pytest.raises(ValueError, match="clip_frames"):
        ClipDataset(breakout_data, clip_frames=100000)


def test_clips_pool_datasets_of_one_game_and_refuse_two_games(breakout_data, tracker_data, tmp_path):
    pooled = ClipDataset([breakout_data, tracker_data], clip_frames=6, split="train")
    alone = [ClipDataset(d, clip_frames=6, split="train") for d in (breakout_data, tracker_data)]
    assert len(pooled) == sum(len(a) for a in alone) and len(pooled.episodes) == sum(len(a.episodes) for a in alone)
    held_out = ClipDataset([breakout_data, tracker_data], clip_frames=6, split="val")
    every = ClipDataset([breakout_data, tracker_data], clip_frames=6, split="all")
    assert held_out.episodes and len(held_out.episodes) + len(pooled.episodes) == len(every.episodes)
    assert [d["policy"] for d in load_manifest([breakout_data, tracker_data])["datasets"]] == ["random", "tracker"]
    small = tmp_path / "small"
    collect("ALE/Breakout-v5", 30, str(small), size=32, progress=False)
    with pytest.raises(ValueError, match="frame_size"):
        ClipDataset([breakout_data, small], clip_frames=6)


def test_interrupted_collection_resumes_to_identical_data(tmp_path):
    reference = tmp_path / "reference"
    collect("ALE/Breakout-v5", 500, str(reference), seed=3, progress=False)

    stopped = tmp_path / "stopped"
    import worldflow.collect as c

    calls = {"n": 0}
    original = c.collect_worker

    def stop_after_two_episodes(*args, **kwargs):
        def on_episode(_):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # Ctrl-C between episodes
        return original(*args[:6], on_episode=on_episode)

    c.collect_worker = stop_after_two_episodes
    try:
        with pytest.raises(KeyboardInterrupt):
            collect("ALE/Breakout-v5", 500, str(stopped), seed=3, progress=False)
    finally:
        c.collect_worker = original
    assert len(shard_paths(stopped)) == 2
    (stopped / "episodes" / "w00-e000002.npz.tmp").write_bytes(b"half an episode")  # a kill mid-write
    collect("ALE/Breakout-v5", 500, str(stopped), seed=3, progress=False)
    assert not list((stopped / "episodes").glob("*.tmp"))
    ref, got = shard_paths(reference), shard_paths(stopped)
    assert [p.name for p in ref] == [p.name for p in got]
    for a, b in zip(ref, got):
        with np.load(a) as x, np.load(b) as y:
            for key in x.files:
                np.testing.assert_array_equal(x[key], y[key])


def test_resuming_into_a_different_collection_is_refused(breakout_data):
    with pytest.raises(ValueError, match="env_id"):
        collect("ALE/Pong-v5", 10, str(breakout_data), progress=False)


def test_ray_workers_each_fill_their_own_shards(tmp_path, ray_local):
    collect("ALE/Breakout-v5", 300, str(tmp_path / "d"), seed=1, workers=2, progress=False)
    shards = shard_paths(tmp_path / "d")
    assert {p.name[:3] for p in shards} == {"w00", "w01"}
    assert sum(shard_steps(p) for p in shards) == 300
