"""Do a world's imagined rewards depend on the actions? An agent trained in the dream can only learn
what this shows.

    python docs/breakout_probes/dream_returns.py [--checkpoint RUN_OR_CKPT] [--dreams 32] [--horizon 15] [--agent DIR ...]

Plays the same dreams (same start contexts, same noise: one seed) under the uniform random policy,
under each action held fixed and, in a Breakout world, under the scripted tracker (agents/scripted.py,
which earns 3x random's rewards in the real game), for as long as an agent's imagined episode
(AgentConfig.horizon), and reports each policy's mean imagined return, how many dreams paid
anything, and the world's mean life-loss risk over the steps (what the agent's shaping reads: a
tracker that keeps the ball should be at lower risk than random play, though in Breakout it also
serves sooner: README, stage 14). If every policy gets the same rewards in the same dreams, the
world's rewards do not depend on the actions, and no agent can learn to play from them; if the
tracker earns no more than random, the world does not reward what the real game rewards. In Breakout
it also counts the paid steps whose dreamed frame lost a brick (printed for the random policy, every
policy's in the JSON): a reward the frames show, not the reward head's alone; and, over the fixed
policies' dreamed frames, the risk of a falling ball by how far the paddle is from where it will land
(the paddle rule a shaped agent can learn from the head). With --agent, trained agents play the same
dreams too: whether an agent found the dream's safer play tells an agent that cannot learn from a
dream that teaches the wrong thing.
"""

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np

from worldflow.agents.actor_critic import AgentPolicy
from worldflow.agents.evaluate import summary
from worldflow.agents.scripted import (LEFT_WALL, LIT, RIGHT_WALL, BreakoutTracker, ball_position, falling_landing,
                                      paddle_centre)
from worldflow.collect import write_json_atomic
from worldflow.envs import WorldFlowVectorEnv


BRICK_ROWS = slice(14, 29)  # Breakout's brick wall in the 64x64 frame (the score is above row 10)


def brick_pixels(frames: np.ndarray) -> np.ndarray:
    """(..., 64, 64, 3) Breakout frames -> (...) lit pixels in the brick wall, inside the side walls."""
    return (frames[..., BRICK_ROWS, LEFT_WALL:RIGHT_WALL, :].max(-1) > LIT).sum((-2, -1))


class Imagined(NamedTuple):
    """One policy's dreams, each counted over its first episode only."""
    returns: np.ndarray  # (N,) summed rewards
    lost: list  # for each paid step, the brick pixels its frame lost (a Breakout brick is about 3x2 pixels)
    risks: np.ndarray  # (N, horizon) the life-loss head's probability at every step, NaN after the episode
    frames: np.ndarray  # (N, horizon + 1, S, S, 3)


def imagined_returns(env: WorldFlowVectorEnv, policy, horizon: int, seed: int) -> Imagined:
    """policy(t, frames) -> actions (num_envs,), played for `horizon` steps from the env's seeded reset."""
    obs, _ = env.reset(seed=seed)
    returns, alive, lost, risks, frames = np.zeros(env.num_envs), np.ones(env.num_envs, bool), [], [], [obs]
    for t in range(horizon):
        last = obs
        obs, rewards, terminated, _, info = env.step(policy(t, obs))
        paid = (rewards != 0) & alive
        lost += (brick_pixels(last[paid]).astype(int) - brick_pixels(obs[paid])).tolist()
        returns += rewards * alive  # a dream that ended autoresets: its next episode is not counted
        risks.append(np.where(alive, info["event_risk"][:, 0], np.nan))
        frames.append(obs)
        alive &= ~terminated
    return Imagined(returns, lost, np.stack(risks, axis=1), np.stack(frames, axis=1))


def agent_policy(path, seed: int):
    """A trained agent (`worldflow agent train`) as policy(t, frames) -> actions, one frame stack per dream."""
    agent = AgentPolicy(path, seed)

    def act(t, obs):
        if t == 0:
            agent.reset()
        return agent.act_batch(obs)

    return act


DISTANCE_BINS = (0, 2, 4, 6, 10, 20, 64)  # columns between the paddle and where the falling ball lands


