"""Does the world's likelihood know that Breakout's paddle returns the ball? Exact likelihood can ask
without sampling.

    python docs/breakout_probes/breakout_contact_nll.py [--checkpoint RUN_OR_CKPT] [--data DIR ...] [--split val|all]

From windows of held-out play (`--split all`: every episode of a collection made only to evaluate)
where the real ball comes down to the paddle in the last context frame and the paddle, under it,
sends it back up (a catch), it scores four versions of each window with the world's
exact per-frame log-density, all with the same actions and flow noise:

    real            the paddle under the ball (U), the ball flying back up (B)
    ball erased     U, the ball gone from the field in the frames after the contact (V: it vanished)
    paddle moved    the paddle's pixels moved at least 10 columns away from the ball in every frame (A), B
    both            A, V

and reports, in bits, how much moving the paddle shifts the world's preference for the bounce over
the vanished ball at each of the first `--scored` frames after the contact (each scored given the
context_frames - 1 frames before it, the window the world was trained on):

    D = [log p(B | U) - log p(V | U)] - [log p(B | A) - log p(V | A)]

In real Breakout D is unbounded (a ball never comes back up without the paddle); the bench also prints
the log-odds gap of the data's own contacts as its ball finder sees them (paddle within UNDER columns
against MIN_GAP or more away), the D of a world that had learned the rule that sharply. A world that
has not learned the rule has D about 0, except for what a ball costs it next to a paddle rather than
alone (each edit's own cost cancels out of the difference; this interaction does not). That is measured at the
contact frame itself, with the ball erased from there: the ball there was decided by the frames
before, not by where the paddle is, so a world's D at the contact frame is the interaction alone.
Control: windows whose ball stays far above the paddle, edited the same way (moved as far as the
catches were); there the paddle's place should not matter at all.

What D is not: the rule's strength. The erased ball is not what a miss looks like in its first frame
(a missed ball is still in view, falling past the paddle's rows), so with the paddle away both B and
V are pictures real play never shows. D is a fixed, sample-free measurement to compare worlds by; the
dreamed rule itself is measured by sampling (breakout_ball.py).

Misses (the paddle beside, the ball falling through) are not used: that ball passes through the
paddle's rows, so a paddle moved under it has to hide it or be drawn through, and either edit is a
picture real play never shows.
"""

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from worldflow.agents.scripted import LEFT_WALL, LIT, PADDLE_ROW, RIGHT_WALL, ball_position
from worldflow.collect import write_json_atomic
from worldflow.data import ClipDataset

from breakout_ball import (NEAR_PADDLE, PLAY_AREA, UNDER, ball_rows, flies_up_after, load_breakout_world,
                           lowest_points)

PADDLE_ROWS = slice(PADDLE_ROW, PADDLE_ROW + 2)  # the paddle is two rows of the 64x64 frame
AFTER = 5  # steps scored after the contact (flies_up_after looks 5 ahead)
MIN_GAP = 10  # a moved paddle is at least this many columns from the ball at the contact


def paddle_span(frame: np.ndarray) -> tuple[int, int] | None:
    """The paddle's [first, last] column, or None unless its rows hold exactly one run of lit columns,
    4-8 wide and clear of both walls (a ball touching it, or a paddle pinned to a wall, which the actions
    could not have moved, is left out)."""
    lit = frame[PADDLE_ROWS, LEFT_WALL:RIGHT_WALL].max(-1).max(0) > LIT
    edges = np.flatnonzero(np.diff(np.concatenate([[0], lit.astype(np.int8), [0]])))
    if len(edges) != 2:
        return None
    first, last = edges[0] + LEFT_WALL, edges[1] - 1 + LEFT_WALL
    if not 4 <= last - first + 1 <= 8 or first == LEFT_WALL or last == RIGHT_WALL - 1:
        return None
    return int(first), int(last)


def move_paddle(frames: np.ndarray, shift: int) -> np.ndarray:
    """(T, 64, 64, 3) frames with the paddle moved `shift` columns in each, its old place left dark."""
    out = frames.copy()
    for frame, real in zip(out, frames):
        first, last = paddle_span(real)
        frame[PADDLE_ROWS, first:last + 1] = 0
        frame[PADDLE_ROWS, first + shift:last + 1 + shift] = real[PADDLE_ROWS, first:last + 1]
    return out


def erase_ball(frames: np.ndarray, start: int) -> np.ndarray:
    """(..., T, 64, 64, 3) frames with the field between the bricks and the paddle emptied from frame
    `start` on, down to the row right above the paddle where a ball touching it is drawn (the
    background is black)."""
    out = frames.copy()
    out[..., start:, PLAY_AREA[0].start:PADDLE_ROW, PLAY_AREA[1], :] = 0
    return out


