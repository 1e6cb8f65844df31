"""WorldFlowModel: the action-conditioned video flow (STARFlow-V's global-local design).

    frames (B, T, S, S, 3) uint8
      -> autoencoder -> per-channel-normalised latents (B, T, C, h, w)  [+ sigma noise in training]
      -> patch tokens x (B, T, N, D)
      -> shallow blocks: local, per frame, unconditional, alternating token order
      -> deep block: causal over the whole clip, an action token before each frame
      -> z ~ N(0, I)
The reward (-1/0/+1), termination and event heads read the deep block's per-frame hidden state and
the frame's change from the last one (heads.py); the deep block's KV cache over a sliding window of
past frames is the simulator's state (`WorldState`).
Cond for frame t is the action taken before it; frame 0 gets the null action (index num_actions).
"""

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from .autoencoder import Autoencoder, to_frames, to_pixels
from .config import ModelConfig
from .denoiser import FrameDenoiser
from .flow import JACOBI_TOL, TARFlowBlock, add_noise, gaussian_log_prob, randn_on
from .heads import HeadLogits, OutcomeHeads
from .transformer import KVCache

hf_logging.disable_progress_bar()
SAMPLERS = ("jacobi", "sequential")
# tensor names of worlds saved before events were generic -> today's (regex -> replacement)
LEGACY_KEYS = {r"^heads\.life_loss\.": "heads.events."}


def rename_legacy_key(name: str) -> str:
    for pattern, new in LEGACY_KEYS.items():
        name = re.sub(pattern, new, name)
    return name
DENOISERS = ("flow-score", "tweedie", "none")


