"""TARFlow: autoregressive affine flow blocks, their exact inverses, and a stack with a Gaussian prior.

Shapes: a clip of token grids is x (B, T, N, D): B samples, T frames, N tokens per frame, D
channels per token. A block is a causal transformer over the frames' tokens, each frame preceded
by a start token (learned, plus the frame's condition embedding: the action taken before it);
a conditioned block also adds a second embedding of the condition to every token of its frame,
so each prediction sees the action directly instead of only through attention to the start token:

    sequence = [start_0, x_0,0 .. x_0,N-1, start_1, x_1,0 .. x_1,N-1, ...]

The output at each position gives the affine map of the *next* data token, so

    z_t,i = (x_t,i - mu(x_<t,i)) / s(x_<t,i),      log|det J| = -sum log s

and the output at a frame's last token is that frame's hidden state (read by reward heads).
A `local` block folds frames into the batch (attention within each frame only); a non-local
block is causal over the whole clip. Inversion runs token by token (`inverse_sequential`) or as a
per-frame parallel fixed point (`jacobi_invert`, exact after at most N iterations).
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .transformer import CausalTransformer, KVCache

ORDERS = ("raster", "reverse", "reverse_within_frame")
SOFTPLUS_ONE = 0.5413  # softplus(0.5413) == 1: with a zero-initialised head every block starts as the identity
# Jacobi stops a row once a sweep moves it by less than this, relative: mean((new - old)^2) / mean(new^2)
# (TARFlow's criterion; the embedded worlds' frames then agree with sequential inversion at 63-73 dB
# on average, docs/breakout.md)
JACOBI_TOL = 1e-3


class Inversion(NamedTuple):
    """What an inverse returns: x, Jacobi sweeps used (per frame for a clip, an int for one frame),
    the log-determinant of the forward map at x (B,), and the hidden state after the last frame."""
    x: torch.Tensor
    iterations: list[int] | int
    logdet: torch.Tensor
    hidden: torch.Tensor | None = None


def soft_clip(x: torch.Tensor, bound: float = 4.0) -> torch.Tensor:
    return bound * torch.tanh(x / bound)


def check_tokens(x, token_dim: int, name: str = "x", tokens: int | None = None) -> None:
    """Raise a ValueError naming what is wrong with a (B, T, N, token_dim) float32 tensor (N = `tokens` if given)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise ValueError(f"{name} must be float32, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != token_dim or 0 in x.shape or tokens not in (None, x.shape[2]):
        raise ValueError(f"{name} must have shape (batch, frames, {tokens or 'tokens'}, {token_dim}), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def guided_affine(mu_c, s_c, mu_u, s_u, w: float):
    """Classifier-free guidance as the Gaussian product p_c^(1+w) / p_u^w of each token's conditional.

    r clips the unconditional precision so the product's variance stays positive.
    """
    r = torch.clamp(s_c / s_u, max=1.0) ** 2
    denom = 1 + w - w * r
    return ((1 + w) * mu_c - w * r * mu_u) / denom, s_c / denom.sqrt()


def gaussian_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) in nats, summed over all but the batch dimension: (B,)."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


def randn_on(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn from `generator` on its own device, then moved to `device`: a CPU
    generator (training's, seeded once) gives the same numbers whichever device the model is on."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise augmentation: the flow models x + sigma * eps, which keeps its density smooth."""
    if sigma == 0:
        return x
    return x + sigma * randn_on(x.shape, generator, x.device, x.dtype)


class TARFlowBlock(nn.Module):
    def __init__(self, token_dim: int, width: int, depth: int, heads: int,
                 order: str = "raster", local: bool = False, num_classes: int = 0,
                 tokens_per_frame: int | None = None):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.token_dim, self.order, self.local, self.num_classes = token_dim, order, local, num_classes
        self.proj_in = nn.Linear(token_dim, width)
        self.start = nn.Parameter(torch.randn(width) * 0.02)
        # Where each token sits in its frame (in this block's reading order). RoPE alone gives only
        # 1-D offsets in the flattened video, so "the same spot one frame back" is a learned
        # interference pattern; with this it is a content match. Zero at first: a block trained
        # without it behaves unchanged. Only for a fixed frame size (None: any length, no embedding).
        self.tokens_per_frame = tokens_per_frame
        self.pos = nn.Parameter(torch.zeros(tokens_per_frame, width)) if tokens_per_frame else None
        # one row per class plus a learned null row (index num_classes) for dropout / guidance
        self.cond_embed = nn.Embedding(num_classes + 1, width) if num_classes else None
        # the per-token condition starts at zero: a block trained without it loads and behaves unchanged
        self.cond_tokens = nn.Embedding(num_classes + 1, width) if num_classes else None
        if num_classes:
            nn.init.zeros_(self.cond_tokens.weight)
        self.transformer = CausalTransformer(width, depth, heads)
        self.head = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    # ---- orders, start tokens, the affine map -------------------------------------------------
    def _permute(self, x):
        """Token order this block reads in; every order is its own inverse. x (B, T, N, ...)."""
        if self.order == "reverse_within_frame":
            return x.flip(2)
        if self.order == "reverse":  # the whole sequence: frames reversed and tokens within them
            return x.flip(1).flip(2)
        return x

    def _frame_inputs(self, cond, B: int, T: int):
        """Each frame's start token and the condition bias added to its data tokens, both (B, T, width)."""
        start = self.start.expand(B, T, -1)
        if self.cond_embed is None:
            return start, torch.zeros_like(start)
        if cond is None:
            cond = torch.full((B, T), self.num_classes, dtype=torch.long, device=start.device)
        if self.order == "reverse":
            cond = cond.flip(1)
        return start + self.cond_embed(cond), self.cond_tokens(cond)

    def _branch_inputs(self, cond, B: int, T: int, guidance):
        """`_frame_inputs` for inversion: (B, T, W) each, or [cond; null] rows (2B, T, W) under guidance."""
        start, bias = self._frame_inputs(cond, B, T)
        if guidance is None:
            return start, bias
        null_start, null_bias = self._frame_inputs(None, B, T)
        return torch.cat([start, null_start]), torch.cat([bias, null_bias])

    def _to_noise(self, xp, h):
        """z = (x - mu) / s from the transformer outputs h (..., N+1, W); logdet of each token (..., N)."""
        mu, s = self._affine(h[..., :-1, :])
        return (xp.float() - mu) / s, -s.log().sum(-1)

    def _affine(self, h: torch.Tensor):
        """Transformer output -> (mu, s) in float32, both soft-clipped so no step can explode."""
        a, mu = self.head(h).float().chunk(2, dim=-1)
        return soft_clip(mu), F.softplus(soft_clip(a) + SOFTPLUS_ONE)

    def _check_cond(self, cond, B: int, T: int, name: str = "cond") -> None:
        if cond is None:
            return
        if self.cond_embed is None:
            raise ValueError(f"{name} given to a block built without conditioning (num_classes=0)")
        if not isinstance(cond, torch.Tensor) or cond.dtype != torch.long:
            raise ValueError(f"{name} must be a torch.long tensor of class/action ids, got "
                             f"{cond.dtype if isinstance(cond, torch.Tensor) else type(cond).__name__}")
        if tuple(cond.shape) != (B, T):
            raise ValueError(f"{name} must have shape (batch, frames) = ({B}, {T}), got {tuple(cond.shape)}")
        if cond.numel() and (cond.min() < 0 or cond.max() > self.num_classes):
            raise ValueError(f"{name} ids must lie in [0, {self.num_classes}] ({self.num_classes} = null), "
                             f"got range [{int(cond.min())}, {int(cond.max())}]")

    def _fold(self, x, cond):
        """Local blocks see each frame alone: (B, T, N, D) -> (B*T, 1, N, D)."""
        B, T = x.shape[:2]
        x = x.reshape(B * T, 1, *x.shape[2:])
        return x, None if cond is None else cond.reshape(B * T, 1)

    # ---- data -> noise ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, return_hidden: bool = False,
                per_token: bool = False):
        """x (B, T, N, D) -> z (B, T, N, D), logdet (B,) [, hidden (B, T, width) after each frame].

        per_token: logdet (B, T, N) instead, each token's share at its place in x (the Jacobian is
        triangular, so the log-det splits into one term per token).
        """
        check_tokens(x, self.token_dim, tokens=self.tokens_per_frame)
        B, T, N, D = x.shape
        self._check_cond(cond, B, T)
        if self.local:
            x, cond = self._fold(x, cond)
        xp = self._permute(x)
        b, t = xp.shape[:2]
        start, bias = self._frame_inputs(cond, b, t)
        tokens = torch.cat([start[:, :, None], self._embed(xp, bias[:, :, None])], dim=2)  # (b, t, N+1, W)
        h = self.transformer(tokens.flatten(1, 2)).view(b, t, N + 1, -1)
        zp, logdet = self._to_noise(xp, h)
        z = self._permute(zp).reshape(B, T, N, D)
        logdet = self._permute(logdet[..., None]).reshape(B, T, N) if per_token else logdet.reshape(B, -1).sum(dim=1)
        if not return_hidden:
            return z, logdet
        if self.local or self.order == "reverse":
            raise ValueError("per-frame hidden states exist only for non-local blocks in frame order")
        return z, logdet, h[:, :, N]

    def forward_frame(self, x: torch.Tensor, cache: KVCache, cond: torch.Tensor | None = None, commit: bool = True):
        """Data -> noise for one frame x (B, N, D) that follows the frames in `cache`.

        Returns z (B, N, D), logdet (B,), hidden after the frame (B, width). With commit=False the
        cache is left as it was (e.g. to score a candidate frame, or differentiate through it).
        """
        if self.local or self.order == "reverse":
            raise ValueError("forward_frame streams frames through a non-local block in frame order")
        check_tokens(x[:, None], self.token_dim, tokens=self.tokens_per_frame)
        self._check_cond(None if cond is None else cond[:, None], x.shape[0], 1)
        xp = x.flip(1) if self.order == "reverse_within_frame" else x
        past = cache.length
        start, bias = self._frame_inputs(None if cond is None else cond[:, None], x.shape[0], 1)
        h = self.transformer(torch.cat([start, self._embed(xp, bias)], dim=1), cache)
        if not commit:
            cache.rewind(past)
        zp, logdet = self._to_noise(xp, h)
        return (zp.flip(1) if self.order == "reverse_within_frame" else zp), logdet.sum(-1), h[:, -1]

    # ---- noise -> data ---------------------------------------------------------------------------
    def _affine_step(self, h, z, guidance):
        """x = mu + s * z for one token or chunk, and s; with guidance the batch holds [cond; uncond] rows."""
        mu, s = self._affine(h)
        if guidance is not None:
            (mu_c, mu_u), (s_c, s_u) = mu.chunk(2), s.chunk(2)
            mu, s = guided_affine(mu_c, s_c, mu_u, s_u, guidance)
        return mu + s * z, s

    def _embed(self, x, bias, first: int = 0, guidance=None):
        """Data tokens (..., n, D), at places first..first+n-1 of their frame -> transformer inputs (..., n, W).

        bias (..., 1, W) is the frame's condition; with guidance it holds [cond; null] rows (2B) and
        the tokens go into both branches.
        """
        h = self.proj_in(x)
        if self.pos is not None:
            h = h + self.pos[first:first + x.shape[-2]]
        h = h if guidance is None else torch.cat([h, h])
        return h + bias

    def _solve_frame(self, z, start, bias, cache: KVCache, method: str, init, guidance, tol: float, max_iters):
        """Invert one frame in this block's token order, given everything before it in `cache`.

        z (B, N, D); start and the condition bias (B or 2B, W). Appends the frame's N+1 tokens to the cache
        (a local block's Jacobi, whose cache nothing reads, leaves it as it was).
        Returns Inversion(x (B, N, D), sweeps used, logdet (B,), hidden state after the frame (B, W);
        None from a local block's Jacobi, which makes no pass over the finished frame).
        """
        B, N, _ = z.shape
        bias = bias[:, None]  # one condition for all the frame's tokens: (B or 2B, 1, W)
        if method == "sequential":
            token, xs, hs = start[:, None], [], []
            for i in range(N):
                hs.append(self.transformer(token, cache)[:, 0])
                xs.append(self._affine_step(hs[-1], z[:, i], guidance)[0])
                token = self._embed(xs[-1][:, None], bias, i, guidance)
            hs.append(self.transformer(token, cache)[:, 0])  # the last token too, so later frames see it
            x, h, iters = torch.stack(xs, dim=1), torch.stack(hs, dim=1), N
        elif method == "jacobi":
            # All N tokens in parallel: x <- mu(x) + s(x) * z. After k sweeps the first k tokens are
            # exact (causality), so N sweeps always suffice; usually far fewer meet the tolerance.
            past, x = cache.length, (z if init is None else init).clone()
            max_iters = N if max_iters is None else min(max_iters, N)
            # Each sample stops on its own, so in a batch a row gets what it would get alone; and the
            # sweeps run on the rows still moving only (a batch otherwise pays for its slowest row at
            # every row: 9.5 sweeps a frame at batch 64 against 3.8 at batch 1). Settled rows are
            # frozen at once but dropped only once they are half the rows swept: dropping copies
            # their cache, which cost more than sweeping them a little longer.
            rows = torch.arange(B, device=z.device)  # swept
            settled = torch.zeros(B, dtype=torch.bool, device=z.device)  # of the swept rows: frozen
            live_start, live_bias = start, bias
            # A local block's frame is its whole sequence: nothing after it reads the frame's keys, so
            # it sweeps without a cache and needs no commit pass (a quarter of the shallow blocks'
            # passes). Its log-det is each row's last sweep's, taken at the iterate before x.
            live_cache, logdet = (None, z.new_zeros(B)) if self.local else (cache, None)
            for iters in range(1, max_iters + 1):
                x_live = x[rows]
                tokens = torch.cat([live_start[:, None], self._embed(x_live[:, :-1], live_bias, 0, guidance)], dim=1)
                h = self.transformer(tokens, live_cache)
                if live_cache is not None:
                    live_cache.rewind(past)
                x_new, s = self._affine_step(h, z[rows], guidance)
                change = (x_new - x_live).pow(2).flatten(1).mean(1) / x_new.pow(2).flatten(1).mean(1).clamp_min(1e-12)
                update = ~settled
                x[rows[update]] = x_new[update]
                if self.local:
                    logdet[rows[update]] = -s.log().flatten(1).sum(1)[update]
                settled |= change < tol
                if settled.all():
                    break
                if 2 * settled.sum() >= len(rows):  # drop the settled rows (both branches of each under guidance)
                    keep = (~settled).nonzero()[:, 0]
                    keep = keep if guidance is None else torch.cat([keep, keep + len(rows)])
                    rows, settled = rows[~settled], settled[~settled]
                    live_start, live_bias = live_start[keep], live_bias[keep]
                    live_cache = None if live_cache is None else live_cache.select(keep)
            if self.local:
                return Inversion(x, iters, logdet)
            # commit the solved frame so the cache holds exactly what a forward pass would have
            tokens = torch.cat([start[:, None], self._embed(x, bias, 0, guidance)], dim=1)
            h = self.transformer(tokens, cache)
        else:
            raise ValueError(f"method must be 'jacobi' or 'sequential', got {method!r}")
        return Inversion(x, iters, self._to_noise(x, h[:B])[1].sum(-1), h[:B, -1])

    def _check_inverse_args(self, z, cond, guidance):
        check_tokens(z, self.token_dim, "z", self.tokens_per_frame)
        self._check_cond(cond, z.shape[0], z.shape[1])
        if guidance is not None and self.cond_embed is None:
            raise ValueError("guidance needs a conditioned block (num_classes > 0)")

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None, method: str = "jacobi",
                guidance: float | None = None, init: torch.Tensor | None = None,
                tol: float = JACOBI_TOL, max_iters: int | None = None):
        """z (B, T, N, D) -> Inversion(x (B, T, N, D), sweeps per frame (list of T ints), logdet (B,)).

        Frames are solved in order (causal in time). Jacobi starts frame 0 from `init` (B, N, D)
        (default: z itself, the identity's answer) and each later frame from the previous frame's
        solution: the video-aware warm start. `guidance` w mixes in the null condition.
        """
        self._check_inverse_args(z, cond, guidance)
        B, T, N, D = z.shape
        if self.local:  # frames are independent: solve them all as one batch
            z, cond = self._fold(z, cond)
            if init is not None:
                init = init[:, None].expand(B, T, N, D).reshape(B * T, N, D)
        zp = self._permute(z)
        b, t = zp.shape[:2]
        start, bias = self._branch_inputs(cond, b, t, guidance)
        cache = self.transformer.new_cache()
        guess = None if init is None else self._permute(init[:, None])[:, 0]
        xs, iters, logdet = [], [], 0.0
        for i in range(t):
            frame = self._solve_frame(zp[:, i], start[:, i], bias[:, i], cache, method, guess, guidance, tol, max_iters)
            xs.append(frame.x)
            iters.append(frame.iterations)
            logdet = logdet + frame.logdet
            guess = frame.x
        x = self._permute(torch.stack(xs, dim=1)).reshape(B, T, N, D)
        return Inversion(x, iters * T if self.local else iters, logdet.reshape(B, -1).sum(dim=1))

    def inverse_sequential(self, z, cond=None, guidance=None):
        """Reference inverse: one token at a time through the KV cache."""
        return self.inverse(z, cond, method="sequential", guidance=guidance).x

    def jacobi_invert(self, z, cond=None, guidance=None, init=None, tol=JACOBI_TOL, max_iters=None):
        """Parallel inverse: each frame's tokens solved together as a fixed point."""
        return self.inverse(z, cond, "jacobi", guidance, init, tol, max_iters)

    def invert_frame(self, z: torch.Tensor, cache: KVCache, cond: torch.Tensor | None = None,
                     method: str = "jacobi", guidance: float | None = None, init: torch.Tensor | None = None,
                     tol: float = JACOBI_TOL, max_iters: int | None = None):
        """Stream one new frame: z (B, N, D) and its condition (B,) given the earlier frames in `cache`.

        Appends the frame to the cache (with guidance the cache holds 2B rows: [cond; null]).
        Returns Inversion(x (B, N, D), sweeps used, logdet (B,), hidden after the frame (B, width)).
        """
        if self.local or self.order == "reverse":
            raise ValueError("invert_frame streams frames through a non-local block in frame order")
        self._check_inverse_args(z[:, None], None if cond is None else cond[:, None], guidance)
        start, bias = self._branch_inputs(None if cond is None else cond[:, None], z.shape[0], 1, guidance)
        start, bias = start[:, 0], bias[:, 0]
        if self.order == "reverse_within_frame":
            out = self._solve_frame(z.flip(1), start, bias, cache, method, None if init is None else init.flip(1),
                                    guidance, tol, max_iters)
            return out._replace(x=out.x.flip(1))
        return self._solve_frame(z, start, bias, cache, method, init, guidance, tol, max_iters)


class TARFlow(nn.Module):
    """A stack of TARFlow blocks on the data -> noise path, with a standard Gaussian prior."""

    def __init__(self, blocks: list[TARFlowBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    @classmethod
    def alternating(cls, token_dim: int, n_blocks: int, width: int, depth: int, heads: int,
                    num_classes: int = 0, video: bool = False) -> "TARFlow":
        """Blocks alternating raster / reversed order (within each frame if `video`, keeping time causal)."""
        flip = "reverse_within_frame" if video else "reverse"
        return cls([TARFlowBlock(token_dim, width, depth, heads, order=("raster", flip)[i % 2], num_classes=num_classes)
                    for i in range(n_blocks)])

    def _cond_for(self, block, cond):
        return cond if block.cond_embed is not None else None

    def forward(self, x, cond=None):
        """x (B, T, N, D) -> z, summed logdet (B,)."""
        logdet = 0.0
        for block in self.blocks:
            x, ld = block(x, self._cond_for(block, cond))
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x, cond=None) -> torch.Tensor:
        """Exact log-density in nats per sample, (B,)."""
        z, logdet = self(x, cond)
        return gaussian_log_prob(z) + logdet

    def bits_per_dim(self, x, cond=None) -> torch.Tensor:
        return -self.log_prob(x, cond) / (x[0].numel() * math.log(2))

    def loss(self, x, cond=None) -> torch.Tensor:
        """Training objective: 0.5 mean(z^2) - mean logdet per dimension (NLL per dim minus a constant)."""
        z, logdet = self(x, cond)
        return 0.5 * z.pow(2).mean() - logdet.mean() / x[0].numel()

    def inverse(self, z, cond=None, method="jacobi", guidance=None, tol=JACOBI_TOL, max_iters=None):
        """z -> x through the blocks in reverse; returns x and the Jacobi sweeps per block (last block first)."""
        iters = []
        for block in reversed(self.blocks):
            g = guidance if block.cond_embed is not None else None
            z, n, _, _ = block.inverse(z, self._cond_for(block, cond), method, g, tol=tol, max_iters=max_iters)
            iters.append(n)
        return z, iters

    @torch.no_grad()
    def sample(self, shape, cond=None, temperature: float = 1.0, generator=None, **kwargs):
        z = temperature * torch.randn(shape, generator=generator)
        return self.inverse(z, cond, **kwargs)[0]
