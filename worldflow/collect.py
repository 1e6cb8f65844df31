"""Collect real trajectories from a Gymnasium pixel environment into atomic episode shards.

Layout of a dataset directory:
    manifest.json                    env id, action meanings, frame size, event names, preprocessing
    episodes/w00-e000000.npz         one episode: frames (L+1, S, S, 3) uint8, actions (L,),
                                     rewards (L,), terminated (L,), truncated (L,), events (L, E)
frames[i] is the observation where actions[i] was taken; rewards[i], terminated[i], truncated[i] and
events[i] describe the step it led to. Events are generic per-step signals read from what the env
reports, named in the manifest's `event_names`: "life_lost" where info["lives"] drops (ALE), and
"<VARIABLE>_drop" where a numeric game variable of a Dict observation drops (ViZDoom's HEALTH: damage
taken). A shard is written to a temporary file and renamed, so readers never see half an episode; a
stopped collection resumes at the next episode.
"""

import importlib
import json
import os
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

SHARD_DIR = "episodes"
# what a manifest written before these fields existed meant: random play, an image observation, ALE's lives
OLDER_MANIFEST = dict(policy="random", obs_key=None, event_names=["life_lost"])
# env-id prefixes whose environments register when a package is imported: (module, pip package)
ENV_PLUGINS = {"ALE/": ("ale_py", "ale-py"),
               "Vizdoom": ("vizdoom.gymnasium_wrapper", "vizdoom (pip install 'worldflow[doom]')")}


def is_image_space(space) -> bool:
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 3 and space.shape[-1] == 3


class PixelGame(gym.Wrapper):
    """A real env seen as WorldFlow sees it: the RGB image as the observation (the `obs_key` entry of
    a Dict observation), and the Dict's numeric entries flattened into info["game_variables"]."""

    def __init__(self, env: gym.Env, obs_key: str | None = None):
        super().__init__(env)
        space = env.observation_space
        self.obs_key, self.variable_keys = None, []
        if isinstance(space, gym.spaces.Dict):
            images = [k for k, s in space.spaces.items() if is_image_space(s)]
            if obs_key is None and len(images) != 1:
                raise ValueError(f"{env.spec.id if env.spec else env} has Dict observations with image keys "
                                 f"{images} among {list(space.spaces)}: name the RGB one with --obs-key")
            self.obs_key = obs_key or images[0]
            if self.obs_key not in images:
                raise ValueError(f"obs key {self.obs_key!r} is not an RGB image entry of {space} (images: {images})")
            self.variable_keys = [k for k, s in space.spaces.items() if k != self.obs_key
                                  and isinstance(s, gym.spaces.Box) and len(s.shape) <= 1]
            self.observation_space = space.spaces[self.obs_key]
        elif obs_key is not None:
            raise ValueError(f"--obs-key {obs_key!r} given, but the observations are not a Dict ({space})")
        elif not is_image_space(space):
            raise ValueError(f"{env.spec.id if env.spec else env} does not give RGB pixel observations (got {space})")

    def variable_names(self) -> list[str]:
        """One name per game variable: the engine's own where it tells them (ViZDoom), else KEY[i]."""
        getter = getattr(getattr(self.env.unwrapped, "game", None), "get_available_game_variables", None)
        names = [str(v).rsplit(".", 1)[-1] for v in getter()] if getter else []
        sizes = [int(np.prod(self.env.observation_space.spaces[k].shape)) for k in self.variable_keys]
        return names if len(names) == sum(sizes) else [f"{k}[{i}]" for k, n in zip(self.variable_keys, sizes)
                                                        for i in range(n)]

    def _split(self, obs, info: dict):
        if self.obs_key is None:
            return obs, info
        values = [np.asarray(obs[k], np.float64).reshape(-1) for k in self.variable_keys]
        return obs[self.obs_key], {**info, "game_variables": np.concatenate(values) if values else np.zeros(0)}

    def reset(self, **kwargs):
        return self._split(*self.env.reset(**kwargs))

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self._split(obs, info)
        return obs, reward, terminated, truncated, info


