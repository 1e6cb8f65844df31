"""Dream throughput against this machine's limit: for each world, frames/s at batch 1 and 64, model
FLOPs per frame and the % of roofline (frames/s x GFLOP/frame / the 2048^2 fp32 matmul peak measured
in the same run); `gym.make("WorldFlow-v0")` at batch 1; whether the dream is still the one recorded
in bench/results/dream_reference.npz (PSNR of the same seeded dream against it); and, with --load,
the batch-1 dream's frames/s with one competing busy process per core beside it.

    python bench/env_throughput.py [--worlds default fast takecover] [--load]
        [--samplers jacobi sequential] [--denoisers flow-score tweedie none] [--env ALE/Breakout-v5]

--samplers/--denoisers add rows (Jacobi's first frames are compared with sequential inversion's
when both run); --env adds the real game's steps/s with the same preprocessing. --checkpoint-free
runs are not offered: an untrained flow is near the identity and flatters Jacobi.
"""

import argparse
import contextlib
import multiprocessing as mp
import os
import time
from pathlib import Path

import worldflow  # noqa: F401  (first: it sets OpenMP's barrier spin before torch loads the runtime)

import gymnasium as gym
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from worldflow.autoencoder import psnr
from worldflow.collect import make_env, resize_frames, write_json_atomic
from worldflow.pretrained import EMBEDDED_WORLDS, load_world

REFERENCE = Path(__file__).parent / "results" / "dream_reference.npz"


# FlopCounterMode knows the GPU attention kernels but counts the CPU one as 0 FLOPs, which left
# attention (half of a batch-64 deep-block pass) out of GFLOP/frame. PyTorch's own SDPA formula for
# it: dense QK^T and AV, as it counts the GPU kernels (the masked part of causal attention included).
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


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


def reference_dream(model, frames, actions, batch: int = 2, steps: int = 12) -> np.ndarray:
    """A fixed dream (seed 0, random actions, Jacobi, flow-score) from the world's first start contexts:
    (steps, batch, S, S, 3) uint8. A speed-up must leave it as it is (REFERENCE holds it as measured
    before the speed-ups of docs/throughput.md)."""
    g = torch.Generator().manual_seed(0)
    state = model.start(frames[:batch], actions[:batch], g)
    act = torch.randint(0, model.config.num_actions, (steps, batch), generator=g)
    return np.stack([model.sample_next(state, a, g).frames.numpy() for a in act])


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


def busy(_):
    while True:
        pass


@contextlib.contextmanager
def competing_load():
    """One busy process per core this process may run on, for the duration."""
    procs = [mp.get_context("spawn").Process(target=busy, args=(i,), daemon=True)
             for i in range(len(os.sched_getaffinity(0)))]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let them reach their loops
    try:
        yield len(procs)
    finally:
        for p in procs:
            p.terminate()
            p.join()


def reference_psnr(name, model, frames, actions) -> float | None:
    """Worst-frame PSNR of today's reference dream against the recorded one (99 dB: identical)."""
    recorded = np.load(REFERENCE)
    if name not in recorded.files:
        return None
    dream = torch.from_numpy(reference_dream(model, frames, actions))
    return psnr(dream.flatten(0, 1), torch.from_numpy(recorded[name]).flatten(0, 1)).clamp_max(99.0).min().item()


def batch1_jacobi_fps(rows) -> float:
    """The unloaded batch-1 frames/s with the envs' defaults (Jacobi, flow-score) that --load is compared with."""
    return next(r["frames_per_s"] for r in rows if r["batch"] == 1 and r["sampler"] == "jacobi"
                and r["denoiser"] == "flow-score")


