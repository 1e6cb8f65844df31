"""How far apart are two REAL futures of the same state under the same actions? The bound on a dream's PSNR.

    python docs/breakout_probes/real_spread.py [--checkpoint RUN_OR_CKPT] [--states 256] [--horizon 16]

The world's real game (env id and settings from its config; Breakout v5 repeats the previous action
with probability 0.25, "sticky actions") is played by a random policy. Every `--gap` steps the emulator
state is cloned and the same random action sequence is played twice from it: the emulator's random
draws differ, so the two futures can differ. Both are preprocessed as in `worldflow collect` and scored
with `worldflow eval`'s own measures, the second future playing the dream and the first the truth.

A sampler that draws from the true distribution of futures scores this PSNR in expectation (its error
against the truth is that of two independent futures), plus the autoencoder's own error. So when this
number is close to the autoencoder ceiling, no sampled dream can come within 1 dB of that ceiling.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from worldflow.collect import make_env, resize_frames, write_json_atomic
from worldflow.evaluate import fidelity
from worldflow.pretrained import resolve_world
from worldflow.world_model import WorldFlowConfig


def two_futures(env, horizon: int, rng: np.random.Generator):
    """From env's current state: (the same `horizon` random actions played twice, each (H, obs...)), or
    None when either future ends the episode early. The env is left in the state it started from."""
    ale = env.unwrapped.ale
    state = ale.cloneState()  # without the RNG: each replay draws its own sticky-action coins
    actions = rng.integers(env.action_space.n, size=horizon)
    futures = []
    for _ in range(2):
        ale.restoreState(state)
        frames = []
        for a in actions:
            obs, _, terminated, truncated, _ = env.step(int(a))
            if terminated or truncated:
                ale.restoreState(state)
                return None
            frames.append(obs)
        futures.append(np.stack(frames))
    ale.restoreState(state)
    return futures


def finite_or_none(values):
    return [v if math.isfinite(v) else None for v in values]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="world whose real game to play (default: the embedded one)")
    parser.add_argument("--states", type=int, default=256)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--gap", type=int, default=10, help="random steps between measured states")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parents[2] / "bench" / "results" / "real_spread.json"))
    args = parser.parse_args()

    config = WorldFlowConfig.from_pretrained(resolve_world(args.checkpoint))
    env = make_env(config.env_id, **config.env_kwargs)
    size, rng = config.frame_size, np.random.default_rng(args.seed)
    obs, _ = env.reset(seed=args.seed)
    lasts, truths, others = [], [], []
    while len(truths) < args.states:
        for _ in range(args.gap):
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                obs, _ = env.reset()
        futures = two_futures(env, args.horizon, rng)
        if futures is not None:
            lasts.append(obs)
            truths.append(futures[0])
            others.append(futures[1])
    last, truth, other = (torch.from_numpy(resize_frames(np.stack(x), size)) for x in (lasts, truths, others))
    scores = fidelity(other, truth, last)
    differs = (truth != other).flatten(2).any(-1).float().mean(0).tolist()  # share of states whose futures differ

    print(f"{config.env_id} {config.env_kwargs}: {args.states} states, the same actions played twice")
    print(f"{'step':>4} {'PSNR':>7} {'PSNR changed':>13} {'SSIM':>6} {'futures differ':>15}")
    for h in range(args.horizon):
        print(f"{h + 1:>4} {scores['psnr'][h]:>7.2f} {scores['psnr_changed'][h]:>13.2f} {scores['ssim'][h]:>6.3f} "
              f"{differs[h]:>15.3f}")
    result = dict(env_id=config.env_id, env_kwargs=config.env_kwargs, states=args.states, horizon=args.horizon,
                  gap=args.gap, seed=args.seed, psnr=finite_or_none(scores["psnr"]),
                  psnr_changed=finite_or_none(scores["psnr_changed"]), ssim=scores["ssim"], futures_differ=differs)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