class HeldRandom:
    """A state-blind behaviour policy: a uniform random action held for a uniform 1..max_hold steps.

    Uniform random play at one game tic a step (ViZDoom's frame skip 1) jitters in place: it never
    sweeps across the room, meets a wall or dodges, so a world trained on it has never seen what
    sustained movement does. Holding each random action for a while shows the same actions in the
    situations a playing agent reaches, and stays as blind to the screen as random play.
    """

    def __init__(self, seed: int, num_actions: int, max_hold: int):
        if max_hold < 1:
            raise ValueError(f"max_hold (--max-hold) is a number of steps >= 1, got {max_hold}")
        self.rng, self.num_actions, self.max_hold = np.random.default_rng(seed), num_actions, max_hold
        self.action, self.left = 0, 0

    def __call__(self, frame: np.ndarray) -> int:
        if self.left == 0:
            self.action = int(self.rng.integers(self.num_actions))
            self.left = int(self.rng.integers(1, self.max_hold + 1))
        self.left -= 1
        return self.action


def make_env(env_id: str, obs_key: str | None = None, **kwargs) -> PixelGame:
    """Any registered Gymnasium id with RGB pixels and Discrete actions (ALE and ViZDoom ids register
    themselves on first use; "module:Env-v0" imports the module), as a PixelGame."""
    for prefix, (module, package) in ENV_PLUGINS.items():
        if env_id.startswith(prefix) and env_id not in gym.registry:
            try:
                plugin = importlib.import_module(module)
            except ImportError:
                raise ValueError(f"{env_id} needs the package {package}, which is not installed") from None
            if module == "ale_py":
                gym.register_envs(plugin)
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as e:
        raise ValueError(f"cannot make {env_id!r}: {e}") from None
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise ValueError(f"{env_id} must have a Discrete action space (got {env.action_space})")
    return PixelGame(env, obs_key)


def event_names(env: PixelGame, info: dict) -> list[str]:
    """The events a collection of this env records, from what its first reset reports."""
    return (["life_lost"] if "lives" in info else []) + [f"{name}_drop" for name in env.variable_names()]


def step_events(before: dict, after: dict) -> list[bool]:
    """Which events (in event_names order) the step between two infos had: a drop of lives or of a variable."""
    lost = [after["lives"] < before["lives"]] if "lives" in before else []
    drops = list(np.asarray(after.get("game_variables", [])) < np.asarray(before.get("game_variables", [])))
    return [bool(x) for x in lost + drops]


def action_meanings(env: gym.Env) -> list[str]:
    """The env's own action names (ALE's get_action_meanings; ViZDoom's buttons each action presses),
    else the action numbers."""
    raw = env.unwrapped
    if hasattr(raw, "get_action_meanings"):
        return list(raw.get_action_meanings())
    buttons = getattr(getattr(raw, "game", None), "get_available_buttons", None)
    presses = getattr(raw, "button_map", None)
    if buttons and presses is not None and len(presses) == env.action_space.n:
        names = [str(b).rsplit(".", 1)[-1].split(":")[0] for b in buttons()]
        return ["+".join(n for n, on in zip(names, press) if on) or "NOOP" for press in presses]
    return [str(i) for i in range(env.action_space.n)]


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


def read_manifest(path: Path) -> dict:
    """A dataset's manifest.json, with the fields it predates filled in as OLDER_MANIFEST says."""
    return {**OLDER_MANIFEST, **json.loads(Path(path).read_text())}


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def shard_paths(root: Path, worker: int | None = None) -> list[Path]:
    pattern = "*.npz" if worker is None else f"w{worker:02d}-e*.npz"
    return sorted((Path(root) / SHARD_DIR).glob(pattern))


def shard_steps(path: Path) -> int:
    with np.load(path) as shard:
        return len(shard["actions"])


