"""Is the dream calibrated? The same fixed policies played in the dream and in the real game.

    python bench/dream_calibration.py --checkpoint takecover [--dreams 32] [--episodes 20] [--max-steps 2100]

Policies: uniform random, each action held fixed, and each pair of actions alternating every k steps
(k in --periods). Each plays --dreams dreams (from the world's real start contexts, drawn by one
seed; episodes end by the termination head, drawn with its probability as an agent's dreams end) and
--episodes real episodes on fresh seeds, each capped at --max-steps; both returns are sums of reward signs,
the unit of the world's reward head. A dream that teaches ranks the
policies as the real game does and gives random about its real return: the table prints both
returns side by side, the rank correlation (Spearman) and random's dream / real ratio, and the JSON
keeps every episode's return.
"""

import argparse
import time
from pathlib import Path

import numpy as np

from worldflow.agents.evaluate import PeriodicPolicy, periodic_candidates, play_real, random_policy, summary
from worldflow.collect import write_json_atomic
from worldflow.envs import WorldFlowVectorEnv

FRESH_SEED = 2_000_000  # real episodes on seeds no collection used


def policies(meanings: list[str], periods: list[int], seed: int) -> dict:
    """name -> a factory of fresh per-stream policies (obs -> action, optional reset()): random, and
    agent eval's periodic candidates over `periods`."""
    out = {"random": lambda i: random_policy(len(meanings), seed + i)}
    for p in periodic_candidates(len(meanings), periods):
        out[p.name(meanings)] = lambda i, p=p: PeriodicPolicy(p.actions, p.period)
    return out


def dream_returns(env: WorldFlowVectorEnv, make_policy, max_steps: int, seed: int) -> list[float]:
    """Each dream's first episode return under its own policy instance, capped at max_steps."""
    obs, _ = env.reset(seed=seed)
    streams = [make_policy(i) for i in range(env.num_envs)]
    returns, alive = np.zeros(env.num_envs), np.ones(env.num_envs, bool)
    for _ in range(max_steps):
        actions = np.array([p(o) for p, o in zip(streams, obs)])
        obs, rewards, terminated, truncated, _ = env.step(actions)
        returns += rewards * alive
        alive &= ~(terminated | truncated)
        if not alive.any():
            break
    return returns.tolist()


def average_ranks(x) -> np.ndarray:
    """Ranks 0..n-1 with ties sharing their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    return np.array([np.mean(np.flatnonzero(np.sort(x) == v)) for v in x])


def spearman(x, y) -> float:
    """Rank correlation with ties averaged; NaN when either side has a single value (no order to compare)."""
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="takecover")
    parser.add_argument("--dreams", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--max-steps", type=int, default=2100, help="cap on an episode (Ha & Schmidhuber: 2100)")
    parser.add_argument("--periods", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/dream_calibration_takecover.json")
    args = parser.parse_args()

    env = WorldFlowVectorEnv(num_envs=args.dreams, checkpoint=args.checkpoint, max_episode_steps=args.max_steps,
                             sample_termination=True)
    cfg = env.model.config
    rows = []
    for name, make in policies(list(cfg.action_meanings), args.periods, args.seed).items():
        start = time.perf_counter()
        dream = summary(dream_returns(env, make, args.max_steps, args.seed))
        real = summary(play_real(make(0), cfg.env_id, args.episodes, FRESH_SEED + args.seed, cfg.frame_size,
                                 args.max_steps, obs_key=cfg.obs_key, env_kwargs=cfg.env_kwargs, reward_sign=True))
        rows.append(dict(policy=name, dream=dream, real=real, seconds=time.perf_counter() - start))
        print(f"{name:<16} dream {dream['mean']:7.1f} ± {dream['stderr']:5.1f}   real {real['mean']:7.1f} ± "
              f"{real['stderr']:5.1f}   ({rows[-1]['seconds']:.0f} s)", flush=True)
    dream_means, real_means = [r["dream"]["mean"] for r in rows], [r["real"]["mean"] for r in rows]
    random, rho = rows[0], spearman(dream_means, real_means)
    result = dict(checkpoint=str(args.checkpoint), env_id=cfg.env_id, dreams=args.dreams,
                  episodes=args.episodes, max_steps=args.max_steps, rows=rows,
                  spearman=None if np.isnan(rho) else rho,  # JSON has no NaN
                  random_dream_over_real=random["dream"]["mean"] / random["real"]["mean"])
    print(f"\nrank correlation (Spearman) of dream and real means: {rho:.2f}; "
          f"random's dream / real return: {result['random_dream_over_real']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