def shift_that_fits(spans: list, wanted: list) -> int | None:
    """The first shift in `wanted` that keeps the paddle's spans clear of both walls."""
    for s in wanted:
        if all(first + s > LEFT_WALL and last + s < RIGHT_WALL - 1 for first, last in spans):
            return s
    return None


def find_window(frames: np.ndarray, path: np.ndarray, spans: list, K: int):
    """A window: frames (K + AFTER, 64, 64, 3), its ball rows and paddle spans -> ("contact", gap, bounced),
    ("control", None, None) or None.

    A contact: the ball is seen falling to its lowest row (>= NEAR_PADDLE) in the last context frame; its
    gap is its column's distance from the paddle's centre a step later (as breakout_ball.first_contacts
    measures it), and it bounced if it flies back up. A control: the ball in view and far above the paddle
    in every frame."""
    if any(s is None for s in spans):
        return None
    if np.all(path <= NEAR_PADDLE - 5):
        return "control", None, None
    if K - 1 not in lowest_points(path):
        return None
    first, last = spans[K]
    return "contact", ball_position(frames[K - 1])[1] - (first + last) / 2, flies_up_after(path, K - 1)


def shifts_away(gap: float) -> list:
    """Shifts that leave the paddle at least MIN_GAP columns from the ball, nearest first, the side it
    is already on first."""
    away = [int(math.copysign(d, -gap if gap else 1)) for d in range(math.ceil(MIN_GAP + abs(gap)), 40)]
    return away + [-s for s in away if abs(gap + s) >= MIN_GAP]


def frame_log_prob(model, frames: torch.Tensor, actions: torch.Tensor, t: int) -> torch.Tensor:
    """log p (nats, (B,)) of frame t given the context_frames - 1 frames before it: the window the world
    was trained on (clips of context_frames), not the whole clip, whose attention would reach further
    back than training ever did. The flow's noise is seeded by t, the same for every version."""
    start = t - model.config.context_frames + 1
    return model.frame_log_probs(frames[:, start:t + 1], actions[:, start:t], torch.Generator().manual_seed(t))[:, -1]


