"""Check an agent in the REAL game: mean episode return ± standard error, beside a random policy's."""

import numpy as np

from worldflow.collect import make_env, resize_frames

from .actor_critic import AgentPolicy


def play_real(policy, env_id: str, episodes: int, seed: int, frame_size: int = 64, max_steps: int = 10_000,
              on_episode=None, action_counts: np.ndarray | None = None) -> list[float]:
    """Episode returns of `policy` (obs -> action, optional reset()) in the real env, frames preprocessed
    exactly as the world's training data was (area-resized RGB); each action taken is added to
    `action_counts` if given."""
    env = make_env(env_id)
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
                total += reward
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


def evaluate_agent(agent_dir, env_id: str | None = None, episodes: int = 20, seed: int = 0,
                   max_steps: int = 10_000, progress: bool = True) -> dict:
    """The agent and a uniform random policy on the same seeded episodes of the real game, with the
    fraction of steps each took each action (what an agent learned shows there first)."""
    from tqdm import tqdm

    agent = AgentPolicy(agent_dir, seed)
    env_id = env_id or agent.net.spec.env_id
    if env_id is None:
        raise ValueError(f"agent {agent_dir} does not record its game: pass --env")
    n = agent.net.spec.num_actions
    probe = make_env(env_id)
    if probe.action_space.n != n:
        raise ValueError(f"{env_id} has {probe.action_space.n} actions; agent {agent_dir} was trained for {n}")
    names = getattr(probe.unwrapped, "get_action_meanings", lambda: [str(a) for a in range(n)])()  # ALE's names
    probe.close()
    result = dict(env_id=env_id)
    for name, policy in (("agent", agent), ("random", random_policy(n, seed))):
        counts = np.zeros(n, np.int64)
        with tqdm(total=episodes, desc=f"{name} in {env_id}", unit="episode", disable=not progress) as bar:
            result[name] = summary(play_real(policy, env_id, episodes, seed, agent.net.spec.frame_size, max_steps,
                                             on_episode=lambda _: bar.update(1), action_counts=counts))
        result[name]["action_fractions"] = dict(zip(names, (counts / counts.sum()).round(4).tolist()))
    a, r = result["agent"], result["random"]
    result["beats_random"] = bool(a["mean"] - r["mean"] > a["stderr"] + r["stderr"])
    return result
