"""A causal pre-LN transformer with rotary positions and a KV cache that appends, rewinds and slides.

Every TARFlow block is one of these. The cache is what makes a flow stream: token-by-token
(sequential inversion), chunk-at-a-time (Jacobi), and a sliding window over past frames (the
environment's constant-memory state).
"""

from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos/sin tables for rotary embeddings at the given (possibly negative) positions: (L, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


# A dream step runs the same few shapes again and again (a Jacobi sweep: 64 tokens after a window of
# 520), so the rotary tables and the chunk mask are built once, not once per layer and call: at
# batch 1 building them was a tenth of the step's ATen calls. Callers never write to them, and they
# are made outside inference mode so a table first built there can still be used in training.
@lru_cache(maxsize=32)
def _rope_positions(size: int, head_dim: int, device: torch.device):
    with torch.inference_mode(False):
        return rope_angles(torch.arange(size, device=device), head_dim)


def rope_table(start: int, length: int, head_dim: int, device: torch.device):
    """rope_angles at positions start..start+length-1 (slices of one table per power-of-two size:
    the same values, as each angle is its own position times the frequency)."""
    size = 1 << max(start + length - 1, 1).bit_length()
    cos, sin = _rope_positions(size, head_dim, device)
    return cos[start:start + length], sin[start:start + length]


@lru_cache(maxsize=64)
def chunk_mask(length: int, past: int, device: torch.device) -> torch.Tensor:
    """Additive attention mask (length, past+length) for a chunk after `past` cached tokens: it sees
    all of the past and is causal within itself."""
    with torch.inference_mode(False):
        allowed = torch.ones(length, past + length, dtype=torch.bool, device=device).tril(diagonal=past)
        return torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, float("-inf"))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's channels: x (..., L, hd), cos/sin (L, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, every layer's in one preallocated buffer.

    buffer (n_layers, 2 [keys; values], B, H, capacity, head_dim) is allocated at the first append
    (with that key's dtype and device); the live tokens sit at buffer indices start..end-1, and a key
    is stored rotated to its buffer index, which is its RoPE position. So appending writes in place
    (no concatenation per token), and `slide(n)` only moves `start`: RoPE sees relative positions
    alone, so attention scores between kept and new tokens are unchanged. When the end reaches the
    capacity the live tokens move back to index 0 and their keys are rotated back by `start`: once
    every few frames instead of every frame, and positions stay bounded for ever (no float drift at
    position 10^6). As in any sliding-window attention, kept tokens' deeper-layer states still carry
    what they once saw of the dropped ones.
    """

    def __init__(self, n_layers: int, head_dim: int):
        self.n_layers, self.head_dim = n_layers, head_dim
        self.buffer: torch.Tensor | None = None
        self.start = self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def batch_size(self) -> int:
        return 0 if self.buffer is None else self.buffer.shape[2]

    def reserve(self, n: int) -> int:
        """Make room for n more tokens (called once per forward, before its layers append them);
        returns the RoPE position of the first."""
        if self.buffer is not None and self.end + n > self.buffer.shape[4]:
            self._compact(n)
        return self.end

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write a layer's new keys and values (B, H, n, hd) after the live tokens; returns that layer's
        live keys and values with them, (B, H, length+n, hd) views of the buffer."""
        n = k.shape[2]
        if self.buffer is None:
            self.buffer = k.new_empty((self.n_layers, 2, *k.shape[:2], max(2 * n, 64), self.head_dim))
        elif k.dtype != self.buffer.dtype or k.shape[:2] != self.buffer.shape[2:4]:
            raise ValueError(f"keys {tuple(k.shape)} {k.dtype} do not fit this cache's "
                             f"{tuple(self.buffer.shape[2:4])} {self.buffer.dtype}")
        self.buffer[layer, 0, :, :, self.end:self.end + n] = k.detach()
        self.buffer[layer, 1, :, :, self.end:self.end + n] = v.detach()
        if k.requires_grad or v.requires_grad:
            # under autograd (the flow-score reference differentiates through this frame) the next
            # layer's in-place write would invalidate views saved for backward, so the new tokens
            # join the (constant) past by concatenation, which saves nothing
            past = self.buffer[layer, :, :, :, self.start:self.end]
            return torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        live = self.buffer[layer, :, :, :, self.start:self.end + n]
        return live[0], live[1]

    def advance(self, n: int):
        """The n tokens every layer appended are now part of the cache."""
        self.end += n

    def _compact(self, n: int):
        """Move the live tokens to index 0 (keys rotated back by `start`), growing the buffer when
        they and n more would fill over half of it."""
        live = self.buffer[:, :, :, :, self.start:self.end]
        cos, sin = rope_angles(torch.tensor([-self.start], device=live.device), self.head_dim)
        keys, values = apply_rope(live[:, 0], cos, sin), live[:, 1].clone()
        capacity = self.buffer.shape[4]
        if 2 * (self.length + n) > capacity:
            capacity = 2 * (self.length + n)
            self.buffer = self.buffer.new_empty((*self.buffer.shape[:4], capacity, self.head_dim))
        self.buffer[:, 0, :, :, :self.length] = keys
        self.buffer[:, 1, :, :, :self.length] = values
        self.start, self.end = 0, self.length

    def rewind(self, length: int):
        """Forget every token after the first `length` (used between Jacobi iterations)."""
        self.end = self.start + length

    def slide(self, n: int):
        """Drop the oldest n tokens."""
        if n >= self.length:
            self.start = self.end = 0
        elif n > 0:
            self.start += n

    def empty_like(self, batch: int) -> "KVCache":
        """A cache of this one's length and capacity for `batch` rows, their contents unset (each is
        written with set_rows)."""
        out = KVCache(self.n_layers, self.head_dim)
        out.buffer = self.buffer.new_empty((*self.buffer.shape[:2], batch, *self.buffer.shape[3:]))
        out.start, out.end = self.start, self.end
        return out

    def set_rows(self, rows, other: "KVCache") -> None:
        """Overwrite batch rows with another cache of the same length (one env of a batch was reset);
        its keys are rotated to this cache's positions."""
        if other.length != self.length:
            raise ValueError(f"cache lengths differ: {other.length} vs {self.length}")
        theirs = other.buffer[:, :, :, :, other.start:other.end]
        keys = theirs[:, 0]
        if other.start != self.start:
            cos, sin = rope_angles(torch.tensor([self.start - other.start], device=keys.device), self.head_dim)
            keys = apply_rope(keys, cos, sin)
        self.buffer[:, 0, rows, :, self.start:self.end] = keys
        self.buffer[:, 1, rows, :, self.start:self.end] = theirs[:, 1]

    def select(self, rows) -> "KVCache":
        """A new cache holding a copy of the given batch rows (an index tensor or a slice)."""
        out = KVCache(self.n_layers, self.head_dim)
        if self.buffer is not None:
            picked = self.buffer[:, :, rows, :, self.start:self.end]  # a copy for an index, a view for a slice
            out.buffer = self.buffer.new_empty((*picked.shape[:4], self.buffer.shape[4], self.head_dim))
            out.buffer[:, :, :, :, self.start:self.end] = picked
            out.start, out.end = self.start, self.end
        return out


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0 and (width // heads) % 2 == 0, "head_dim must be even for RoPE"
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int):
        B, L, W = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, L, hd)
        q, k = apply_rope(qkv[:2], cos, sin)  # queries and keys rotated together
        v = qkv[2]
        if cache is not None:
            k, v = cache.append(layer, k, v)
        past = k.shape[2] - L
        mask = chunk_mask(L, past, x.device) if past and L > 1 else None  # one token after a past sees all of it
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not past and L > 1)
        return self.out(y.transpose(1, 2).reshape(B, L, W))


class TransformerLayer(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x, cos, sin, cache, layer):
        x = x + self.attn(self.norm1(x), cos, sin, cache, layer)
        return x + self.mlp(self.norm2(x))


class CausalTransformer(nn.Module):
    """(B, L, width) -> (B, L, width), token i sees tokens <= i (and everything in the cache)."""

    def __init__(self, width: int, depth: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(width, heads) for _ in range(depth))
        self.norm = nn.RMSNorm(width)
        self.head_dim = width // heads

    def new_cache(self) -> KVCache:
        return KVCache(len(self.layers), self.head_dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        start = 0 if cache is None else cache.reserve(x.shape[1])
        cos, sin = rope_table(start, x.shape[1], self.head_dim, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)