def preference_shift(model, real: np.ndarray, moved: np.ndarray, actions: torch.Tensor, t: int, erase_from: int):
    """D at frame t, in bits (B,): [log p(real) - log p(ball erased)] - [the same with the paddle moved],
    the ball erased from frame `erase_from` on."""
    lp = [frame_log_prob(model, torch.from_numpy(v), actions, t)
          for v in (real, erase_ball(real, erase_from), moved, erase_ball(moved, erase_from))]
    return ((lp[0] - lp[1]) - (lp[2] - lp[3])) / math.log(2)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="world (default: the embedded one)")
    parser.add_argument("--data", nargs="+", default=["data/breakout_tracker", "data/breakout_offset"],
                        help="Breakout collections where the paddle returns the ball (their held-out episodes, or "
                             "all with --split all)")
    parser.add_argument("--split", default="val", choices=("val", "all"),
                        help="the held-out episodes, or all of them (for a collection made only to evaluate)")
    parser.add_argument("--catches", type=int, default=512, help="at most this many catch windows")
    parser.add_argument("--controls", type=int, default=128)
    parser.add_argument("--scored", type=int, default=2, choices=range(1, AFTER + 1),
                        help="frames after the contact to score (the first two show the bounce or its absence)")
    parser.add_argument("--identity-flow", action="store_true",
                        help="zero every flow block's head first: the same autoencoder and Gaussian prior with no "
                             "dynamics at all, whose D is what the edited pixels alone give")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parents[2] / "bench" / "results" / "breakout_contact_nll.json"))
    args = parser.parse_args()

    model = load_breakout_world(args.checkpoint)
    if args.identity_flow:
        with torch.no_grad():
            for block in [*model.shallow, model.deep]:
                block.head.weight.zero_(), block.head.bias.zero_()  # each block the identity, as at its init
    K = model.config.context_frames
    T = K + AFTER
    clips = ClipDataset(args.data, T, args.split)
    # each episode's ball rows and paddle spans, once
    paths = [ball_rows(ep["frames"]) for ep in clips.episodes]
    spans = [[paddle_span(f) for f in ep["frames"]] for ep in clips.episodes]
    cases, controls = dict(catch=[], control=[]), []  # (clip index, shift)
    bounced_by_place = dict(under=[], away=[])  # every contact: the data's own rule, for scale
    for i, (e, s) in enumerate(clips.index):
        window_spans = spans[e][s:s + T]
        kind, gap, bounced = find_window(clips.episodes[e]["frames"][s:s + T], paths[e][s:s + T], window_spans, K) \
            or (None, None, None)
        if kind == "control":
            controls.append((i, window_spans))
        if kind != "contact":
            continue
        if abs(gap) <= UNDER or abs(gap) >= MIN_GAP:
            bounced_by_place["under" if abs(gap) <= UNDER else "away"].append(bounced)
        shift = shift_that_fits(window_spans, shifts_away(gap)) if bounced and abs(gap) <= UNDER else None
        overlaps = bool(cases["catch"]) and i - cases["catch"][-1][0] < T  # catches' windows do not overlap
        if shift is not None and len(cases["catch"]) < args.catches and not overlaps:
            cases["catch"].append((i, shift))
    if not cases["catch"]:
        raise SystemExit(f"no catch in {args.data} ({args.split}): collect tracker play "
                         "(`worldflow collect --policy tracker`)")
    rng = np.random.default_rng(0)
    for k in rng.permutation(len(controls)):  # controls moved as far as the catches were
        i, window_spans = controls[k]
        size = abs(cases["catch"][len(cases["control"]) % len(cases["catch"])][1])
        shift = shift_that_fits(window_spans, [size, -size])
        if shift is not None:
            cases["control"].append((i, shift))
        if len(cases["control"]) >= args.controls:
            break

    # the data's own rule on the same scale: the log-odds of a bounce, paddle under against paddle away
    rate = {k: (sum(v) + 0.5) / (len(v) + 1) for k, v in bounced_by_place.items()}  # (Jeffreys-smoothed)
    data_bits = math.log2(rate["under"] / (1 - rate["under"])) - math.log2(rate["away"] / (1 - rate["away"]))
    result = dict(checkpoint=str(args.checkpoint or "default"), identity_flow=args.identity_flow, data=args.data,
                  split=args.split, steps_scored=args.scored,
                  data_contacts={k: dict(count=len(v), bounced=int(sum(v))) for k, v in bounced_by_place.items()},
                  data_log_odds_bits=data_bits, cases={})
    frames_scored = ["contact"] + [f"after {j + 1}" for j in range(args.scored)]
    columns = frames_scored + ["after, summed"]
    for name, chosen in cases.items():
        d_by_frame = {f: [] for f in frames_scored}  # D per clip at each frame, in bits
        for b in range(0, len(chosen), args.batch):
            part = chosen[b:b + args.batch]
            real = np.stack([clips[i]["frames"].numpy() for i, _ in part])
            moved = np.stack([move_paddle(f, s) for f, (_, s) in zip(real, part)])
            actions = torch.stack([clips[i]["actions"] for i, _ in part])
            # the contact frame itself: the paddle has decided nothing yet, so a world's D there is what
            # a ball beside a paddle costs it, not the rule
            d_by_frame["contact"] += preference_shift(model, real, moved, actions, K - 1, K - 1).tolist()
            for j in range(args.scored):
                d_by_frame[f"after {j + 1}"] += preference_shift(model, real, moved, actions, K + j, K).tolist()
        d = np.array([d_by_frame[f] for f in frames_scored])  # (frames, clips)
        d = np.concatenate([d, d[1:].sum(0, keepdims=True)])
        result["cases"][name] = dict(count=len(chosen), shifts=[s for _, s in chosen], D_bits=dict(
            (f, dict(mean=float(v.mean()), stderr=float(v.std(ddof=1) / math.sqrt(len(v))), per_clip=v.tolist()))
            for f, v in zip(columns, d)))
    world = f"{args.checkpoint or 'default'}{' (flow set to the identity)' * args.identity_flow}"
    print(f"world {world}, {' '.join(args.data)} ({args.split}). D, in bits: how much more "
          f"the world prefers a ball that is there to an erased one with the paddle under it than with the paddle "
          f"moved away, at the contact frame and at each frame after it (mean ± s.e.)")
    print("| windows | count | " + " | ".join(columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for name, r in result["cases"].items():
        print(f"| {name} | {r['count']} | " + " | ".join(
            f"{r['D_bits'][f]['mean']:+.1f} ± {r['D_bits'][f]['stderr']:.1f}" for f in columns) + " |")
    c = result["data_contacts"]
    print(f"In the data, of the contacts with the paddle under the ball (<= {UNDER} columns) "
          f"{c['under']['bounced']} of {c['under']['count']} bounced; with it {MIN_GAP}+ columns away, "
          f"{c['away']['bounced']} of {c['away']['count']}: a log-odds gap of {data_bits:.1f} bits, what D would be "
          f"for a world that had learned the rule as sharply as this bench's ball finder sees it")
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