def bench_world(name, args, peak) -> dict:
    model, frames, actions = load_world(name)
    model.requires_grad_(False)  # inference only (and FlopCounterMode's module hooks need it)
    rows, first_frames = [], {}
    for batch in (1, 64):
        steps = args.steps if batch == 1 else max(2, args.steps // 10)
        for sampler in sorted(args.samplers, reverse=True):  # sequential first: Jacobi is compared with it
            for denoiser in args.denoisers:
                fps, sweeps, first = time_dream(model, frames, actions, batch, sampler, denoiser, steps)
                fl = (float("nan") if denoiser == "tweedie"  # its autograd is not counted
                      else flops_per_frame(model, frames, actions, batch, sampler, denoiser, steps))
                row = dict(batch=batch, sampler=sampler, denoiser=denoiser, frames_per_s=fps, jacobi_sweeps=sweeps,
                           gflop_per_frame=fl / 1e9, roofline=fl * fps / (peak * 1e9))
                first_frames[batch, sampler, denoiser] = first
                if sampler == "jacobi" and (batch, "sequential", denoiser) in first_frames:
                    row.update(agreement(first, first_frames[batch, "sequential", denoiser]))
                rows.append(row)
                print(f"{name:>10} {batch:>5} {sampler:>10} {denoiser:>10} {fps:>9.1f} {sweeps:>7.1f} "
                      f"{fl / 1e9:>12.3f} {100 * row['roofline']:>9.1f}%")
    out = dict(world=name, rows=rows, reference_worst_psnr=reference_psnr(name, model, frames, actions),
               gym_make_frames_per_s=env_steps_per_s(name, 1, args.steps))
    if args.load:
        with competing_load() as n:
            loaded = time_dream(model, frames, actions, 1, "jacobi", "flow-score", args.steps)[0]
        out.update(busy_processes=n, loaded_batch1_frames_per_s=loaded, loaded_fraction=loaded / batch1_jacobi_fps(rows))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", nargs="+", default=list(EMBEDDED_WORLDS), help="embedded names or world folders")
    parser.add_argument("--steps", type=int, default=40, help="timed dream steps per row at batch 1 (a tenth at 64)")
    parser.add_argument("--samplers", nargs="+", default=["jacobi"], choices=["jacobi", "sequential"])
    parser.add_argument("--denoisers", nargs="+", default=["flow-score"], choices=["flow-score", "tweedie", "none"])
    parser.add_argument("--load", action="store_true", help="also time batch 1 beside one busy process per core")
    parser.add_argument("--env", default=None, help="also time this real game's steps/s (e.g. ALE/Breakout-v5)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "env_throughput.json"))
    args = parser.parse_args()
    if "jacobi" not in args.samplers or "flow-score" not in args.denoisers:
        parser.error("the rows include Jacobi with flow-score: the envs' defaults, which --load and the summary use")

    peak = matmul_peak_gflops()
    print(f"threads {torch.get_num_threads()}, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', 'unset')}; "
          f"2048^2 fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"{'world':>10} {'batch':>5} {'sampler':>10} {'denoiser':>10} {'frames/s':>9} {'sweeps':>7} "
          f"{'GFLOP/frame':>12} {'roofline':>10}")
    worlds = [bench_world(name, args, peak) for name in args.worlds]
    print(f"\n{'world':>10} {'gym.make fps':>13} {'dB vs reference':>16} {'batch-1 fps loaded / unloaded':>30}")
    for w in worlds:
        ref = "not recorded" if w["reference_worst_psnr"] is None else f"{w['reference_worst_psnr']:.1f}"
        load = (f"{w['loaded_batch1_frames_per_s']:.1f} / {batch1_jacobi_fps(w['rows']):.1f} "
                f"({100 * w['loaded_fraction']:.0f}%)"
                if args.load else "")
        print(f"{w['world']:>10} {w['gym_make_frames_per_s']:>13.1f} {ref:>16} {load:>30}")
    result = dict(matmul_peak_gflops=peak, threads=torch.get_num_threads(),
                  gomp_spincount=os.environ.get("GOMP_SPINCOUNT"), worlds=worlds)
    if args.env:
        result["real_env"] = {args.env: ale_steps_per_s(args.env)}
        print(f"real {args.env} with 64x64 preprocessing: {result['real_env'][args.env]:.0f} steps/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
