"""The video world model: exact round trips on real latents, checkpoints, streaming, bad input."""

import pytest
import torch

from worldflow.data import ClipDataset
from worldflow.world_model import WorldFlowModel


@pytest.fixture(scope="module")
def model_and_clip(tiny_run, breakout_data):
    _, run = tiny_run
    model = WorldFlowModel.from_pretrained(run / "latest").eval()
    item = ClipDataset(breakout_data, clip_frames=4, split="val")[0]
    return model, item["frames"][None], item["actions"][None]


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["jacobi", "sequential"])
def test_encode_then_invert_returns_the_real_latents(model_and_clip, sampler):
    model, frames, actions = model_and_clip
    z = model.encode(frames, actions)
    tokens = model.flow_inverse(z, model.frame_conditions(actions), sampler=sampler, tol=1e-10)
    assert (tokens - model.to_tokens(model.frames_to_latents(frames))).abs().max() < 1e-4
    decoded = model.decode(z, actions, sampler=sampler, tol=1e-10)
    assert decoded.shape == frames.shape and decoded.dtype == torch.uint8


def test_checkpoint_keeps_the_game_and_reloads_identically(tiny_run, model_and_clip):
    trainer, run = tiny_run
    model, frames, actions = model_and_clip
    assert model.config.action_meanings == ["NOOP", "FIRE", "RIGHT", "LEFT"] and model.config.frame_size == 64
    assert model.config.env_id == "ALE/Breakout-v5"
    assert sorted(p.name for p in (run / "latest").iterdir() if p.name.startswith(("config", "model"))) == \
        ["config.json", "model.safetensors"]
    with torch.no_grad():
        again = WorldFlowModel.from_pretrained(run / "latest").eval()
        assert torch.equal(model.log_prob(frames, actions), again.log_prob(frames, actions))
        assert torch.equal(model.log_prob(frames, actions), trainer.model.eval().log_prob(frames, actions))


@torch.no_grad()
def test_streamed_dream_keeps_a_constant_window(model_and_clip):
    model, frames, actions = model_and_clip
    state = model.start(frames[:, :2], actions[:, :1], torch.Generator().manual_seed(0))
    lengths = []
    for i in range(8):
        step = model.sample_next(state, torch.tensor([i % 4]), torch.Generator().manual_seed(i),
                                 denoiser=("flow-score", "tweedie", "none")[i % 3])
        lengths.append(state.cache.length)
        assert step.frames.shape == (1, 64, 64, 3) and step.frames.dtype == torch.uint8
        assert step.reward.item() in (-1, 0, 1) and 0 <= step.terminated.item() <= 1
        assert torch.isfinite(step.bits_per_dim).all() and 1 <= step.iterations <= model.tokens_per_frame
    window = model.config.context_frames * (model.tokens_per_frame + 1)
    assert lengths[-1] == lengths[-2] == window


@torch.no_grad()
def test_jacobi_and_sequential_dreams_agree(model_and_clip):
    model, frames, actions = model_and_clip
    out = {}
    for sampler in ("jacobi", "sequential"):
        state = model.start(frames[:, :2], actions[:, :1], torch.Generator().manual_seed(0))
        out[sampler] = [model.sample_next(state, torch.tensor([a]), torch.Generator().manual_seed(a), sampler=sampler,
                                          denoiser="none", tol=1e-10).frames for a in (1, 2, 3)]
    for a, b in zip(out["jacobi"], out["sequential"]):
        assert (a.int() - b.int()).abs().max() <= 1  # equal up to uint8 rounding


def test_bad_inputs_raise_clear_errors(model_and_clip, tmp_path):
    model, frames, actions = model_and_clip
    with pytest.raises(ValueError, match="uint8"):
        model.log_prob(frames.float(), actions)
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(frames[:, :, :32], actions)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\]"):
        model.log_prob(frames, actions + 4)
    with pytest.raises(ValueError, match="shape"):
        model.log_prob(frames, actions[:, :1])
    state = model.start(frames[:, :2], actions[:, :1])
    with pytest.raises(ValueError, match="action"):
        model.sample_next(state, torch.tensor([7]))
    with pytest.raises(ValueError, match="sampler"):
        model.sample_next(state, torch.tensor([0]), sampler="euler")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        WorldFlowModel.from_pretrained(tmp_path / "no-such-checkpoint")
