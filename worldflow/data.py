"""Fixed-length training clips from one or more collected datasets of one game, with a held-out split
by episode."""

import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .collect import read_manifest, shard_paths


# what every dataset trained on together must agree on: the same game, frames and actions
SAME_GAME = ("env_id", "frame_size", "num_actions", "action_meanings", "event_names")


def as_roots(data) -> list[Path]:
    """One dataset directory, or a list of them (several behaviour policies of one game) -> a list."""
    roots = [data] if isinstance(data, (str, Path)) else list(data)
    if not roots:
        raise ValueError("no dataset directory given")
    return [Path(r) for r in roots]


def load_manifest(data) -> dict:
    """The manifest of one dataset, or of several as one: the first's, with `datasets` listing each
    directory and its behaviour policy. Datasets of different games (or frame sizes) are an error."""
    roots, manifests = as_roots(data), []
    for root in roots:
        path = root / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{root} is not a WorldFlow dataset (no manifest.json): run `worldflow collect` first")
        manifests.append(read_manifest(path))  # an older one's shards may hold ALE's lives (load_episode)
    first = manifests[0]
    for root, m in zip(roots, manifests):
        for key in SAME_GAME:
            if m.get(key) != first.get(key):
                raise ValueError(f"datasets disagree on {key}: {roots[0]} has {first.get(key)!r}, "
                                 f"{root} has {m.get(key)!r}")
    if len(manifests) == 1:
        return first
    return dict(first, datasets=[dict(path=str(r), policy=m.get("policy", "random"))
                                 for r, m in zip(roots, manifests)])


def is_held_out(shard: Path, val_fraction: float) -> bool:
    """A stable per-episode coin (hash of the shard name), so the split never changes as data grows."""
    return zlib.crc32(shard.name.encode()) % 1000 < val_fraction * 1000


def window_starts(length: int, clip_frames: int, stride: int) -> list[int]:
    starts = list(range(0, length - clip_frames + 1, stride))
    if starts and starts[-1] != length - clip_frames:
        starts.append(length - clip_frames)
    return starts


NO_EVENT = 2**30  # steps_to_event of a step with no such event after it in its episode


def steps_to_event(happened: np.ndarray) -> np.ndarray:
    """An episode's event flags (L, E) bool -> (L, E) int64: for each step and event, how many steps
    later the event next happens (0: at this step), or NO_EVENT. An event is often the end of a cause
    some steps before it (in Breakout a life goes 7-10 steps after the ball leaves the field), so a
    world's heads learn "this event within the next K steps", which this gives for any K."""
    L = len(happened)
    out = np.full(happened.shape, NO_EVENT, np.int64)
    steps = np.arange(L)
    for e in range(happened.shape[1]):
        at = np.flatnonzero(happened[:, e])
        first = np.searchsorted(at, steps)  # the first event at or after each step (len(at): none)
        out[:, e] = np.minimum(np.append(at, L + NO_EVENT)[first] - steps, NO_EVENT)
    return out


def load_episode(path: Path) -> dict:
    """One shard -> the arrays training reads: frames, actions, rewards, terminated, steps_to_event (L, E).

    Shards written before events were generic hold ALE's life counter instead: its drops are "life_lost"."""
    with np.load(path) as shard:
        episode = {k: shard[k] for k in ("frames", "actions", "rewards", "terminated")}
        if "events" in shard:
            events = shard["events"]
        elif "lives" in shard:
            events = (np.diff(shard["lives"]) < 0)[:, None]
        else:
            raise ValueError(f"{path} was collected before episodes recorded events: collect it again")
    episode["steps_to_event"] = steps_to_event(events.reshape(len(episode["actions"]), -1))
    return episode


def split_shards(root: Path, split: str, val_fraction: float) -> list[Path]:
    shards = shard_paths(root)
    held_out = [p for p in shards if is_held_out(p, val_fraction)]
    if not held_out and len(shards) > 1 and val_fraction > 0:
        held_out = shards[-1:]  # tiny datasets still get one held-out episode
    return dict(train=[p for p in shards if p not in held_out], val=held_out, all=shards)[split]


class ClipDataset(Dataset):
    """Windows of `clip_frames` consecutive frames inside one episode of the chosen split, starting
    every `stride` frames (1: every window; clip_frames: windows that do not overlap), and always the
    episode's last window, so that every episode's end (its termination) is in some window.

    split "train" / "val" divide the episodes by `is_held_out`; "all" takes every episode (data
    collected fresh for an evaluation is held out as a whole). `root` may be a list of datasets of
    one game; each is split on its own, and the clips of all are pooled.

    Item: frames (T, S, S, 3) uint8, actions (T-1,) long, rewards (T-1,) float, terminated (T-1,) bool,
    steps_to_event (T-1, E) long; actions[i] leads from frames[i] to frames[i+1].
    """

    def __init__(self, root, clip_frames: int, split: str = "train", val_fraction: float = 0.1, stride: int = 1):
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        roots = as_roots(root)
        self.manifest = load_manifest(roots)
        chosen = [p for r in roots for p in split_shards(r, split, val_fraction)]
        self.episodes = [load_episode(path) for path in chosen]
        # (episode, start) of every clip that fits inside its episode
        self.index = [(e, s) for e, ep in enumerate(self.episodes) for s in window_starts(len(ep["frames"]), clip_frames, stride)]
        if not self.index:
            raise ValueError(f"no {split} episode in {', '.join(map(str, roots))} has {clip_frames} frames "
                             f"({len(chosen)} episodes): collect more steps or shorten clip_frames")
        self.clip_frames = clip_frames

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        e, s = self.index[i]
        ep, T = self.episodes[e], self.clip_frames
        return dict(frames=torch.from_numpy(ep["frames"][s:s + T]),
                    actions=torch.from_numpy(ep["actions"][s:s + T - 1]).long(),
                    rewards=torch.from_numpy(ep["rewards"][s:s + T - 1]).float(),
                    terminated=torch.from_numpy(ep["terminated"][s:s + T - 1]),
                    steps_to_event=torch.from_numpy(ep["steps_to_event"][s:s + T - 1]))


def spread_clips(clips: ClipDataset, count: int, among: list[int] | None = None) -> dict:
    """`count` clips spread evenly over the dataset (or over the clip indices `among`; all if fewer), as
    one batch dict of stacked tensors."""
    among = list(range(len(clips))) if among is None else among
    picks = torch.linspace(0, len(among) - 1, min(count, len(among))).long()
    return default_collate([clips[among[int(i)]] for i in picks])
