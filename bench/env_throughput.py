"""Dream throughput: frames/s at batch 1 and 64, Jacobi vs sequential, each denoiser; model FLOPs per
frame and the fraction of this machine's matmul peak (measured in the same run); how closely Jacobi's
frames match sequential inversion's (the first dream step of each row, same state and noise); the
environments themselves as a user steps them (`gym.make` and `gym.make_vec` with 64 envs, random
actions, the env's defaults: Jacobi, flow-score); and the real ALE environment's steps/s with the
same preprocessing.

    python bench/env_throughput.py [--checkpoint RUN_OR_CKPT_OR_NAME] [--config configs/breakout.yaml]

Without a checkpoint (and with no default world installed) it times a freshly initialised model of
the config: its flow is near the identity, so Jacobi converges in ~1 sweep and its speed is
flattered. The table says which was measured.
"""

import argparse
import contextlib
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from worldflow.autoencoder import psnr
from worldflow.collect import make_env, resize_frames, write_json_atomic
from worldflow.config import load_config
from worldflow.pretrained import DEFAULT_WORLD, load_world
from worldflow.world_model import WorldFlowConfig, WorldFlowModel


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def fresh_model(config_path: str):
    cfg = load_config(config_path)
    model = WorldFlowModel(WorldFlowConfig(frame_size=64, num_actions=4, **cfg.to_dict()["model"])).eval()
    frames = torch.randint(0, 255, (4, cfg.model.context_frames, 64, 64, 3), dtype=torch.uint8)
    return model, frames, torch.randint(0, 4, (4, cfg.model.context_frames - 1))


def batch_of(frames, actions, batch):
    """The start contexts repeated to `batch` rows."""
    reps = (batch + len(frames) - 1) // len(frames)
    return frames.repeat(reps, 1, 1, 1, 1)[:batch], actions.repeat(reps, 1)[:batch]


def time_dream(model, frames, actions, batch, sampler, denoiser, steps, counter=None):
    """frames/s and mean Jacobi sweeps over `steps` dream steps after a warm-up, and the warm-up step's
    frames (batch, S, S, 3). The same steps every call (fixed seeds): the warm-up step starts every
    sampler from the same state with the same noise, and a second call under a FlopCounterMode
    `counter` counts exactly the timed work."""
    g = torch.Generator().manual_seed(0)
    state = model.start(*batch_of(frames, actions, batch), g)
    act = torch.randint(0, model.config.num_actions, (steps + 1, batch), generator=g)
    first = model.sample_next(state, act[0], g, sampler, denoiser).frames  # warm-up
    iters = []
    with counter or contextlib.nullcontext():
        t0 = time.perf_counter()
        for i in range(steps):
            iters.append(model.sample_next(state, act[i + 1], g, sampler, denoiser).iterations)
        dt = time.perf_counter() - t0
    return batch * steps / dt, sum(iters) / len(iters), first


def flops_per_frame(model, frames, actions, batch, sampler, denoiser, steps) -> float:
    """The FLOPs of the steps `time_dream` times, per frame (a batch's rows need different sweeps)."""
    counter = FlopCounterMode(display=False)
    time_dream(model, frames, actions, batch, sampler, denoiser, steps, counter)
    return counter.get_total_flops() / (batch * steps)


def agreement(jacobi_frames: torch.Tensor, sequential_frames: torch.Tensor) -> dict:
    """How equal the two samplers' outputs are: PSNR of Jacobi's frames against sequential's (mean and
    worst row) and the largest pixel difference, from the same state and noise."""
    p = psnr(jacobi_frames, sequential_frames).clamp_max(99.0)  # identical frames: 99 dB
    return dict(psnr_vs_sequential=p.mean().item(), worst_psnr_vs_sequential=p.min().item(),
                max_pixel_diff=(jacobi_frames.int() - sequential_frames.int()).abs().max().item())


def env_steps_per_s(checkpoint, num_envs: int, steps: int) -> float:
    """Frames/s of gym.make("WorldFlow-v0") (num_envs 1) or its native vector env, random actions, after
    one warm-up step: what a user's loop gets, autoresets and numpy conversions included."""
    env = (gym.make("WorldFlow-v0", checkpoint=checkpoint) if num_envs == 1
           else gym.make_vec("WorldFlow-v0", num_envs=num_envs, checkpoint=checkpoint))
    env.reset(seed=0)
    n_actions = (env.action_space if num_envs == 1 else env.single_action_space).n
    actions = np.random.default_rng(0).integers(0, n_actions, (steps + 1, num_envs))
    step = (lambda a: env.step(int(a[0]))) if num_envs == 1 else env.step
    step(actions[0])
    t0 = time.perf_counter()
    for a in actions[1:]:
        step(a)
    return num_envs * steps / (time.perf_counter() - t0)


