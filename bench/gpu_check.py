"""The GPU check: train on CUDA, reload on CPU, and time dreams on CUDA (under 8 minutes on one GPU).

    python bench/gpu_check.py [--train-steps 300] [--out bench/results/gpu_check.json]

1. Collects 1,500 real Breakout steps, trains configs/tiny.yaml for --train-steps flow steps on CUDA
   (bf16 autocast, the CUDA default) and reports training tokens/s.
2. Reloads the checkpoint on the CPU and on CUDA and compares the exact log-likelihood of the same
   real clips (same noise: a CPU generator): the relative difference must be float-small.
3. Dream frames/s of every embedded world at batch 1, 64 and 1024 (Jacobi, flow-score denoiser), the
   model on CUDA, as WorldFlowVectorEnv runs it without its numpy boundary.
Prints a table and writes JSON. Exits with an error, not a silent CPU run, when there is no GPU.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from worldflow.collect import collect, write_json_atomic
from worldflow.config import load_config
from worldflow.data import ClipDataset, spread_clips
from worldflow.pretrained import EMBEDDED_WORLDS, load_world
from worldflow.train import Trainer
from worldflow.world_model import WorldFlowModel

TINY = Path(__file__).parent.parent / "configs" / "tiny.yaml"


def train_on_cuda(data: str, run: str, steps: int) -> dict:
    """The tiny config's autoencoder briefly, then `steps` timed flow steps on CUDA, saved to `run`."""
    cfg = load_config(TINY)
    cfg.train.ae_steps, cfg.train.flow_steps = 50, steps
    trainer = Trainer(cfg, data, run, device="cuda")
    trainer.model.train()
    for trainer.step in range(cfg.train.ae_steps):
        trainer.ae_step()
    trainer.step = cfg.train.ae_steps
    trainer.fit_latent_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.flow_step()
        trainer.step += 1
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    trainer.save()
    m, t = trainer.model, cfg.train
    tokens = steps * t.batch_size * t.clip_frames * (m.tokens_per_frame + 1) * (len(m.shallow) + 1)
    return dict(flow_steps=steps, seconds=seconds, autocast_bf16=trainer.autocast, flow_tokens_per_s=tokens / seconds)


def same_likelihood(run: str, data: str) -> dict:
    clips = spread_clips(ClipDataset(data, 4, "all"), 8)
    out = {}
    for device in ("cpu", "cuda"):
        model = WorldFlowModel.from_pretrained(Path(run) / "latest").to(device).eval()
        with torch.no_grad():
            out[device] = model.log_prob(clips["frames"], clips["actions"], torch.Generator().manual_seed(0)).cpu()
    diff = ((out["cpu"] - out["cuda"]).abs() / out["cpu"].abs().clamp_min(1)).max().item()
    return dict(log_prob_cpu=out["cpu"].tolist(), log_prob_cuda=out["cuda"].tolist(), max_relative_difference=diff)


@torch.no_grad()
def dream_fps(world: str, batch: int, steps: int) -> float:
    model, frames, actions = load_world(world, "cuda")
    reps = -(-batch // len(frames))
    f, a = frames.repeat(reps, 1, 1, 1, 1)[:batch], actions.repeat(reps, 1)[:batch]
    g = torch.Generator(device="cuda").manual_seed(0)
    state = model.start(f, a, g)
    act = torch.randint(0, model.config.num_actions, (steps + 2, batch), generator=torch.Generator().manual_seed(0))
    for t in range(2):  # warm-up
        model.sample_next(state, act[t], g)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for t in range(2, steps + 2):
        model.sample_next(state, act[t], g)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--dream-steps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: this torch sees no CUDA GPU (install a CUDA build of torch)")
    result = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        collect("ALE/Breakout-v5", 1500, f"{tmp}/data", progress=False)
        result["train"] = train_on_cuda(f"{tmp}/data", f"{tmp}/run", args.train_steps)
        result["reload"] = same_likelihood(f"{tmp}/run", f"{tmp}/data")
    print(f"{result['gpu']}: tiny trained {args.train_steps} flow steps in {result['train']['seconds']:.1f} s, "
          f"{result['train']['flow_tokens_per_s']:.0f} tokens/s (bf16 {result['train']['autocast_bf16']}); CPU vs CUDA log-likelihood max relative difference "
          f"{result['reload']['max_relative_difference']:.2e}")
    result["dream_frames_per_s"] = {}
    print(f"{'world':<12}{'batch 1':>10}{'batch 64':>10}{'batch 1024':>12}")
    for world in EMBEDDED_WORLDS:
        row = {b: dream_fps(world, b, args.dream_steps) for b in (1, 64, 1024)}
        result["dream_frames_per_s"][world] = row
        print(f"{world:<12}{row[1]:>10.1f}{row[64]:>10.1f}{row[1024]:>12.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
