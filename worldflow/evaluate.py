"""Measure a world model against real held-out episodes: likelihood, open-loop fidelity, heads, invertibility.

Open loop: each evaluation clip is K real context frames (the model's window) followed by H real
frames. A dream starts from the K context frames and is driven by the H real actions that
followed; dreamed frame h is compared with real frame K-1+h. Every rollout of one evaluation draws
the same noise (one seed), so the modes differ only in what they do with it.

PSNR at a horizon is taken from the squared error pooled over all clips (a mean of per-clip PSNRs
would be dominated by the infinite PSNR of a static screen copied exactly). "Changed" PSNR pools
only the pixels whose real value differs from the last context frame: the moving ball and paddle,
not the static walls that copying the last frame gets right for free.
"""

import math
import time

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from .data import ClipDataset, load_manifest, spread_clips
from .world_model import DENOISERS, WorldFlowModel

# fresh evaluation episodes are collected with seed FRESH_SEED_OFFSET + --seed, far from the small seeds
# training collections use, so they are new episodes rather than replays of the training data
FRESH_SEED_OFFSET = 1_000_000
EXACT_TOL = 1e-9


def psnr_from_mse(mse: float) -> float:
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def squared_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., S, S, 3) -> per-pixel squared error summed over RGB (..., S, S)."""
    return (a.float() - b.float()).pow(2).sum(-1)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5) of uint8 frames (B, S, S, 3) -> (B,)."""
    x, y = (t.permute(0, 3, 1, 2).float() for t in (a, b))
    g = torch.exp(-(torch.arange(11) - 5.0) ** 2 / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, window, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


@torch.no_grad()
def rollout(model: WorldFlowModel, frames, actions, seed: int, denoiser: str, temperature: float, sampler: str):
    """Dream from frames[:, :K] under actions[:, K-1:] -> (dreamed frames (B, H, S, S, 3), the heads'
    reward signs (B, H), seconds)."""
    K = model.config.context_frames
    generator = torch.Generator(device=model.device).manual_seed(seed)
    start = time.perf_counter()
    state = model.start(frames[:, :K], actions[:, :K - 1], generator)
    steps = [model.sample_next(state, actions[:, h], generator, sampler, denoiser, temperature)
             for h in range(K - 1, actions.shape[1])]
    seconds = time.perf_counter() - start
    return (torch.stack([s.frames for s in steps], dim=1).cpu(), torch.stack([s.reward for s in steps], dim=1).cpu(),
            seconds)


def fidelity(pred: torch.Tensor, real: torch.Tensor, last: torch.Tensor) -> dict:
    """Per-horizon PSNR (full frame and changed pixels) and SSIM of pred vs real, both (B, H, S, S, 3)."""
    err = squared_errors(pred, real)  # (B, H, S, S)
    changed = (real != last[:, None]).any(-1)  # pixels that moved since the last context frame
    per_pixel = 3  # err sums RGB
    full = [psnr_from_mse(err[:, h].mean().item() / per_pixel) for h in range(err.shape[1])]
    moved = [psnr_from_mse((err[:, h] * changed[:, h]).sum().item() / changed[:, h].sum().item() / per_pixel)
             if changed[:, h].any() else float("nan") for h in range(err.shape[1])]
    structure = [ssim(pred[:, h], real[:, h]).mean().item() for h in range(err.shape[1])]
    return dict(psnr=full, psnr_changed=moved, ssim=structure)


def precision_recall(pred: torch.Tensor, real: torch.Tensor) -> dict:
    """Two bool vectors of the steps -> precision and recall of `pred` (None where undefined), accuracy, positives."""
    hits = (pred & real).sum().item()
    return dict(precision=hits / pred.sum().item() if pred.any() else None,
                recall=hits / real.sum().item() if real.any() else None,
                accuracy=(pred == real).float().mean().item(), steps=int(real.sum()))


@torch.no_grad()
def heads_and_likelihood(model: WorldFlowModel, data, split: str, windows: int, seed: int) -> dict:
    """Latent bits/dim and the reward / termination / event heads, teacher-forced on non-overlapping
    real windows."""
    K = model.config.context_frames
    clips = ClipDataset(data, K, split, stride=K)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    bpd, pred_r, real_r, pred_t, real_t, pred_e, real_e = [], [], [], [], [], [], []
    for i in range(0, min(windows, len(clips)), 32):
        b = default_collate([clips[j] for j in range(i, min(i + 32, windows, len(clips)))])
        log_p, logits = model.score_clip(b["frames"], b["actions"], generator)  # logits: the steps into frames 1..
        bpd.append(model.to_bits_per_dim(log_p, K))
        pred_r.append(logits.reward.argmax(-1).flatten() - 1)
        real_r.append(b["rewards"].sign().long().flatten())
        pred_t.append(torch.sigmoid(logits.terminated).flatten() > 0.5)
        real_t.append(b["terminated"].flatten())
        pred_e.append(torch.sigmoid(logits.events).flatten(0, 1) > 0.5)
        real_e.append(model.event_ahead(b["steps_to_event"]).flatten(0, 1) > 0)
    pred_r, real_r, pred_t, real_t, pred_e, real_e = (torch.cat(v) for v in (pred_r, real_r, pred_t, real_t,
                                                                             pred_e, real_e))
    nonzero = real_r != 0
    termination = precision_recall(pred_t, real_t)
    return dict(
        bits_per_dim=torch.cat(bpd).mean().item(), windows=len(torch.cat(bpd)), steps=len(real_r),
        reward_sign_accuracy=(pred_r == real_r).float().mean().item(),
        reward_sign_accuracy_nonzero=(pred_r[nonzero] == real_r[nonzero]).float().mean().item() if nonzero.any() else None,
        nonzero_rewards=int(nonzero.sum()),
        termination_precision=termination["precision"], termination_recall=termination["recall"],
        terminations=termination["steps"],
        # each event within the window ahead (event_ahead): precision and recall of the steps where it is
        events={name: precision_recall(pred_e[:, e], real_e[:, e]) for e, name in enumerate(model.config.event_names)})


@torch.no_grad()
def counterfactual(model: WorldFlowModel, frames, actions) -> dict:
    """Encode real clips to their noise and decode them again: under their own actions they must come
    back (up to the autoencoder); under shuffled actions they need not."""
    K = model.config.context_frames
    frames, actions = frames[:, :K], actions[:, :K - 1]
    z = model.encode(frames, actions)
    latents = model.frames_to_latents(frames)
    # Jacobi to a tolerance far below float32 noise: as exact as sequential inversion, ~8x faster here
    back = model.to_latents(model.flow_inverse(z, model.frame_conditions(actions), tol=EXACT_TOL))
    reconstruction = model.latents_to_frames(latents)
    other = actions[torch.roll(torch.arange(len(actions)), 1)]
    changed = model.decode(z, other, tol=EXACT_TOL)
    return dict(roundtrip_max_latent_error=(back - latents).abs().max().item(),
                roundtrip_psnr=psnr_from_mse(squared_errors(model.latents_to_frames(back), reconstruction).mean().item() / 3),
                other_actions_psnr=psnr_from_mse(squared_errors(changed, reconstruction).mean().item() / 3))


def evaluate(model: WorldFlowModel, data, split: str = "val", horizon: int = 16, clips: int = 32, seed: int = 0,
             temperature: float = 1.0, sampler: str = "jacobi", windows: int = 256, progress: bool = True):
    """Every measure of one world on one dataset -> (JSON-ready result dict, frames for the strip)."""
    from tqdm import tqdm

    K = model.config.context_frames
    env_id = load_manifest(data)["env_id"]
    if env_id != model.config.env_id:
        raise ValueError(f"{data} holds {env_id} episodes but the world models {model.config.env_id}")
    batch = spread_clips(ClipDataset(data, K + horizon, split), clips)
    frames, actions = batch["frames"], batch["actions"]
    real, last = frames[:, K:], frames[:, K - 1]
    random_actions = torch.randint(model.config.num_actions, actions.shape,
                                   generator=torch.Generator().manual_seed(seed + 1))
    random_actions[:, :K - 1] = actions[:, :K - 1]  # the same real context; only the future actions differ
    jobs = [(mode, actions) for mode in DENOISERS] + [("random_actions", random_actions)]
    dreams, rewards, result, seconds = {}, {}, dict(psnr={}, psnr_changed={}, ssim={}), {}
    for name, acts in tqdm(jobs, desc="eval rollouts", disable=not progress):
        denoiser = "flow-score" if name == "random_actions" else name
        dreams[name], rewards[name], seconds[name] = rollout(model, frames, acts, seed, denoiser, temperature, sampler)
    dreams["repeat_last"] = last[:, None].expand_as(real)
    dreams["reconstruction"] = model.latents_to_frames(model.frames_to_latents(real)).cpu()
    for name, pred in dreams.items():
        for key, values in fidelity(pred, real, last).items():
            result[key][name] = values
    random = result["psnr"].pop("random_actions")
    result["delta_t_psnr"] = [a - b for a, b in zip(result["psnr"]["flow-score"], random)]
    for key in ("psnr_changed", "ssim"):
        result[key].pop("random_actions")
    result.update(heads_and_likelihood(model, data, split, windows, seed))
    result["counterfactual"] = counterfactual(model, frames[:8], actions[:8])
    # does the dream pay rewards? (an agent trained in it learns from nothing else)
    result["dream_reward_events"] = dict(real=int((batch["rewards"][:, K - 1:] != 0).sum()),
                                         **{mode: int((rewards[mode] != 0).sum()) for mode in DENOISERS})
    B = len(frames)
    result["dream_frames_per_s"] = {mode: B * horizon / seconds[mode] for mode in DENOISERS}
    result.update(clips=B, horizon=horizon, context_frames=K, seed=seed, temperature=temperature,
                  sampler=sampler, split=split, bits_per_dim_kind="latent (sigma-noised, per latent dim)")
    strip = dict(context=last[0], real=real[0], **{mode: dreams[mode][0] for mode in DENOISERS})
    return result, strip
