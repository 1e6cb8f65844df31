"""Does Breakout's ball survive a dream? A game-specific check that full-frame PSNR cannot make: the
ball is 2-3 of 4,096 pixels.

    python docs/breakout_probes/breakout_ball.py [--checkpoint RUN_OR_CKPT] [--data data/breakout] [--temperature 1.0] [--denoiser flow-score]

From held-out clips whose last context frame shows a ball, it dreams 16 open-loop steps under the real
actions (flow-score denoiser unless told) and counts, per step, the real and dreamed frames that show a ball: 1-10
play-area pixels (between the bricks and the paddle, inside the walls) brighter than 20/255. It also
reports the median brightest play-area pixel of the real next frame, its autoencoder reconstruction,
and the dream's first step: which stage of the model loses the ball.

Bounces: a dream can keep a ball alive and still never pay for the paddle. A clip "bounces" when its
ball reaches the rows just above the paddle and soon flies at least 5 rows back up; the bench counts
the real clips that bounce and the dreams that do (run it on tracker data, where the paddle meets the
ball: `--data data/breakout_tracker`). Then it dreams the clips whose real ball bounced once more, with
the paddle driven away from the ball (LEFT or RIGHT throughout, same noise): in a world that models
the paddle, those dreams' balls fall through instead of bouncing. It also counts the clips whose real
ball came down and fell past the paddle, and how many of their dreams (real actions) bounce anyway.
Last, without a counterfactual: the first time each ball (real, or dreamed under the real actions)
comes down, was the paddle under it or beside it, and did it bounce? In real play the paddle's place
decides; in a world that has not learned the paddle, the dream bounces as often either way. The same
split once more one step ahead: the real frames up to each real contact, then the dream (drift before
the contact ruled out).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate

from worldflow.agents.scripted import LEFT, RIGHT, ball_position, paddle_centre
from worldflow.collect import write_json_atomic
from worldflow.data import ClipDataset
from worldflow.evaluate import rollout
from worldflow.pretrained import load_world
from worldflow.world_model import DENOISERS

PLAY_AREA = (slice(29, 56), slice(4, 60))  # rows between the bricks and the paddle, columns inside the walls
NEAR_PADDLE = 49  # play-area rows at or below this are the ball's last two steps before the paddle (row 57)
UNDER = 3  # a ball at most this many columns from the paddle's centre is over the paddle (about 7 wide)


def play_area(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., 64, 64, 3) -> each play-area pixel's brightest channel, flattened (..., pixels)."""
    area = frames[..., PLAY_AREA[0], PLAY_AREA[1], :].max(-1)
    return area.reshape(*area.shape[:-2], -1)


def brightest(frames: np.ndarray) -> np.ndarray:
    return play_area(frames).max(-1)


def shows_ball(frames: np.ndarray) -> np.ndarray:
    lit = (play_area(frames) > 20).sum(-1)
    return (lit >= 1) & (lit <= 10)


