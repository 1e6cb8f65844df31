"""Training throughput of a config on this machine: autoencoder and flow steps, clips/s and frames/s.

Collects a small real dataset first (ALE Breakout by default), then times steps after a warm-up.

    python bench/train_throughput.py --config configs/breakout.yaml
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from worldflow.collect import collect, write_json_atomic
from worldflow.config import load_config
from worldflow.train import Trainer


def time_steps(step_fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step_fn()
    t0 = time.perf_counter()
    for _ in range(n):
        step_fn()
    return (time.perf_counter() - t0) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/breakout.yaml")
    parser.add_argument("--env", default="ALE/Breakout-v5")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per stage")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = parser.parse_args()

    cfg = load_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        collect(args.env, 1500, f"{tmp}/data", progress=False)
        trainer = Trainer(cfg, f"{tmp}/data", f"{tmp}/run")
        trainer.model.train()
        ae_s = time_steps(trainer.ae_step, args.steps)
        trainer.step = cfg.train.ae_steps
        trainer.fit_latent_stats()
        flow_s = time_steps(trainer.flow_step, args.steps)
    m, t = trainer.model, cfg.train
    n_params = {name: sum(p.numel() for p in getattr(m, name).parameters()) for name in ("ae", "shallow", "deep", "denoiser")}
    tokens = t.batch_size * t.clip_frames * (m.tokens_per_frame + 1)
    rows = [dict(stage="autoencoder", s_per_step=ae_s, clips_per_s=t.batch_size / ae_s,
                 frames_per_s=t.batch_size * t.clip_frames / ae_s),
            dict(stage="flow+heads+denoiser", s_per_step=flow_s, clips_per_s=t.batch_size / flow_s,
                 frames_per_s=t.batch_size * t.clip_frames / flow_s,
                 flow_tokens_per_s=tokens * (len(m.shallow) + 1) / flow_s)]
    print(f"config {args.config}: batch {t.batch_size} clips x {t.clip_frames} frames, "
          f"{m.tokens_per_frame} tokens/frame of dim {m.token_dim}; params {n_params}; threads {torch.get_num_threads()}")
    print(f"{'stage':<22}{'s/step':>8}{'clips/s':>9}{'frames/s':>10}")
    for r in rows:
        print(f"{r['stage']:<22}{r['s_per_step']:>8.3f}{r['clips_per_s']:>9.1f}{r['frames_per_s']:>10.1f}")
    est = cfg.train.ae_steps * ae_s + cfg.train.flow_steps * flow_s
    print(f"the full schedule ({cfg.train.ae_steps} AE + {cfg.train.flow_steps} flow steps) would take {est / 3600:.1f} h")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), dict(config=args.config, params=n_params, threads=torch.get_num_threads(),
                                           rows=rows, full_schedule_hours=est / 3600))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
