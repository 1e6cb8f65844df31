"""Check an agent in the REAL game: mean episode return ± standard error, beside a random policy's and
the best state-blind periodic policy's (chosen on other seeds), on the same seeded episodes."""

import itertools

import numpy as np

from worldflow.collect import action_meanings, make_env, resize_frames

from .actor_critic import AgentPolicy

PERIODS = (5, 10, 25, 50, 100)  # steps each action of a periodic policy is held
SELECTION_SEED_OFFSET = 1_000_000  # the periodic policy is chosen on seeds no evaluation uses


def play_real(policy, env_id: str, episodes: int, seed: int, frame_size: int = 64, max_steps: int = 10_000,
              on_episode=None, action_counts: np.ndarray | None = None, obs_key: str | None = None,
              env_kwargs: dict | None = None, reward_sign: bool = False) -> list[float]:
    """Episode returns of `policy` (obs -> action, optional reset()) in the real env (made with `env_kwargs`),
    frames preprocessed exactly as the world's training data was (area-resized RGB); each action taken is
    added to `action_counts` if given. reward_sign sums each reward's sign instead, the unit of a world's
    reward head (Take Cover at 4 tics a step: +1 a step, where the game pays +4)."""
    env = make_env(env_id, obs_key, **(env_kwargs or {}))
    returns = []
    try:
        for episode in range(episodes):
            obs, _ = env.reset(seed=seed + episode)
            if hasattr(policy, "reset"):
                policy.reset()
            total = 0.0
            for _ in range(max_steps):
                action = policy(resize_frames(obs, frame_size))
                if action_counts is not None:
                    action_counts[action] += 1
                obs, reward, terminated, truncated, _ = env.step(action)
                total += float(np.sign(reward)) if reward_sign else reward
                if terminated or truncated:
                    break
            returns.append(total)
            if on_episode:
                on_episode(total)
    finally:
        env.close()
    return returns


def summary(returns: list[float]) -> dict:
    r = np.asarray(returns, dtype=np.float64)
    return dict(mean=float(r.mean()), stderr=float(r.std(ddof=1) / np.sqrt(len(r))) if len(r) > 1 else float("nan"),
                episodes=len(r), returns=r.tolist())


def random_policy(num_actions: int, seed: int | None):
    """The baseline every agent is measured against: uniform over the actions, seeded. obs -> action."""
    rng = np.random.default_rng(seed)
    return lambda obs: int(rng.integers(num_actions))


class PeriodicPolicy:
    """A state-blind pattern: `actions` in turn, each held `period` steps, whatever the frame shows.
    Where it scores well (Take Cover: LEFT/RIGHT every 50 steps doubles random), beating random proves nothing."""

    def __init__(self, actions: tuple[int, ...], period: int):
        self.actions, self.period, self.t = actions, period, 0

    def reset(self) -> None:
        self.t = 0

    def __call__(self, obs) -> int:
        self.t += 1
        return self.actions[((self.t - 1) // self.period) % len(self.actions)]

    def name(self, meanings: list[str]) -> str:
        if len(self.actions) == 1:
            return f"always {meanings[self.actions[0]]}"
        return "/".join(meanings[a] for a in self.actions) + f" every {self.period}"


def periodic_candidates(num_actions: int, periods=PERIODS) -> list[PeriodicPolicy]:
    """Each constant action, and each pair of actions alternating every k steps for k in `periods`."""
    return ([PeriodicPolicy((a,), 1) for a in range(num_actions)]
            + [PeriodicPolicy(pair, k) for pair in itertools.combinations(range(num_actions), 2) for k in periods])


def best_periodic(env_id: str, num_actions: int, episodes: int, seed: int, frame_size: int, max_steps: int,
                  obs_key: str | None = None, env_kwargs: dict | None = None) -> tuple[PeriodicPolicy, list[dict]]:
    """The periodic policy with the best mean over `episodes` episodes on selection seeds (never the
    evaluation's), and every candidate's mean there."""
    scores = []
    for policy in periodic_candidates(num_actions):
        returns = play_real(policy, env_id, episodes, SELECTION_SEED_OFFSET + seed, frame_size, max_steps,
                            obs_key=obs_key, env_kwargs=env_kwargs)
        scores.append((float(np.mean(returns)), policy))
    best = max(scores, key=lambda s: s[0])[1]
    return best, [dict(actions=list(p.actions), period=p.period, mean=m) for m, p in scores]


def evaluate_agent(agent_dir, env_id: str | None = None, episodes: int = 20, seed: int = 0,
                   max_steps: int = 10_000, progress: bool = True, selection_episodes: int = 5,
                   device: str = "cpu") -> dict:
    """The agent, a uniform random policy and the best periodic policy on the same seeded episodes of the
    real game, with the fraction of steps each took each action (what an agent learned shows there first).
    selection_episodes 0 skips the periodic baseline."""
    from tqdm import tqdm

    agent = AgentPolicy(agent_dir, seed, device)
    spec = agent.net.spec
    # the game the agent's world was trained on, made as it was (another --env: that id's defaults)
    env_kwargs = spec.env_kwargs if env_id in (None, spec.env_id) else {}
    env_id = env_id or spec.env_id
    if env_id is None:
        raise ValueError(f"agent {agent_dir} does not record its game: pass --env")
    n = spec.num_actions
    probe = make_env(env_id, spec.obs_key, **env_kwargs)
    if probe.action_space.n != n:
        raise ValueError(f"{env_id} has {probe.action_space.n} actions; agent {agent_dir} was trained for {n}")
    names = action_meanings(probe)
    probe.close()
    policies = [("agent", agent), ("random", random_policy(n, seed))]
    result = dict(env_id=env_id, env_kwargs=env_kwargs, seed=seed)
    if selection_episodes:
        periodic, candidates = best_periodic(env_id, n, selection_episodes, seed, spec.frame_size, max_steps,
                                             spec.obs_key, env_kwargs)
        policies.append(("periodic", periodic))
        result["periodic_selection"] = dict(episodes=selection_episodes, chosen=periodic.name(names),
                                            candidates=candidates)
    for name, policy in policies:
        counts = np.zeros(n, np.int64)
        with tqdm(total=episodes, desc=f"{name} in {env_id}", unit="episode", disable=not progress) as bar:
            result[name] = summary(play_real(policy, env_id, episodes, seed, spec.frame_size, max_steps,
                                             on_episode=lambda _: bar.update(1), action_counts=counts,
                                             obs_key=spec.obs_key, env_kwargs=env_kwargs))
        result[name]["action_fractions"] = dict(zip(names, (counts / counts.sum()).round(4).tolist()))
    a, r = result["agent"], result["random"]
    result["beats_random"] = bool(a["mean"] - r["mean"] > a["stderr"] + r["stderr"])
    if "periodic" in result:
        p = result["periodic"]
        # "by more than 2 standard errors" of the difference of the two independent means
        result["beats_periodic"] = bool(a["mean"] - p["mean"] > 2 * np.hypot(a["stderr"], p["stderr"]))
    return result
