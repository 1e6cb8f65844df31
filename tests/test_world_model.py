"""The video world model: exact round trips on real latents, checkpoints, streaming, bad input, the heads."""

import pytest
import torch
import torch.nn.functional as F

from worldflow.data import ClipDataset
from worldflow.heads import OutcomeHeads
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
def test_frame_log_probs_factor_the_clip_density_causally(model_and_clip):
    model, frames, actions = model_and_clip
    per_frame = model.frame_log_probs(frames, actions)
    assert per_frame.shape == (1, frames.shape[1])
    assert torch.allclose(per_frame.sum(1), model.log_prob(frames, actions), rtol=1e-5, atol=1e-2)
    edited = frames.clone()
    edited[:, -1] = 255 - edited[:, -1]  # a different last frame: only its own term may change
    again = model.frame_log_probs(edited, actions)
    assert torch.equal(again[:, :-1], per_frame[:, :-1]) and not torch.allclose(again[:, -1], per_frame[:, -1])
    edited = frames.clone()
    edited[:, 0] = 255 - edited[:, 0]  # a different first frame is context for every later one
    assert not torch.allclose(model.frame_log_probs(edited, actions)[:, 1:], per_frame[:, 1:])


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


def test_outcome_heads_learn_a_small_change_anywhere_in_the_frame():
    """The heads' premise: a reward shows as a local change between two frames, wherever it happens."""
    torch.manual_seed(0)
    heads = OutcomeHeads(channels=4, conv_width=16, state_width=8, num_events=1)
    opt = torch.optim.Adam(heads.parameters(), lr=3e-3)

    def batch(n):
        previous = torch.randn(n, 4, 16, 16)
        latent = previous + 0.05 * torch.randn_like(previous)
        label = torch.randint(0, 2, (n,))
        for i in torch.nonzero(label).flatten():
            r, c = torch.randint(0, 15, (2,))
            latent[i, :, r:r + 2, c:c + 2] += 2.0  # a 2x2 "brick" changes somewhere
        return latent, previous, label

    for _ in range(200):
        latent, previous, label = batch(64)
        loss = F.cross_entropy(heads(latent, previous, torch.zeros(64, 8)).reward[:, :2], label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    latent, previous, label = batch(512)
    with torch.no_grad():
        accuracy = (heads(latent, previous, torch.zeros(512, 8)).reward[:, :2].argmax(-1) == label).float().mean()
    assert accuracy > 0.95


def test_outcome_weights_make_each_reward_sign_ending_and_event_count_equally(model_and_clip):
    model = model_and_clip[0]
    rewards = torch.tensor([0.0] * 90 + [1.0] * 8 + [-3.0] * 2)  # signs are what count
    terminated = torch.tensor([False] * 96 + [True] * 4)
    horizon = model.config.event_horizon
    steps_to_event = torch.tensor([horizon - 1] * 20 + [horizon] * 30 + [2**30] * 50)[:, None]  # 20 within the horizon
    weights = model.outcome_weights(rewards, terminated, steps_to_event)
    counts = torch.tensor([2.0, 90.0, 8.0])  # -1, 0, +1
    assert torch.allclose(weights["reward"] * counts, torch.full((3,), 90.0))
    assert weights["terminated"].item() == 24.0  # 96 steps that went on against 4 endings
    assert weights["events"].tolist() == [4.0]  # 80 steps with no event within the horizon against 20


def test_event_target_is_the_window_from_the_delay(model_and_clip, monkeypatch):
    model = model_and_clip[0]
    steps = torch.tensor([0, 6, 7, 11, 12, 18, 19, 2**30])  # steps until the next lost life
    monkeypatch.setattr(model.config, "event_horizon", 12)
    assert model.event_ahead(steps).tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    monkeypatch.setattr(model.config, "event_delay", 7)  # the empty field after a miss is no longer "at risk"
    assert model.event_ahead(steps).tolist() == [0, 0, 1, 1, 1, 1, 0, 0]


@torch.no_grad()
def test_autoencoder_motion_loss_weighs_only_the_pixels_that_changed(model_and_clip):
    model, frames, _ = model_and_clip
    clip = frames[:, :2].clone()
    clip[:, 1] = clip[:, 0]
    clip[:, 1, 40:42, 30:32] = 255  # a 2x2 "ball" appears in the second frame: the only change
    loss, mse, moved = model.ae_loss(clip, motion_weight=3.0)
    pixels = clip.permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    err = (model.ae.decode(model.ae.encode(pixels.flatten(0, 1))).view_as(pixels) - pixels).pow(2)
    assert torch.allclose(mse, err.mean())
    assert torch.allclose(moved, err[:, 1, :, 40:42, 30:32].mean())
    assert torch.allclose(loss, mse + 3.0 * moved)
    assert model.ae_loss(clip, motion_weight=0.0)[0] == mse


def test_motion_weighted_flow_loss_weighs_changed_tokens_and_keeps_the_denoiser_target(model_and_clip):
    model, frames, actions = model_and_clip
    clip = frames[:, :3].clone()
    clip[:, 1:] = clip[:, :1]
    clip[:, 2, 40:42, 30:32] = 255  # a 2x2 "ball" appears in frame 2: one token of the 8x8-pixel grid moves
    moved = model.moved_tokens(clip)
    side = model.config.ae_downsample * model.config.patch
    expected = torch.zeros_like(moved)
    expected[0, 2, (40 // side) * (64 // side) + 30 // side] = True
    assert torch.equal(moved, expected)

    outcomes = dict(rewards=torch.zeros(1, 2), terminated=torch.zeros(1, 2, dtype=torch.bool),
                    steps_to_event=torch.full((1, 2, 1), 2**30))
    runs = {}
    for weight in (0.0, 5.0):
        losses, noisy = model.compute_losses(clip, actions[:, :2], outcomes, torch.Generator().manual_seed(0),
                                             motion_weight=weight)
        model.zero_grad()
        losses["total"].backward()
        runs[weight] = losses, noisy.grad.clone(), model.deep.head.weight.grad.clone()
    (plain, plain_grad, plain_param), (weighted, weighted_grad, weighted_param) = runs[0.0], runs[5.0]
    assert torch.allclose(plain["flow"], weighted["flow"])  # the reported NLL is the plain one
    assert not torch.allclose(plain["total"], weighted["total"])
    assert not torch.allclose(plain_param, weighted_param)  # the flow is fitted to the weighted one...
    assert torch.allclose(plain_grad, weighted_grad, atol=1e-7)  # ...and the denoiser still learns its score
    # the loss reads the log-det per token: through the whole flow its shares add up to the clip's log-det
    tokens, cond = model.to_tokens(model.frames_to_latents(clip)), model.frame_conditions(actions[:, :2])
    logdet, per_token = model.flow_forward(tokens, cond)[1], model.flow_forward(tokens, cond, per_token=True)[1]
    assert per_token.shape == (1, 3, model.tokens_per_frame) and torch.allclose(per_token.sum(dim=(1, 2)), logdet, atol=1e-4)
    model.zero_grad(set_to_none=True)  # the module's model is shared with the other tests


def test_subpixel_decoder_learns_full_frames_for_fewer_flops_and_reloads(breakout_data, tmp_path):
    """`ae_subpixel`: the decoder's last 2x by PixelShuffle, with no convolution at full resolution."""
    from torch.utils.flop_counter import FlopCounterMode

    from worldflow.config import load_config
    from worldflow.world_model import WorldFlowConfig

    base = load_config("configs/tiny.yaml").to_dict()["model"]
    models = {sub: WorldFlowModel(WorldFlowConfig(frame_size=64, num_actions=4, **{**base, "ae_subpixel": sub}))
              for sub in (False, True)}
    latents = torch.randn(2, base["latent_channels"], 8, 8)
    flops = {}
    for sub, m in models.items():
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            frames = m.latents_to_frames(latents)
        assert frames.shape == (2, 64, 64, 3) and frames.dtype == torch.uint8
        flops[sub] = counter.get_total_flops()
    assert flops[True] < 0.8 * flops[False]  # tiny: 44 against 59 MFLOP (width 32 at 64x64: about half)

    model = models[True]
    clip = ClipDataset(breakout_data, clip_frames=4)[0]["frames"][None]
    opt = torch.optim.Adam(model.ae.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model.ae_loss(clip)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # the sub-pixel output can fit real frames
    model.save_pretrained(tmp_path)
    again = WorldFlowModel.from_pretrained(tmp_path).eval()
    assert again.config.ae_subpixel is True
    with torch.no_grad():
        assert torch.equal(model.eval().latents_to_frames(latents), again.latents_to_frames(latents))
