"""Worlds on disk: a checkpoint directory plus the real start contexts a dream begins from.

    config.json, model.safetensors     the model (WorldFlowModel.save_pretrained)
    start_contexts.safetensors         frames (M, K, S, S, 3) uint8 and actions (M, K-1) int64:
                                       real clips that resets start from
The embedded worlds ship inside the package at worldflow/pretrained/NAME/, each with its model card
(README.md): "default" (Breakout, what gym.make("WorldFlow-v0") loads), "fast" (Breakout with a
quarter of the tokens, for batched dreaming) and "takecover" (ViZDoom Take Cover); a checkpoint
argument may name one of them instead of a path.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONTEXTS = "start_contexts.safetensors"
EMBEDDED = Path(__file__).parent / "pretrained"
EMBEDDED_WORLDS = ("default", "fast", "takecover")
DEFAULT_WORLD = EMBEDDED / "default"


def resolve_world(path=None) -> Path:
    """A run directory, a checkpoint directory, an embedded world's name, or None for the default world.

    A path that exists wins over an embedded world of the same name."""
    if path is None or (str(path) in EMBEDDED_WORLDS and not Path(path).exists()):
        world = EMBEDDED / (path or "default")
        if not (world / "model.safetensors").exists():
            raise FileNotFoundError(f"no {path or 'default'} world is installed at {world}; "
                                    "pass a checkpoint (a `worldflow train` run directory or its latest/)")
        return world
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (embedded worlds: {', '.join(EMBEDDED_WORLDS)})")
    return path / "latest" if (path / "latest" / "config.json").exists() else path


def save_contexts(directory, frames: torch.Tensor, actions: torch.Tensor) -> None:
    """Write directory/start_contexts.safetensors atomically (a temp file, then a rename)."""
    file = Path(directory) / CONTEXTS
    tmp = file.with_name(file.name + ".tmp")
    save_file({"frames": frames.contiguous(), "actions": actions.long().contiguous()}, tmp)
    os.replace(tmp, file)


def load_contexts(file, model) -> tuple[torch.Tensor, torch.Tensor]:
    """A start contexts file -> its frames (M, K, S, S, 3) uint8 and actions (M, K-1), checked for `model`."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: start contexts are a {CONTEXTS} file of real clips")
    try:
        ctx = load_file(file)
        frames, actions = ctx["frames"], ctx["actions"]
    except Exception as e:
        raise ValueError(f"{file} is corrupt: {type(e).__name__}: {e}") from None
    model.check_frames(frames, "start context frames")
    model.check_actions(actions, frames.shape[0], frames.shape[1] - 1, "start context actions")
    return frames, actions


def load_world(path=None, device: str = "cpu"):
    """-> (WorldFlowModel in eval mode, start frames (M, K, S, S, 3), start actions (M, K-1))."""
    from .world_model import WorldFlowModel

    path = resolve_world(path)
    model = WorldFlowModel.from_pretrained(path).to(device).eval()
    if not (path / CONTEXTS).exists():
        raise FileNotFoundError(f"{path} has no {CONTEXTS}: a world needs real frames to start dreams from")
    return (model, *load_contexts(path / CONTEXTS, model))