def ale_steps_per_s(env_id: str, steps: int = 1000) -> float:
    env = make_env(env_id)
    env.reset(seed=0)
    t0 = time.perf_counter()
    for _ in range(steps):
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        resize_frames(obs, 64)
        if term or trunc:
            env.reset()
    return steps / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--config", default="configs/breakout.yaml", help="used when no checkpoint exists")
    parser.add_argument("--steps", type=int, default=40, help="timed dream steps per row at batch 1 (a tenth at 64)")
    parser.add_argument("--env", default="ALE/Breakout-v5")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "env_throughput.json"))
    args = parser.parse_args()

    trained = bool(args.checkpoint) or (DEFAULT_WORLD / "model.safetensors").exists()
    if trained:
        model, frames, actions = load_world(args.checkpoint)
        source = str(args.checkpoint or DEFAULT_WORLD)
    else:
        model, frames, actions = fresh_model(args.config)
        source = f"UNTRAINED {args.config} (Jacobi flattered: near-identity flow)"
    model.requires_grad_(False)  # inference only (and FlopCounterMode's module hooks need it)
    peak = matmul_peak_gflops()
    print(f"model: {source}; {model.tokens_per_frame} tokens/frame; threads {torch.get_num_threads()}; "
          f"2048^2 fp32 matmul peak {peak:.0f} GFLOP/s")
    rows, first_frames = [], {}
    print(f"{'batch':>5} {'sampler':>10} {'denoiser':>10} {'frames/s':>9} {'sweeps':>7} {'GFLOP/frame':>12} {'% peak':>7} "
          f"{'dB vs seq (worst)':>18}")
    for batch in (1, 64):
        for sampler in ("sequential", "jacobi"):  # sequential first: Jacobi's rows are compared with it
            for denoiser in ("flow-score", "tweedie", "none"):
                steps = args.steps if batch == 1 else max(2, args.steps // 10)
                fps, sweeps, first = time_dream(model, frames, actions, batch, sampler, denoiser, steps)
                fl = (float("nan") if denoiser == "tweedie"  # its autograd is not counted
                      else flops_per_frame(model, frames, actions, batch, sampler, denoiser, steps))
                row = dict(batch=batch, sampler=sampler, denoiser=denoiser, frames_per_s=fps, jacobi_sweeps=sweeps,
                           gflop_per_frame=fl / 1e9, fraction_of_peak=fl * fps / (peak * 1e9))
                first_frames[batch, sampler, denoiser] = first
                if sampler == "jacobi":
                    row.update(agreement(first, first_frames[batch, "sequential", denoiser]))
                rows.append(row)
                match = (f"{row['psnr_vs_sequential']:>10.1f} ({row['worst_psnr_vs_sequential']:.1f})"
                         if sampler == "jacobi" else "")
                print(f"{batch:>5} {sampler:>10} {denoiser:>10} {fps:>9.1f} {sweeps:>7.1f} {fl / 1e9:>12.3f} "
                      f"{100 * row['fraction_of_peak']:>6.1f}% {match:>18}")
    envs = {}
    if trained:  # the envs load a world themselves: a fresh model has none to load
        for n in (1, 64):
            envs[n] = env_steps_per_s(args.checkpoint, n, args.steps if n == 1 else max(2, args.steps // 10))
            print(f"{'gym.make' if n == 1 else 'gym.make_vec, 64 envs'} (jacobi, flow-score): {envs[n]:.1f} frames/s")
    ale = ale_steps_per_s(args.env)
    print(f"real {args.env} with 64x64 preprocessing: {ale:.0f} steps/s")
    speedups = {f"batch{b}_{d}": next(r["frames_per_s"] for r in rows if r["batch"] == b and r["sampler"] == "jacobi"
                                      and r["denoiser"] == d) /
                next(r["frames_per_s"] for r in rows if r["batch"] == b and r["sampler"] == "sequential"
                     and r["denoiser"] == d) for b in (1, 64) for d in ("flow-score", "none")}
    print("Jacobi / sequential speedup: " + ", ".join(f"{k} {v:.1f}x" for k, v in speedups.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), dict(model=source, matmul_peak_gflops=peak, rows=rows,
                                           env_frames_per_s={f"num_envs_{n}": v for n, v in envs.items()},
                                           ale_steps_per_s=ale, jacobi_speedup=speedups,
                                           threads=torch.get_num_threads()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
