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
# 520), so the rotary tables and the chunk mask are built once per shape, not once per layer and call:
# at batch 1 building them was a tenth of the step's ATen calls. Callers never write to them, and they
# are made outside inference mode so a table first built there can still be used in training.
@lru_cache(maxsize=256)
def rope_table(start: int, length: int, head_dim: int, device: torch.device):
    """rope_angles at positions start..start+length-1."""
    with torch.inference_mode(False):
        return rope_angles(torch.arange(start, start + length, device=device), head_dim)


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
    """Keys and values of the tokens seen so far, per layer: (B, H, L, head_dim) each.

    Keys are stored already rotated to their positions 0..L-1. `slide(n)` drops the oldest n
    tokens and rotates the kept keys back by n: RoPE only sees relative positions, so attention
    scores between kept and new tokens are unchanged while positions stay bounded for ever (no
    float drift at position 10^6). As in any sliding-window attention, kept tokens' deeper-layer
    states still carry what they once saw of the dropped ones.
    """

    def __init__(self, n_layers: int, head_dim: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.head_dim = head_dim

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def rewind(self, length: int):
        """Forget every token after the first `length` (used between Jacobi iterations)."""
        if length == 0:
            self.keys = [None] * len(self.keys)
            self.values = [None] * len(self.values)
            return
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]

    def slide(self, n: int):
        """Drop the oldest n tokens and shift the rest back to positions 0..L-n-1."""
        if n <= 0:
            return
        if n >= self.length:
            self.rewind(0)
            return
        cos, sin = rope_angles(torch.tensor([-n], device=self.keys[0].device), self.head_dim)
        self.keys = [apply_rope(k[:, :, n:], cos, sin) for k in self.keys]
        self.values = [v[:, :, n:] for v in self.values]

    def set_rows(self, rows, other: "KVCache") -> None:
        """Overwrite batch rows with another cache of the same length (one env of a batch was reset)."""
        if other.length != self.length:
            raise ValueError(f"cache lengths differ: {other.length} vs {self.length}")
        for i in range(len(self.keys)):
            self.keys[i], self.values[i] = self.keys[i].clone(), self.values[i].clone()
            self.keys[i][rows], self.values[i][rows] = other.keys[i], other.values[i]

    def select(self, rows) -> "KVCache":
        """A new cache holding only the given batch rows (an index tensor or a slice)."""
        out = KVCache(len(self.keys), self.head_dim)
        if self.length:
            out.keys, out.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
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
        start = 0 if cache is None else cache.length
        cos, sin = rope_table(start, x.shape[1], self.head_dim, x.device)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        return self.norm(x)
