"""Cut every paddle contact out of Breakout collections into a dataset of its own: training data for
an experiment that oversamples the moment the world has not learned (see breakout_contact_nll.py).

    python docs/breakout_probes/breakout_contact_clips.py --data data/breakout_tracker data/breakout_offset \
        --out data/breakout_contacts

From the training episodes only (the held-out ones stay unseen), each contact (breakout_ball.lowest_points:
the ball seen falling to its lowest row at or below NEAR_PADDLE, then not lower) becomes one episode of
`--before` frames up to it and `--after` frames past it, caught or missed alike, written in
`worldflow collect`'s shard format. Pooled with the collections it came from
(`worldflow train --data A B data/breakout_contacts`), each contact is in more of the training windows.
"""

import argparse
from pathlib import Path

import numpy as np

from worldflow.collect import SHARD_DIR, write_atomic, write_json_atomic
from worldflow.data import as_roots, load_manifest, split_shards

from breakout_ball import ball_rows, lowest_points

FIELDS = ("actions", "rewards", "terminated", "truncated")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="Breakout collections (one game)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--before", type=int, default=7, help="frames up to and including the contact (with "
                        "--after 5, every 8-frame training window holds the contact and a frame after it)")
    parser.add_argument("--after", type=int, default=5, help="frames after it")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as the training run's train.val_fraction")
    args = parser.parse_args()

    manifest = load_manifest(as_roots(args.data))
    if manifest["env_id"] != "ALE/Breakout-v5":
        raise SystemExit(f"this reads Breakout's screen layout; {args.data} holds {manifest['env_id']}")
    out = Path(args.out)
    if (out / "manifest.json").exists():
        raise SystemExit(f"{out} already holds a dataset: use another --out")
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    written = 0
    for root in as_roots(args.data):
        for shard in split_shards(root, "train", args.val_fraction):
            with np.load(shard) as f:
                episode = {k: f[k] for k in ("frames", "lives", *FIELDS)}
            for c in lowest_points(ball_rows(episode["frames"])):
                start, stop = c - args.before + 1, c + args.after + 1  # frames [start, stop)
                if start < 0 or stop > len(episode["frames"]):
                    continue
                # lives per frame; a life lost after the cut is not in the clip (its last steps look safe)
                snippet = dict(frames=episode["frames"][start:stop], lives=episode["lives"][start:stop],
                               **{k: episode[k][start:stop - 1] for k in FIELDS})
                # truncated, not terminated, at its cut: the game went on
                snippet["truncated"] = snippet["truncated"].copy()
                snippet["truncated"][-1] = not snippet["terminated"][-1]
                write_atomic(out / SHARD_DIR / f"w00-e{written:06d}.npz",
                             lambda fh, d=snippet: np.savez_compressed(fh, **d))
                written += 1
    manifest = {k: v for k, v in manifest.items() if k != "datasets"}
    write_json_atomic(out / "manifest.json", dict(manifest, policy="contacts", before=args.before, after=args.after,
                                                  source=[str(r) for r in as_roots(args.data)]))
    print(f"wrote {written} contact clips of {args.before + args.after} frames to {out}")


if __name__ == "__main__":
    main()
