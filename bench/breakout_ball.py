"""Does Breakout's ball survive a dream? A game-specific check that full-frame PSNR cannot make: the
ball is 2-3 of 4,096 pixels.

    python bench/breakout_ball.py [--checkpoint RUN_OR_CKPT] [--data data/breakout] [--temperature 1.0]

From held-out clips whose last context frame shows a ball, it dreams 16 open-loop steps under the real
actions (flow-score denoiser) and counts, per step, the real and dreamed frames that show a ball: 1-10
play-area pixels (between the bricks and the paddle, inside the walls) brighter than 20/255. It also
reports the median brightest play-area pixel of the real next frame, its autoencoder reconstruction,
and the dream's first step: which stage of the model loses the ball.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from worldflow.collect import write_json_atomic
from worldflow.data import ClipDataset
from worldflow.evaluate import rollout
from worldflow.pretrained import load_world

PLAY_AREA = (slice(29, 56), slice(4, 60))  # rows between the bricks and the paddle, columns inside the walls


def play_area(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., 64, 64, 3) -> each play-area pixel's brightest channel, flattened (..., pixels)."""
    area = frames[..., PLAY_AREA[0], PLAY_AREA[1], :].max(-1)
    return area.reshape(*area.shape[:-2], -1)


def brightest(frames: np.ndarray) -> np.ndarray:
    return play_area(frames).max(-1)


def shows_ball(frames: np.ndarray) -> np.ndarray:
    lit = (play_area(frames) > 20).sum(-1)
    return (lit >= 1) & (lit <= 10)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="world (default: the embedded one)")
    parser.add_argument("--data", default="data/breakout", help="a Breakout collection; its held-out episodes are used")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "breakout_ball.json"))
    args = parser.parse_args()

    model, _, _ = load_world(args.checkpoint)
    if model.config.env_id != "ALE/Breakout-v5":
        raise SystemExit(f"this check reads Breakout's screen layout; the world models {model.config.env_id}")
    K = model.config.context_frames
    clips = ClipDataset(args.data, K + args.horizon, "val")
    picks = [i for i in range(0, len(clips), 7) if shows_ball(clips[i]["frames"][K - 1].numpy())][:args.clips]
    batch = default_collate([clips[i] for i in picks])
    frames, actions = batch["frames"], batch["actions"]
    dream, _, _ = rollout(model, frames, actions, args.seed, "flow-score", args.temperature, "jacobi")
    real = frames[:, K:].numpy()
    with torch.no_grad():
        rebuilt = model.latents_to_frames(model.frames_to_latents(frames[:, K:K + 1])).numpy()
    result = dict(checkpoint=str(args.checkpoint or "default"), clips=len(picks), temperature=args.temperature,
                  real_with_ball=shows_ball(real).sum(0).tolist(),
                  dream_with_ball=shows_ball(dream.numpy()).sum(0).tolist(),
                  median_brightest=dict(real=float(np.median(brightest(real[:, 0]))),
                                        autoencoder=float(np.median(brightest(rebuilt[:, 0]))),
                                        dream_step_1=float(np.median(brightest(dream[:, 0].numpy())))))
    print(f"{len(picks)} held-out clips with a ball in the last context frame; frames showing a ball, steps 1..{args.horizon}:")
    print("| frames | " + " | ".join(str(h + 1) for h in range(args.horizon)) + " |")
    print("|---|" + "---:|" * args.horizon)
    for name in ("real", "dream"):
        print(f"| {name} | " + " | ".join(str(v) for v in result[f"{name}_with_ball"]) + " |")
    print("median brightest play-area pixel at step 1 (real ball ~100/255):", result["median_brightest"])
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
