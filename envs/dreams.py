"""What the single and the vector WorldFlow environments share: loading a world, seeding, checks."""

import numpy as np
import torch
from gymnasium import spaces

from worldflow.devices import pick_device
from worldflow.pretrained import load_contexts, load_world
from worldflow.world_model import DENOISERS, SAMPLERS

OBSERVATIONS = ("frames", "latent")  # what an env step returns: RGB frames, or the world's own state (features)


def open_world(checkpoint, sampler: str, denoiser: str, context_frames: int | None, device: str,
               observation: str = "frames", start_contexts=None):
    """Load a world and check the env options.

    -> (model, start frames, start actions, real context frames a reset uses: all of a context by default).
    The start frames are the world's shipped ones, or those of a `start_contexts` file (the same format).
    """
    if observation not in OBSERVATIONS:
        raise ValueError(f"observation must be one of {OBSERVATIONS}, got {observation!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if denoiser not in DENOISERS:
        raise ValueError(f"denoiser must be one of {DENOISERS}, got {denoiser!r}")
    model, frames, actions = load_world(checkpoint, pick_device(device))
    if start_contexts is not None:
        frames, actions = load_contexts(start_contexts, model)
    given = frames.shape[1]  # frames in each start context
    if context_frames is not None and not 1 <= context_frames <= given:
        raise ValueError(f"context_frames must be in [1, {given}], got {context_frames}")
    return model, frames, actions, context_frames or given


def observation_space(model, observation: str) -> spaces.Box:
    """One observation's space: an RGB frame, or the world's feature vector (`WorldFlowModel.features`)."""
    if observation == "latent":
        return spaces.Box(-np.inf, np.inf, (model.feature_size,), np.float32)
    S = model.config.frame_size
    return spaces.Box(0, 255, (S, S, 3), np.uint8)


def torch_generator(np_random: np.random.Generator, device: str = "cpu") -> torch.Generator:
    """A torch stream drawn from the env's own np_random, so a seed fixes every sample."""
    return torch.Generator(device=device).manual_seed(int(np_random.integers(0, 2**63 - 1)))


def draw_terminated(prob: torch.Tensor, generators: list | None) -> np.ndarray:
    """The termination head's probabilities (B,) -> episode ends (B,) bool: above 0.5, or, given one
    generator per row, drawn with that probability (a stochastic simulator's own end, from its seed)."""
    if generators is None:
        return (prob > 0.5).cpu().numpy()
    draws = torch.stack([torch.rand((), generator=g, device=g.device) for g in generators])
    return (draws.to(prob.device) < prob).cpu().numpy()


def check_action(action, n: int, meanings: list[str]) -> int:
    """An integer action in [0, n) or a ValueError: nothing is clipped, rounded or wrapped."""
    if isinstance(action, np.ndarray) and action.shape == ():
        action = action[()]
    if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
        raise ValueError(f"action must be an integer in [0, {n}), got {action!r} ({type(action).__name__})")
    if not 0 <= action < n:
        raise ValueError(f"action {int(action)} is out of range: this world has {n} actions {meanings}")
    return int(action)


def start_context(model, frames, actions, np_random, options: dict | None, context_frames: int):
    """The last <= context_frames frames (1, K, S, S, 3) and the K-1 actions between them, of the
    context given in options, else of a random shipped one."""
    f, a = _pick_context(model, frames, actions, np_random, options)
    k = min(context_frames, f.shape[1])
    return f[:, f.shape[1] - k:], a[:, a.shape[1] - k + 1:]


def _pick_context(model, frames, actions, np_random, options: dict | None):
    options = options or {}
    unknown = set(options) - {"frames", "actions"}
    if unknown:
        raise ValueError(f"unknown reset option(s) {sorted(unknown)}; known: 'frames', 'actions'")
    if "frames" not in options:
        i = int(np_random.integers(len(frames)))
        return frames[i:i + 1], actions[i:i + 1]
    S, n = model.config.frame_size, model.config.num_actions
    given = np.asarray(options["frames"])
    f = given[None] if given.ndim == 3 else given
    if f.dtype != np.uint8 or f.ndim != 4 or f.shape[1:] != (S, S, 3) or len(f) < 1:
        raise ValueError(f"options['frames'] must be real frames as uint8 of shape (K, {S}, {S}, 3) or one frame "
                         f"({S}, {S}, 3), with K >= 1; got {given.dtype} of shape {given.shape}")
    a = np.asarray(options.get("actions", np.zeros(len(f) - 1, dtype=np.int64)))
    if not np.issubdtype(a.dtype, np.integer) or a.shape != (len(f) - 1,):
        raise ValueError(f"options['actions'] must be the {len(f) - 1} integer actions taken between the "
                         f"{len(f)} given frames, shape ({len(f) - 1},); got {a.dtype} of shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"options['actions'] must lie in [0, {n - 1}] ({n} actions: "
                         f"{model.config.action_meanings}); got range [{a.min()}, {a.max()}]")
    return torch.from_numpy(np.ascontiguousarray(f))[None], torch.from_numpy(a.astype(np.int64))[None]