def risk_by_paddle_distance(frames: np.ndarray, risks: np.ndarray) -> list[dict]:
    """Breakout dreams' frames (N, H+1, 64, 64, 3) and risks (N, H) -> the mean risk of the frames whose
    ball falls in the lower field (row >= 40), binned by how far the paddle is from the column where
    the ball will cross its row. A head that knows the rule rates a paddle under the ball safer."""
    rows = []
    for dream, risk in zip(frames, risks):
        for t in range(1, dream.shape[0]):
            ball, paddle = ball_position(dream[t]), paddle_centre(dream[t])
            landing = falling_landing(ball_position(dream[t - 1]), ball)
            if landing is not None and paddle is not None and ball[0] >= 40 and not np.isnan(risk[t - 1]):
                rows.append((abs(landing - paddle), risk[t - 1]))
    distance, risk = np.array(rows).reshape(-1, 2).T
    return [dict(columns=f"{lo}-{hi}", frames=int(m.sum()), risk=float(risk[m].mean()) if m.any() else None)
            for lo, hi in zip(DISTANCE_BINS, DISTANCE_BINS[1:]) for m in [(distance >= lo) & (distance < hi)]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="world (default: the embedded one)")
    parser.add_argument("--dreams", type=int, default=32)
    parser.add_argument("--horizon", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--agent", action="append", default=[], metavar="DIR",
                        help="also play a trained agent (repeatable): does it find the dream's safer play?")
    parser.add_argument("--out", default=str(Path(__file__).parents[2] / "bench" / "results" / "dream_returns.json"))
    args = parser.parse_args()

    env = WorldFlowVectorEnv(num_envs=args.dreams, checkpoint=args.checkpoint, max_episode_steps=args.horizon)
    n = env.single_action_space.n
    rng = np.random.default_rng(args.seed)
    random_actions = rng.integers(0, n, (args.horizon, args.dreams))
    policies = {"random": lambda t, obs: random_actions[t]}
    policies.update({name: (lambda t, obs, a=a: np.full(args.dreams, a)) for a, name in enumerate(env.action_meanings)})
    breakout = "Breakout" in env.model.config.env_id
    if breakout:  # one tracker per dream: it remembers where its ball was
        trackers = [BreakoutTracker(seed=args.seed + i) for i in range(args.dreams)]
        policies["tracker"] = lambda t, obs: np.array([tr(o) for tr, o in zip(trackers, obs)])
    agents = {Path(a).name: agent_policy(a, args.seed) for a in args.agent}
    policies.update(agents)
    runs = {name: imagined_returns(env, policy, args.horizon, args.seed) for name, policy in policies.items()}
    returns = {name: run.returns for name, run in runs.items()}
    risk = {name: np.nanmean(run.risks, axis=1) for name, run in runs.items()}  # each dream's mean over its steps
    print(f"{args.dreams} dreams of {args.horizon} steps, the same starts and noise for every policy")
    print(f"{'policy':>8} {'mean return':>12} {'± s.e.':>7} {'dreams paid':>12} {'life-loss risk':>15} "
          f"{'minus random, paired':>21}")
    for name, r in returns.items():
        stats, k, d = summary(r), summary(risk[name]), summary(risk[name] - risk["random"])
        print(f"{name:>8} {stats['mean']:>12.3f} {stats['stderr']:>7.3f} {int((r != 0).sum()):>7d}/{len(r):<4d} "
              f"{k['mean']:>15.3f} {d['mean']:>+13.3f} ± {d['stderr']:.3f}")
    table = np.stack(list(returns.values()))  # (policies, dreams)
    differs = int((table != table[0]).any(0).sum())
    print(f"dreams whose return depends on the policy: {differs}/{args.dreams}")
    lost = {name: run.lost for name, run in runs.items()} if breakout else None  # did the dream break a brick?
    if lost and lost["random"]:
        print(f"random policy's {len(lost['random'])} paid steps: {sum(px >= 2 for px in lost['random'])} lost >= 2 "
              "brick pixels")
    geometry = None
    if breakout:  # the fixed policies' dreams pooled: the head's judgement, whoever moved the paddle
        fixed = [run for name, run in runs.items() if name not in agents]
        geometry = risk_by_paddle_distance(np.concatenate([run.frames for run in fixed]),
                                           np.concatenate([run.risks for run in fixed]))
        print("risk of a falling ball in the lower field by the paddle's distance from where it lands (columns):")
        print("  " + " | ".join(f"{g['columns']}: {g['risk']:.2f} ({g['frames']})" for g in geometry if g["frames"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), dict(checkpoint=args.checkpoint or "default", dreams=args.dreams,
                                           horizon=args.horizon, seed=args.seed,
                                           returns={k: v.tolist() for k, v in returns.items()},
                                           mean_life_loss_risk={k: v.tolist() for k, v in risk.items()},
                                           dreams_whose_return_depends_on_policy=differs,
                                           paid_steps_brick_pixels_lost=lost, risk_by_paddle_distance=geometry))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