def prepare_output(out: Path, env_id: str, size: int, seed: int, policy: str = "random",
                   obs_key: str | None = None, env_kwargs: dict | None = None) -> dict:
    """Write the manifest (or check a resumed collection's one matches) and return it. Its env_kwargs are
    every keyword the env was made with (the registered ones and `env_kwargs`): what remakes the same game."""
    env = make_env(env_id, obs_key, **(env_kwargs or {}))
    _, info = env.reset(seed=seed)
    manifest = dict(env_id=env_id, obs_key=env.obs_key, num_actions=int(env.action_space.n),
                    action_meanings=action_meanings(env), frame_size=size, event_names=event_names(env, info),
                    env_kwargs={k: v for k, v in (env.spec.kwargs or {}).items()
                                if isinstance(v, (int, float, str, bool))},
                    preprocessing=f"RGB observation area-resized to {size}x{size}; the env made with env_kwargs",
                    seed=seed, source_shape=list(env.observation_space.shape), policy=policy)
    env.close()
    path = out / "manifest.json"
    if path.exists():
        old = read_manifest(path)
        for key in ("env_id", "env_kwargs", "frame_size", "policy", "obs_key", "event_names"):
            if old.get(key) != manifest[key]:
                raise ValueError(f"{out} already holds a collection with {key}={old.get(key)!r}, "
                                 f"not {manifest[key]!r}: use another --out")
        return old
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, manifest)
    return manifest


def collect_worker(env_id: str, steps: int, out: str, size: int, seed: int, worker: int = 0,
                   on_episode=None, policy_factory=None, obs_key: str | None = None,
                   env_kwargs: dict | None = None) -> int:
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
    env = make_env(env_id, obs_key, **(env_kwargs or {}))
    while done < steps:
        ep_seed = int(np.random.SeedSequence([seed, worker, episode]).generate_state(1)[0])
        obs, info = env.reset(seed=ep_seed)
        env.action_space.seed(ep_seed)
        policy = policy_factory(ep_seed) if policy_factory else None
        frames, actions, rewards, terms, truncs, events = [obs], [], [], [], [], []
        while True:
            action = env.action_space.sample() if policy is None else policy(resize_frames(obs, size))
            before = info
            obs, reward, terminated, truncated, info = env.step(action)
            frames.append(obs)
            events.append(step_events(before, info))
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
                    truncated=np.array(truncs, bool),
                    events=np.array(events, bool).reshape(len(actions), -1))
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
            policy_name: str = "random", obs_key: str | None = None, env_kwargs: dict | None = None) -> dict:
    """Collect `steps` environment steps into `out` (resuming if it already holds some).

    env_kwargs go to gym.make (e.g. ViZDoom's frame_skip); the manifest records them, and everything that
    later plays the real game of a world trained on this data makes it with them.
    workers=0 runs in this process; workers=K runs K Ray tasks, each filling its own shards.
    policy_factory (picklable, for Ray) builds the behaviour policy per episode; policy_name goes in
    the manifest, and a resumed collection must use the same one.
    """
    from tqdm import tqdm

    out = Path(out)
    manifest = prepare_output(out, env_id, size, seed, policy_name, obs_key, env_kwargs)
    n = max(workers, 1)
    budgets = [steps // n + (1 if w < steps % n else 0) for w in range(n)]
    bar = tqdm(total=steps, initial=sum(shard_steps(p) for p in shard_paths(out)), unit="step",
               desc=f"collect {env_id}", disable=not progress)
    try:
        if workers == 0:
            collect_worker(env_id, steps, str(out), size, seed, 0, on_episode=bar.update, policy_factory=policy_factory,
                           obs_key=manifest["obs_key"], env_kwargs=manifest["env_kwargs"])
        else:
            from .scale import init_ray

            ray = init_ray(ray_address)
            # one-shot Ray tasks rather than long-lived actors: a task that dies is retried by Ray,
            # and the retry resumes from the shards its first attempt already renamed into place
            remote = ray.remote(num_cpus=1, max_retries=3)(collect_worker)
            pending = [remote.remote(env_id, budgets[w], str(out), size, seed, w, policy_factory=policy_factory,
                                     obs_key=manifest["obs_key"], env_kwargs=manifest["env_kwargs"])
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