def changed_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 clips (B, T, S, S, 3) -> (B, T-1, S, S) bool: the pixels that differ from the previous frame."""
    return (frames[:, 1:] != frames[:, :-1]).any(-1)


class WorldFlowConfig(PretrainedConfig):
    model_type = "worldflow"

    def __init__(self, frame_size: int = 64, num_actions: int = 4, action_meanings: list | None = None,
                 env_id: str | None = None, env_kwargs: dict | None = None, obs_key: str | None = None,
                 event_names: list | None = None, **kwargs):
        if "life_loss_horizon" in kwargs:  # a world from before events were generic: its one event
            kwargs["event_horizon"] = kwargs.pop("life_loss_horizon")
            kwargs["event_delay"] = kwargs.pop("life_loss_delay", 0)
            event_names = event_names or ["life_lost"]
        for f in dataclasses.fields(ModelConfig):  # the model section of a YAML config, flattened
            setattr(self, f.name, kwargs.pop(f.name, f.default))
        self.frame_size, self.num_actions, self.env_id, self.obs_key = frame_size, num_actions, env_id, obs_key
        self.action_meanings = action_meanings or [str(i) for i in range(num_actions)]
        self.event_names = list(event_names or [])
        self.env_kwargs = env_kwargs or {}
        super().__init__(**kwargs)


@dataclass
class WorldState:
    """The simulator's state: the deep block's KV cache over the last context_frames frames, plus warm starts."""
    cache: KVCache
    last_solution: torch.Tensor  # (B, N, D) deep-block input of the last frame: Jacobi's warm start
    last_shallow: torch.Tensor  # (B, shallow_blocks, N, D) each shallow block's input of the last frame: theirs
    last_noisy: torch.Tensor  # (B, C, h, w) last noisy latent grid: the denoiser's context
    last_clean: torch.Tensor  # (B, C, h, w) last clean (denoised) latent grid: the heads' context
    event_risk: torch.Tensor  # (B, E) the event heads' probabilities at the last frame
    hidden: torch.Tensor  # (B, width) the deep block's state after the last frame: what the heads read
    guidance: float | None


@dataclass
class Step:
    frames: torch.Tensor  # (B, S, S, 3) uint8
    reward: torch.Tensor  # (B,) predicted reward sign in {-1, 0, 1}
    terminated: torch.Tensor  # (B,) predicted probability that the episode ended
    event_risk: torch.Tensor  # (B, E) predicted probability of each event in the window ahead (event_ahead)
    bits_per_dim: torch.Tensor  # (B,) the model's surprise at its own frame (latent bits/dim)
    iterations: int  # Jacobi sweeps of the deep block


class WorldFlowModel(PreTrainedModel):
    config_class = WorldFlowConfig
    main_input_name = "frames"

    def __init__(self, config: WorldFlowConfig):
        super().__init__(config)
        c = config
        if c.frame_size % (c.ae_downsample * c.patch):
            raise ValueError(f"frame_size {c.frame_size} is not divisible by ae_downsample*patch "
                             f"= {c.ae_downsample * c.patch}")
        self.grid = c.frame_size // c.ae_downsample
        self.tokens_per_frame = (self.grid // c.patch) ** 2
        self.token_dim = c.latent_channels * c.patch**2
        self.ae = Autoencoder(c.latent_channels, c.ae_downsample, c.ae_width, c.ae_subpixel)
        self.register_buffer("latent_mean", torch.zeros(c.latent_channels))
        self.register_buffer("latent_std", torch.ones(c.latent_channels))
        orders = ("raster", "reverse")
        self.shallow = nn.ModuleList(TARFlowBlock(self.token_dim, c.width, c.shallow_depth, c.heads,
                                                  order=orders[i % 2], local=True,
                                                  tokens_per_frame=self.tokens_per_frame) for i in range(c.shallow_blocks))
        deep_order = ("raster", "reverse_within_frame")[c.shallow_blocks % 2]
        self.deep = TARFlowBlock(self.token_dim, c.width, c.deep_depth, c.heads, order=deep_order,
                                 num_classes=c.num_actions, tokens_per_frame=self.tokens_per_frame)
        self.heads = OutcomeHeads(c.latent_channels, c.head_width, c.width, len(c.event_names))
        self.denoiser = FrameDenoiser(c.latent_channels, c.denoiser_width)
        self.post_init()

    def _init_weights(self, module):
        pass  # every module initialises itself (zero-initialised flow heads must stay zero)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """Load `config.json` + `model.safetensors` from a directory, with clear errors when they are bad.

        Every tensor must match: a tensor the file lacks would be left uninitialised, not trained.
        A world from before events were generic is read as one with the single event "life_lost".
        """
        path = Path(path)
        for name in ("config.json", "model.safetensors"):
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path} is not a WorldFlow checkpoint: {name} is missing")
        try:
            model, info = super().from_pretrained(path, *args, local_files_only=True, output_loading_info=True,
                                                  key_mapping=LEGACY_KEYS, **kwargs)
        except Exception as e:  # safetensors / json errors deep inside transformers
            raise ValueError(f"checkpoint {path} is corrupt or incompatible: {type(e).__name__}: {e}") from None
        wrong = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if any(wrong.values()):
            raise ValueError(f"checkpoint {path} was written for another version of the model "
                             f"(fine-tune it with `worldflow train --init`): " +
                             "; ".join(f"{k.replace('_', ' ')}: {v[:6]}" for k, v in wrong.items() if v))
        return model

    # ---- frames <-> latents <-> tokens ----------------------------------------------------------
    def frames_to_latents(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (B, T, S, S, 3) -> normalised latents (B, T, C, h, w)."""
        B, T = frames.shape[:2]
        lat = self.ae.encode(to_pixels(frames.flatten(0, 1)).to(self.device))
        lat = (lat - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]
        return lat.view(B, T, *lat.shape[1:])

    def latents_to_frames(self, lat: torch.Tensor) -> torch.Tensor:
        """normalised latents (..., C, h, w) -> uint8 (..., S, S, 3)."""
        lead = lat.shape[:-3]
        lat = lat.reshape(-1, *lat.shape[-3:]) * self.latent_std[:, None, None] + self.latent_mean[:, None, None]
        frames = to_frames(self.ae.decode(lat))
        return frames.reshape(*lead, *frames.shape[1:])

    def to_tokens(self, lat: torch.Tensor) -> torch.Tensor:
        return rearrange(lat, "... c (h p) (w q) -> ... (h w) (p q c)", p=self.config.patch, q=self.config.patch)

    def to_latents(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.grid // self.config.patch
        return rearrange(tokens, "... (h w) (p q c) -> ... c (h p) (w q)", h=g, w=g, p=self.config.patch,
                         q=self.config.patch)

    # ---- inputs ---------------------------------------------------------------------------------
    def check_frames(self, frames, name: str = "frames") -> None:
        S = self.config.frame_size
        if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
            raise ValueError(f"{name} must be a uint8 torch.Tensor, got "
                             f"{frames.dtype if isinstance(frames, torch.Tensor) else type(frames).__name__}")
        if frames.ndim != 5 or tuple(frames.shape[2:]) != (S, S, 3):
            raise ValueError(f"{name} must have shape (batch, frames, {S}, {S}, 3), got {tuple(frames.shape)}")

    def check_actions(self, actions, batch: int, steps: int, name: str = "actions") -> None:
        if not isinstance(actions, torch.Tensor) or actions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer torch.Tensor of action ids")
        if tuple(actions.shape) != (batch, steps):
            raise ValueError(f"{name} must have shape ({batch}, {steps}), got {tuple(actions.shape)}")
        n = self.config.num_actions
        if actions.numel() and (actions.min() < 0 or actions.max() >= n):
            raise ValueError(f"{name} must lie in [0, {n - 1}] ({n} actions: {self.config.action_meanings}), "
                             f"got range [{int(actions.min())}, {int(actions.max())}]")

    def frame_conditions(self, actions: torch.Tensor, dropout: float = 0.0, generator=None) -> torch.Tensor:
        """actions (B, T-1) between frames -> per-frame conditions (B, T): null first, then a_0..a_T-2."""
        null = self.config.num_actions
        cond = F.pad(actions.long(), (1, 0), value=null)
        if dropout > 0:
            source = generator.device if generator is not None else cond.device
            drop = torch.rand(cond.shape, generator=generator, device=source).to(cond.device) < dropout
            cond = cond.masked_fill(drop, null)
        return cond

    # ---- data -> noise --------------------------------------------------------------------------
    def flow_forward(self, tokens: torch.Tensor, cond: torch.Tensor, per_token: bool = False):
        """tokens (B, T, N, D) -> z, logdet (B,) (per_token: (B, T, N)), per-frame hidden (B, T, width)."""
        logdet = 0.0
        for block in self.shallow:
            tokens, ld = block(tokens, per_token=per_token)
            logdet = logdet + ld
        z, ld, hidden = self.deep(tokens, cond, return_hidden=True, per_token=per_token)
        return z, logdet + ld, hidden

    def score_clip(self, frames: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None):
        """One teacher-forced pass over a real clip: the exact log-density (nats, per clip (B,)) of the
        sigma-noised latents of `frames` under `actions`, and the heads' logits (B, T-1, ...) for its steps.

        The flow models latents + N(0, sigma^2) noise; the noise is drawn from `generator` (a CPU one
        seeded 0 if none is given), so the same inputs always score the same, on any device.
        """
        self.check_frames(frames)
        self.check_actions(actions, frames.shape[0], frames.shape[1] - 1)
        generator = generator or torch.Generator().manual_seed(0)
        latents = self.frames_to_latents(frames)
        noisy = add_noise(latents, self.config.noise_sigma, generator)
        z, logdet, hidden = self.flow_forward(self.to_tokens(noisy), self.frame_conditions(actions.to(self.device)))
        return gaussian_log_prob(z) + logdet, self.outcome_logits(latents, hidden)

    def log_prob(self, frames: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None):
        """Exact log-density (nats, per clip) of the sigma-noised latents of `frames` under `actions`."""
        return self.score_clip(frames, actions, generator)[0]

    @torch.no_grad()
    def frame_log_probs(self, frames: torch.Tensor, actions: torch.Tensor,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact log-density (nats) of each frame's sigma-noised latents given the frames before it and
        the actions: (B, T), summing to `log_prob`. Exact because the flow is causal across frames (its
        Jacobian is block-triangular by frame), so the clip's density factors frame by frame."""
        self.check_frames(frames)
        self.check_actions(actions, frames.shape[0], frames.shape[1] - 1)
        generator = generator or torch.Generator().manual_seed(0)
        noisy = add_noise(self.frames_to_latents(frames), self.config.noise_sigma, generator)
        z, logdet, _ = self.flow_forward(self.to_tokens(noisy), self.frame_conditions(actions.to(self.device)),
                                         per_token=True)
        return (-0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1) + logdet).sum(-1)  # (B, T, N) tokens -> (B, T)

    def to_bits_per_dim(self, log_prob: torch.Tensor, frames: int) -> torch.Tensor:
        """Latent bits/dim of `frames` frames' log-density: -log p / (latent dims * ln 2). Not pixel bits/dim."""
        return -log_prob / (frames * self.tokens_per_frame * self.token_dim * math.log(2))

    def bits_per_dim(self, frames, actions, generator=None) -> torch.Tensor:
        return self.to_bits_per_dim(self.log_prob(frames, actions, generator), frames.shape[1])

    def encode(self, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Real clip -> its noise z (B, T, N, D): the flow's exact forward on the clean latents."""
        self.check_frames(frames)
        self.check_actions(actions, frames.shape[0], frames.shape[1] - 1)
        tokens = self.to_tokens(self.frames_to_latents(frames))
        return self.flow_forward(tokens, self.frame_conditions(actions.to(self.device)))[0]

    @torch.no_grad()
    def flow_inverse(self, z: torch.Tensor, cond: torch.Tensor, sampler: str = "jacobi", tol: float = JACOBI_TOL):
        """z (B, T, N, D) -> tokens: deep block frame by frame, then all frames' shallow blocks as one batch."""
        tokens = self.deep.inverse(z, cond, method=sampler, tol=tol).x
        for block in reversed(self.shallow):
            tokens = block.inverse(tokens, method=sampler, tol=tol).x
        return tokens

    @torch.no_grad()
    def decode(self, z: torch.Tensor, actions: torch.Tensor, sampler: str = "jacobi", tol: float = JACOBI_TOL):
        """Noise z (B, T, N, D) under `actions` (B, T-1) -> frames uint8 (B, T, S, S, 3)."""
        self.check_actions(actions, z.shape[0], z.shape[1] - 1)
        tokens = self.flow_inverse(z, self.frame_conditions(actions.to(self.device)), sampler, tol)
        return self.latents_to_frames(self.to_latents(tokens))

    # ---- training -------------------------------------------------------------------------------
    def forward(self, stage: str, *inputs):
        """One training stage's loss: the entry DistributedDataParallel wraps in data-parallel training.

        "ae" (frames, motion_weight) -> ae_loss; "flow" (frames, actions, outcomes, generator, weights,
        motion_weight) -> compute_losses; "heads" (frames, actions, outcomes, generator, weights) ->
        head_losses; "denoiser" (noisy) -> denoiser_loss.
        """
        stages = {"ae": self.ae_loss, "flow": self.compute_losses, "heads": self.head_losses,
                  "denoiser": self.denoiser_loss}
        if stage not in stages:
            raise ValueError(f"stage must be one of {list(stages)}, got {stage!r}")
        return stages[stage](*inputs)

    def ae_loss(self, frames: torch.Tensor, motion_weight: float = 0.0):
        """Reconstruction of uint8 clips (B, T, S, S, 3) through the autoencoder, on [-1, 1] pixels.

        Returns (loss, full-frame MSE, MSE over the pixels that changed since the previous frame). The
        loss adds `motion_weight` times the changed-pixel MSE: Breakout's ball is 2-3 of 4,096 pixels,
        and a plain MSE reaches 44 dB while drawing it at a sixth of its brightness.
        """
        pixels = to_pixels(frames).to(self.device)  # (B, T, 3, S, S)
        err = (self.ae.decode(self.ae.encode(pixels.flatten(0, 1))).view_as(pixels) - pixels).pow(2)
        moved = changed_pixels(frames)[:, :, None].to(self.device)  # (B, T-1, 1, S, S)
        moved_mse = (err[:, 1:] * moved).sum() / (3 * moved.sum()).clamp_min(1)
        mse = err.mean()
        return mse + motion_weight * moved_mse, mse.detach(), moved_mse.detach()

    def compute_losses(self, frames, actions, outcomes: dict, generator=None, weights: dict | None = None,
                       motion_weight: float = 0.0):
        """One clip batch -> dict of losses, and the noisy latents for the denoiser.

        outcomes: the clip's steps (B, T-1): rewards, terminated, steps_to_event (data.ClipDataset).
        weights (from `outcome_weights`) balance the rare reward signs, endings and lost lives against
        the rest: unweighted, the heads learn to predict the majority.

        motion_weight > 0 trains the flow on a weighted likelihood: each token's negative log-density
        counts 1 + motion_weight times if any of its pixels changed since the previous frame (see
        `moved_tokens`). losses["flow"] stays the plain NLL, which bits/dim report.

        After `losses["total"].backward()`, noisy.grad is d(flow NLL)/d(noisy) alone, the denoiser's
        target: the heads read clean latents and a detached hidden state, so their loss never
        reaches the noisy latents; under a motion weight the plain NLL's gradient is taken on its own
        (the weighted one is not the flow's score).
        """
        with torch.no_grad():  # float32 data even under autocast: the flow's density is of these values
            latents = self.frames_to_latents(frames).float()
        noisy = add_noise(latents, self.config.noise_sigma, generator).requires_grad_(True)
        cond = self.frame_conditions(actions, self.config.action_dropout, generator)
        z, logdet, hidden = self.flow_forward(self.to_tokens(noisy), cond, per_token=True)
        nll = 0.5 * z.pow(2).sum(-1) - logdet  # (B, T, N), nats up to a constant
        flow = nll.mean() / z.shape[-1]  # per dimension: 0.5 mean(z^2) - mean(logdet) / dims
        heads = self.outcome_losses(self.outcome_logits(latents, hidden), outcomes, weights)
        fitted = flow
        if motion_weight > 0:
            weight = 1 + motion_weight * self.moved_tokens(frames).to(nll)
            fitted = (weight * nll).sum() / (weight.sum() * z.shape[-1])
            (grad,) = torch.autograd.grad(flow, noisy, retain_graph=True)
            noisy = noisy.detach()
            noisy.grad = grad  # outside the graph: the backward below leaves it as it is
        return dict(flow=flow, **heads, total=fitted + heads["heads"]), noisy

    def head_losses(self, frames, actions, outcomes: dict, generator=None, weights: dict | None = None) -> dict:
        """The heads' losses alone, the flow run without gradients: to fit the heads of a trained world
        (train.train_flow false) at the cost of a forward pass. No action dropout: nothing is fitted
        that guidance would use."""
        with torch.no_grad():
            latents = self.frames_to_latents(frames).float()
            noisy = add_noise(latents, self.config.noise_sigma, generator)
            hidden = self.flow_forward(self.to_tokens(noisy), self.frame_conditions(actions))[2]
        heads = self.outcome_losses(self.outcome_logits(latents, hidden), outcomes, weights)
        return dict(**heads, total=heads["heads"])

    def outcome_losses(self, logits: HeadLogits, outcomes: dict, weights: dict | None = None) -> dict:
        """Heads' logits (B, T-1, ...) against the clip's steps -> reward, terminated, events and their sum."""
        weights = weights or {}
        reward = F.cross_entropy(logits.reward.flatten(0, 1), (outcomes["rewards"].sign().long() + 1).flatten(),
                                 weight=weights.get("reward"))
        term = F.binary_cross_entropy_with_logits(logits.terminated, outcomes["terminated"].float(),
                                                  pos_weight=weights.get("terminated"))
        events = (F.binary_cross_entropy_with_logits(logits.events, self.event_ahead(outcomes["steps_to_event"]),
                                                     pos_weight=weights.get("events"))
                  if logits.events.shape[-1] else torch.zeros((), device=term.device))
        return dict(reward=reward, terminated=term, events=events, heads=reward + term + events)

    def event_ahead(self, steps_to_event: torch.Tensor) -> torch.Tensor:
        """The event heads' target (..., E): 1.0 where the event happens between `event_delay` and
        `event_delay + event_horizon` steps ahead."""
        delay = self.config.event_delay
        return ((steps_to_event >= delay) & (steps_to_event < delay + self.config.event_horizon)).float()

    def moved_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 clips (B, T, S, S, 3) -> (B, T, N) bool: whether any pixel of each token's patch changed
        since the previous frame (never for frame 0). Breakout's ball and paddle are a few tokens of 64."""
        moved = changed_pixels(frames).float()  # (B, T-1, S, S)
        side = self.config.ae_downsample * self.config.patch  # pixels per token side
        moved = F.max_pool2d(moved.flatten(0, 1)[:, None], side).flatten(1).view(*moved.shape[:2], -1) > 0
        return F.pad(moved, (0, 0, 1, 0), value=False)

    def outcome_weights(self, rewards: torch.Tensor, terminated: torch.Tensor, steps_to_event: torch.Tensor) -> dict:
        """Balanced loss weights from a dataset's steps: each reward sign, ending vs not, and each event
        ahead vs not, counts as much in total as the others (a class never seen gets the weight of one
        occurrence)."""
        counts = torch.bincount(rewards.sign().long() + 1, minlength=3).float().clamp_min(1)

        def positive_weight(flags: torch.Tensor) -> torch.Tensor:  # (L, ...) -> (...)
            positives = flags.float().sum(0).clamp_min(1)
            return (len(flags) - positives) / positives

        return dict(reward=counts.max() / counts, terminated=positive_weight(terminated),
                    events=positive_weight(self.event_ahead(steps_to_event)))

    def outcome_logits(self, latents: torch.Tensor, hidden: torch.Tensor) -> HeadLogits:
        """Clean clip latents (B, T, C, h, w) and deep states (B, T, W) -> logits (B, T-1, ...) of the steps
        into frames 1..T-1. The states are detached: the heads' loss never shapes the flow."""
        B, T = latents.shape[:2]
        logits = self.heads(latents[:, 1:].flatten(0, 1), latents[:, :-1].flatten(0, 1), hidden[:, 1:].detach().flatten(0, 1))
        return logits.view(B, T - 1)

    def denoiser_loss(self, noisy: torch.Tensor) -> torch.Tensor:
        """MSE of D(x~_t, x~_t-1) to sigma * grad NLL, from noisy.grad left by the flow loss's backward."""
        B, T = noisy.shape[:2]
        dims = noisy[0].numel()
        target = self.config.noise_sigma * noisy.grad * B * dims  # flow loss = sum_b NLL_b / (B * dims)
        x = noisy.detach()
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        pred = self.denoiser(x.flatten(0, 1), previous.flatten(0, 1))
        return F.mse_loss(pred, target.flatten(0, 1))

    # ---- the simulator: stream frames through the deep block's cache ----------------------------
    def _both_branches(self, x, cond, guidance):
        """With guidance the cache holds [cond; null] rows, the same frame in both."""
        if guidance is None:
            return x, cond
        return torch.cat([x, x]), torch.cat([cond, torch.full_like(cond, self.config.num_actions)])

    def _shallow_forward(self, noisy: torch.Tensor):
        """Noisy latents (B, T, C, h, w) of real frames through the local blocks -> the deep block's input
        tokens (B, T, N, D), and each shallow block's input at the last frame (B, shallow_blocks, N, D): the
        warm starts a dream's next inversion begins from."""
        tokens, shallow_inputs = self.to_tokens(noisy), []
        for block in self.shallow:
            shallow_inputs.append(tokens[:, -1])
            tokens = block(tokens)[0]
        return tokens, torch.stack(shallow_inputs, dim=1)

    @torch.inference_mode()
    def start(self, frames: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None,
              guidance: float | None = None) -> WorldState:
        """Begin a dream from real context frames (B, K, S, S, 3) and the K-1 actions between them.

        The window is always primed with exactly `context_frames` frames (fewer are left-padded by
        repeating the first frame under the null action), so every state of a model has the same
        cache length and batch rows can be reset independently.
        """
        self.check_frames(frames)
        self.check_actions(actions, frames.shape[0], frames.shape[1] - 1)
        K, W = frames.shape[1], self.config.context_frames
        if K > W:
            raise ValueError(f"{K} context frames given; this model's window holds {W}")
        cond = self.frame_conditions(actions.to(self.device))
        frames = torch.cat([frames[:, :1].expand(-1, W - K, -1, -1, -1), frames], dim=1)
        cond = F.pad(cond, (W - K, 0), value=self.config.num_actions)
        latents = self.frames_to_latents(frames)
        noisy = add_noise(latents, self.config.noise_sigma, generator)
        tokens, shallow_inputs = self._shallow_forward(noisy)
        cache = self.deep.transformer.new_cache()
        for t in range(W):
            x, c = self._both_branches(tokens[:, t], cond[:, t], guidance)
            hidden = self.deep.forward_frame(x, cache, c)[2]
        # the heads on the last real frame, as training reads them: the risk a dream starts from
        previous = latents[:, -2] if W > 1 else latents[:, -1]
        hidden = hidden[:frames.shape[0]]
        risk = torch.sigmoid(self.heads(latents[:, -1], previous, hidden).events)
        return WorldState(cache, tokens[:, -1], shallow_inputs, noisy[:, -1], latents[:, -1],
                          risk, hidden, guidance)

    @torch.inference_mode()
    def observe(self, state: WorldState, frames: torch.Tensor, action: torch.Tensor,
                generator: torch.Generator | None = None) -> WorldState:
        """Advance `state` in place with real frames (B, S, S, 3) that followed `action` (B,), instead of
        dreaming them: the world filtering what it sees, as Ha & Schmidhuber's RNN reads the real game.
        The frame enters the window as `start` primes it (noisy latents, no inversion), and `features`
        of the result are a real game's state in the dream's own terms."""
        self.check_frames(frames[:, None])
        B = frames.shape[0]
        self.check_actions(action[:, None] if isinstance(action, torch.Tensor) else action, B, 1, "action")
        latents = self.frames_to_latents(frames[:, None])[:, 0]  # (B, C, h, w)
        noisy = add_noise(latents, self.config.noise_sigma, generator)
        tokens, shallow_inputs = self._shallow_forward(noisy[:, None])
        x, cond = self._both_branches(tokens[:, 0], action.long().to(self.device), state.guidance)
        hidden = self.deep.forward_frame(x, state.cache, cond)[2][:B]
        state.cache.slide(self.tokens_per_frame + 1)
        state.event_risk = torch.sigmoid(self.heads(latents, state.last_clean, hidden).events)
        state.last_solution, state.last_shallow = tokens[:, 0], shallow_inputs
        state.last_noisy, state.last_clean, state.hidden = noisy, latents, hidden
        return state

    @property
    def feature_size(self) -> int:
        """Length of `features`: the deep block's width plus the latent grid's C*h*w."""
        return self.config.width + self.config.latent_channels * self.grid**2

    def features(self, state: WorldState) -> torch.Tensor:
        """The world's causal state at its last frame as a flat vector (B, feature_size): the deep block's
        hidden state (its memory of the window, Ha & Schmidhuber's h) and the frame's clean latent grid (z)."""
        return torch.cat([state.hidden, state.last_clean.flatten(1)], dim=-1).float()

    def _tweedie(self, noisy: torch.Tensor, past: KVCache, cond: torch.Tensor) -> torch.Tensor:
        """Exact reference: x~ + sigma^2 * grad log p(x~_t | past, action), by autograd through the flow.

        The dream runs in inference mode, whose tensors autograd may not record: the score is taken
        outside it, on ordinary copies (`past` is one already)."""
        with torch.inference_mode(False), torch.enable_grad():
            x, cond = noisy.clone().requires_grad_(True), cond.clone()
            tokens, logdet = self.to_tokens(x)[:, None], 0.0
            for block in self.shallow:
                tokens, ld = block(tokens)
                logdet = logdet + ld
            z, ld, _ = self.deep.forward_frame(tokens[:, 0], past, cond, commit=False)
            log_p = gaussian_log_prob(z) + logdet + ld
            (score,) = torch.autograd.grad(log_p.sum(), x)
        return noisy + self.config.noise_sigma**2 * score

    @torch.inference_mode()
    def sample_next(self, state: WorldState, action: torch.Tensor, generator: torch.Generator | None = None,
                    sampler: str = "jacobi", denoiser: str = "flow-score", temperature: float = 1.0,
                    tol: float = JACOBI_TOL, noise: torch.Tensor | None = None) -> Step:
        """Dream the frame that follows `action` (B,) from `state`, which is advanced in place.

        The frame's Gaussian noise comes from `generator`, or is given as `noise` (B, N, D). Like `start`
        it runs in inference mode, so what it returns are inference tensors: clone() one to write into
        it or differentiate through it outside that mode.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if denoiser not in DENOISERS:
            raise ValueError(f"denoiser must be one of {DENOISERS}, got {denoiser!r}")
        B = state.last_solution.shape[0]
        self.check_actions(action[:, None] if isinstance(action, torch.Tensor) else action, B, 1, "action")
        cond = action.long().to(self.device)
        if noise is None:
            noise = randn_on((B, self.tokens_per_frame, self.token_dim), generator, self.device)
        z = temperature * noise
        past = None
        if denoiser == "tweedie":  # the past as it was before this frame (conditional rows only), an ordinary copy
            with torch.inference_mode(False):
                past = state.cache.select(slice(0, B))
        deep = self.deep.invert_frame(z, state.cache, cond, method=sampler, guidance=state.guidance,
                                      init=state.last_solution, tol=tol)
        tokens, logdet, shallow_inputs = deep.x, deep.logdet, [None] * len(self.shallow)
        for k in reversed(range(len(self.shallow))):  # local blocks: the frame alone, in parallel
            # warm-started from this block's solution for the last frame, as the deep block is
            inv = self.shallow[k].inverse(tokens[:, None], method=sampler, tol=tol, init=state.last_shallow[:, k])
            tokens, logdet = inv.x[:, 0], logdet + inv.logdet
            shallow_inputs[k] = tokens
        noisy = self.to_latents(tokens)
        if denoiser == "flow-score":
            clean = noisy - self.config.noise_sigma * self.denoiser(noisy, state.last_noisy)
        elif denoiser == "tweedie":
            clean = self._tweedie(noisy, past, cond)
        else:
            clean = noisy
        logits = self.heads(clean, state.last_clean, deep.hidden)
        log_p = gaussian_log_prob(z) + logdet
        state.last_solution, state.last_noisy, state.last_clean, state.hidden = deep.x, noisy, clean, deep.hidden
        state.event_risk = torch.sigmoid(logits.events)
        state.last_shallow = torch.stack(shallow_inputs, dim=1)
        state.cache.slide(self.tokens_per_frame + 1)  # the window is always full: drop its oldest frame
        return Step(frames=self.latents_to_frames(clean), reward=logits.reward.argmax(-1) - 1,
                    terminated=torch.sigmoid(logits.terminated), event_risk=state.event_risk,
                    bits_per_dim=self.to_bits_per_dim(log_p, 1),
                    iterations=deep.iterations)