def ball_rows(frames: np.ndarray) -> np.ndarray:
    """uint8 (..., 64, 64, 3) -> the ball's mean row where a frame shows one, else nan (...)."""
    lit = frames[..., PLAY_AREA[0], PLAY_AREA[1], :].max(-1) > 20  # (..., rows, columns)
    rows = np.arange(PLAY_AREA[0].start, PLAY_AREA[0].stop, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore"):
        mean = (lit * rows).sum((-2, -1)) / lit.sum((-2, -1))
    return np.where(shows_ball(frames), mean, np.nan)


def away_from_ball(frames: np.ndarray) -> np.ndarray:
    """(B, 64, 64, 3) frames showing a ball -> (B,) the action that drives the paddle away from it."""
    return np.array([LEFT if ball_position(f)[1] > paddle_centre(f) else RIGHT for f in frames])


def flies_up_after(path: np.ndarray, i: int) -> bool:
    """Whether a ball path (T,) of rows (nan: unseen) is seen at least 5 rows above row path[i] within 5 steps
    of step i, with at most 2 steps unseen (while it overlaps the paddle). A new ball served after a lost
    life is unseen for longer."""
    later = path[i + 1:i + 6]
    seen_up = np.flatnonzero(later <= path[i] - 5)
    return bool(len(seen_up)) and bool(np.isnan(later[:seen_up[0]]).sum() <= 2)


def lowest_points(path: np.ndarray) -> np.ndarray:
    """A ball path (T,) of rows (nan: unseen) -> the steps where it comes down to the paddle: seen at or
    below NEAR_PADDLE, lower than the step before, and the next step not lower (back up, or out of sight)."""
    here, before, after = path[1:-1], path[:-2], path[2:]
    with np.errstate(invalid="ignore"):
        low = (here >= NEAR_PADDLE) & (before < here) & ~(after >= here)
    return np.flatnonzero(low) + 1


def bounces(frames: np.ndarray) -> np.ndarray:
    """(B, T, 64, 64, 3) -> (B,) whether the ball comes down to the paddle and flies back up: from some row at
    or below NEAR_PADDLE."""
    return np.array([any(flies_up_after(path, i) for i in np.flatnonzero(path >= NEAR_PADDLE))
                     for path in ball_rows(frames)], dtype=bool)


def first_contacts(frames: np.ndarray) -> list:
    """(B, T, 64, 64, 3) -> per clip, (step, |ball column - paddle centre|, flew back up) where its ball first
    comes down to the paddle: the step and the ball's column at the lowest row it is seen at, the paddle's
    one step later (at about the contact; in real play this gap tells more than the paddle's place a step
    before). None where the ball does not come down with 5 steps left to tell, or the ball or paddle is
    not found."""
    contacts = []
    for clip, path in zip(frames, ball_rows(frames)):
        low = np.flatnonzero(path >= NEAR_PADDLE)
        i = low[0] if len(low) else len(path)
        while i + 1 < len(path) and path[i + 1] >= path[i]:
            i += 1
        ball, paddle = (ball_position(clip[i]), paddle_centre(clip[i + 1])) if i < len(path) - 5 else (None, None)
        contacts.append(None if ball is None or paddle is None
                        else (int(i), float(abs(ball[1] - paddle)), flies_up_after(path, i)))
    return contacts


def bounce_by_gap(contacts: list) -> dict:
    """Contacts split by where the paddle was: under the ball (gap <= UNDER columns) or beside it (gap >= 6):
    how many of each, and how many bounced."""
    found = [c for c in contacts if c is not None]
    under = [bounced for _, gap, bounced in found if gap <= UNDER]
    beside = [bounced for _, gap, bounced in found if gap >= 6]
    return dict(paddle_under=len(under), bounced_under=int(sum(under)),
                paddle_beside=len(beside), bounced_beside=int(sum(beside)))


def load_breakout_world(checkpoint):
    """The world at `checkpoint` (None: the embedded one); an error unless it models Breakout, whose
    screen layout these checks read."""
    model, _, _ = load_world(checkpoint)
    if model.config.env_id != "ALE/Breakout-v5":
        raise SystemExit(f"this check reads Breakout's screen layout; the world models {model.config.env_id}")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="world (default: the embedded one)")
    parser.add_argument("--data", default="data/breakout", help="a Breakout collection; its held-out episodes are used")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--denoiser", default="flow-score", choices=DENOISERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parents[2] / "bench" / "results" / "breakout_ball.json"))
    args = parser.parse_args()

    model = load_breakout_world(args.checkpoint)
    K = model.config.context_frames
    clips = ClipDataset(args.data, K + args.horizon, "val")
    picks = [i for i in range(0, len(clips), 7) if shows_ball(clips[i]["frames"][K - 1].numpy())][:args.clips]
    batch = default_collate([clips[i] for i in picks])
    frames, actions = batch["frames"], batch["actions"]
    dream, _, _ = rollout(model, frames, actions, args.seed, args.denoiser, args.temperature, "jacobi")
    real = frames[:, K:].numpy()
    with torch.no_grad():
        rebuilt = model.latents_to_frames(model.frames_to_latents(frames[:, K:K + 1])).numpy()
    # the bounce may start in the context: follow the ball from the last context frame on
    real_seq = frames[:, K - 1:].numpy()
    dream_seq = np.concatenate([frames[:, K - 1:K].numpy(), dream.numpy()], axis=1)
    real_bounce, dream_bounce = bounces(real_seq), bounces(dream_seq)
    real_contacts, dream_contacts = first_contacts(real_seq), first_contacts(dream_seq)
    real_miss = np.array([c is not None and not c[2] for c in real_contacts])  # the ball fell past the paddle
    # the clips whose real ball bounced, dreamed twice with the same noise: real actions, paddle driven away
    away = torch.from_numpy(away_from_ball(frames[:, K - 1].numpy()))
    driven_away = torch.cat([actions[:, :K - 1], away[:, None].expand(-1, args.horizon)], dim=1)
    paired = {}
    for name, acts in (("real actions", actions), ("paddle driven away", driven_away)):
        d, _, _ = rollout(model, frames[real_bounce], acts[real_bounce], args.seed, args.denoiser, args.temperature,
                          "jacobi")
        paired[name] = int(bounces(np.concatenate([frames[real_bounce, K - 1:K].numpy(), d.numpy()], axis=1)).sum())
    # one step ahead: the real frames up to each real contact's lowest row, then 5 dreamed steps; split by the
    # real paddle's place, so a missing rule shows apart from drift before the contact
    near, one_step = [(b, c) for b, c in enumerate(real_contacts) if c is not None], []
    if near:
        at = torch.tensor([[c[0] + t for t in range(K + 5)] for _, c in near])  # (N, K + 5) frame indices
        rows = torch.tensor([b for b, _ in near])[:, None]
        d, _, _ = rollout(model, frames[rows, at], actions[rows, at[:, :-1]], args.seed, args.denoiser,
                          args.temperature, "jacobi")
        paths = ball_rows(np.concatenate([frames[rows, at[:, K - 1:K]].numpy(), d.numpy()], axis=1))
        one_step = [(c[0], c[1], flies_up_after(path, 0)) for (_, c), path in zip(near, paths)]
    result = dict(checkpoint=str(args.checkpoint or "default"), data=args.data, clips=len(picks),
                  temperature=args.temperature, denoiser=args.denoiser,
                  bounces=dict(real=int(real_bounce.sum()), dream=int(dream_bounce.sum()),
                               real_bounces_dreamed_again=paired, real_misses=int(real_miss.sum()),
                               dream_bounces_on_real_misses=int(dream_bounce[real_miss].sum())),
                  first_contact=dict(real=bounce_by_gap(real_contacts), dream=bounce_by_gap(dream_contacts),
                                     dream_from_the_real_contact=bounce_by_gap(one_step)),
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
    print(f"balls that come down to the paddle and fly back up: real {result['bounces']['real']}, dream "
          f"{result['bounces']['dream']}; of the {result['bounces']['real']} real bounces, dreamed again: {paired}; "
          f"of the {result['bounces']['real_misses']} real misses, dreams that bounce: "
          f"{result['bounces']['dream_bounces_on_real_misses']}")
    for name, c in result["first_contact"].items():
        print(f"{name}: first time the ball comes down, paddle under it (<= {UNDER} columns off) {c['paddle_under']}, "
              f"of which bounce {c['bounced_under']}; paddle beside it (>= 6 off) {c['paddle_beside']}, "
              f"of which bounce {c['bounced_beside']}")
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
