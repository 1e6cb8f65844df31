"""Collect real trajectories from a Gymnasium pixel environment into atomic episode shards.

Layout of a dataset directory:
    manifest.json                    env id, action meanings, frame size, preprocessing
    episodes/w00-e000000.npz         one episode: frames (L+1, S, S, 3) uint8, actions (L,),
                                     rewards (L,), terminated (L,), truncated (L,), lives (L+1,)
frames[i] is the observation where actions[i] was taken; rewards[i], terminated[i] and
truncated[i] describe the step it led to; lives[i] is the game's life counter at frames[i] (ALE's
info["lives"]; 0 throughout for an env without lives). A shard is written to a temporary file and renamed,
so readers never see half an episode; a stopped collection resumes at the next episode.
"""

import json
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

SHARD_DIR = "episodes"


def make_env(env_id: str, **kwargs) -> gym.Env:
    if env_id.startswith("ALE/"):
        import ale_py

        gym.register_envs(ale_py)
    env = gym.make(env_id, **kwargs)
    if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 3
            and env.observation_space.shape[-1] == 3):
        raise ValueError(f"{env_id} does not give RGB pixel observations (got {env.observation_space})")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ValueError(f"{env_id} must have a Discrete action space (got {env.action_space})")
    return env


def action_meanings(env: gym.Env) -> list[str]:
    getter = getattr(env.unwrapped, "get_action_meanings", None)
    return list(getter()) if getter else [str(i) for i in range(env.action_space.n)]


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """(..., H, W, 3) uint8 -> (..., size, size, 3) uint8 by area averaging (no aliasing of thin sprites)."""
    lead = frames.shape[:-3]
    x = torch.from_numpy(np.ascontiguousarray(frames)).reshape(-1, *frames.shape[-3:]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="area")
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(*lead, size, size, 3).numpy()


def write_atomic(path: Path, write) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename over it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def shard_paths(root: Path, worker: int | None = None) -> list[Path]:
    pattern = "*.npz" if worker is None else f"w{worker:02d}-e*.npz"
    return sorted((Path(root) / SHARD_DIR).glob(pattern))


def shard_steps(path: Path) -> int:
    with np.load(path) as shard:
        return len(shard["actions"])


def prepare_output(out: Path, env_id: str, size: int, seed: int, policy: str = "random") -> dict:
    """Write the manifest (or check a resumed collection's one matches) and return it."""
    env = make_env(env_id)
    manifest = dict(env_id=env_id, num_actions=int(env.action_space.n), action_meanings=action_meanings(env),
                    frame_size=size, env_kwargs={k: v for k, v in (env.spec.kwargs or {}).items()
                                                 if isinstance(v, (int, float, str, bool))},
                    preprocessing=f"RGB observation area-resized to {size}x{size}; env defaults otherwise",
                    seed=seed, source_shape=list(env.observation_space.shape), policy=policy)
    env.close()
    path = out / "manifest.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("env_id", "frame_size", "policy"):
            if old.get(key, "random") != manifest[key]:
                raise ValueError(f"{out} already holds a collection with {key}={old.get(key)!r}, "
                                 f"not {manifest[key]!r}: use another --out")
        return old
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)
    return manifest


def collect_worker(env_id: str, steps: int, out: str, size: int, seed: int, worker: int = 0,
                   on_episode=None, policy_factory=None) -> int:
    """Run episodes until this worker's shards hold `steps` steps; returns steps collected now.

    Episode k of worker w is seeded from (seed, w, k), so a resumed run continues the same stream.
    `policy_factory(episode_seed)` -> a callable (size x size frame) -> action; None: uniform random.
    """
    out = Path(out)
    for stale in (out / SHARD_DIR).glob(f"w{worker:02d}-*.tmp"):
        stale.unlink()  # an episode cut off mid-write: never renamed, so never read
    done_shards = shard_paths(out, worker)
    done = sum(shard_steps(p) for p in done_shards)
    episode, collected = len(done_shards), 0
    env = make_env(env_id)
    while done < steps:
        ep_seed = int(np.random.SeedSequence([seed, worker, episode]).generate_state(1)[0])
        obs, info = env.reset(seed=ep_seed)
        env.action_space.seed(ep_seed)
        policy = policy_factory(ep_seed) if policy_factory else None
        frames, actions, rewards, terms, truncs, lives = [obs], [], [], [], [], [info.get("lives", 0)]
        while True:
            action = env.action_space.sample() if policy is None else policy(resize_frames(obs, size))
            obs, reward, terminated, truncated, info = env.step(action)
            frames.append(obs)
            lives.append(info.get("lives", 0))
            actions.append(action)
            rewards.append(reward)
            terms.append(terminated)
            truncs.append(truncated)
            if done + len(actions) >= steps and not (terminated or truncated):
                truncs[-1] = truncated = True  # the step budget cuts this episode short
            if terminated or truncated:
                break
        data = dict(frames=resize_frames(np.stack(frames), size), actions=np.array(actions, np.int64),
                    rewards=np.array(rewards, np.float32), terminated=np.array(terms, bool),
                    truncated=np.array(truncs, bool), lives=np.array(lives, np.int16))
        write_atomic(out / SHARD_DIR / f"w{worker:02d}-e{episode:06d}.npz", lambda f: np.savez_compressed(f, **data))
        done += len(actions)
        collected += len(actions)
        episode += 1
        if on_episode:
            on_episode(len(actions))
    env.close()
    return collected


def collect(env_id: str, steps: int, out: str, size: int = 64, seed: int = 0, workers: int = 0,
            ray_address: str | None = None, progress: bool = True, policy_factory=None,
            policy_name: str = "random") -> dict:
    """Collect `steps` environment steps into `out` (resuming if it already holds some).

    workers=0 runs in this process; workers=K runs K Ray tasks, each filling its own shards.
    policy_factory (picklable, for Ray) builds the behaviour policy per episode; policy_name goes in
    the manifest, and a resumed collection must use the same one.
    """
    from tqdm import tqdm

    out = Path(out)
    manifest = prepare_output(out, env_id, size, seed, policy_name)
    n = max(workers, 1)
    budgets = [steps // n + (1 if w < steps % n else 0) for w in range(n)]
    bar = tqdm(total=steps, initial=sum(shard_steps(p) for p in shard_paths(out)), unit="step",
               desc=f"collect {env_id}", disable=not progress)
    try:
        if workers == 0:
            collect_worker(env_id, steps, str(out), size, seed, 0, on_episode=bar.update, policy_factory=policy_factory)
        else:
            import ray

            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if not ray.is_initialized():
                ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
            # one-shot Ray tasks rather than long-lived actors: a task that dies is retried by Ray,
            # and the retry resumes from the shards its first attempt already renamed into place
            remote = ray.remote(num_cpus=1, max_retries=3)(collect_worker)
            pending = [remote.remote(env_id, budgets[w], str(out), size, seed, w, policy_factory=policy_factory)
                       for w in range(workers)]
            counted: dict[Path, int] = {}
            while pending:  # progress comes from the shards the workers have renamed into place
                ready, pending = ray.wait(pending, timeout=1.0)
                ray.get(ready)  # re-raises a worker's error here
                for p in shard_paths(out):
                    if p not in counted:
                        counted[p] = shard_steps(p)
                bar.n = sum(counted.values())
                bar.refresh()
    finally:
        bar.close()
    return manifest
