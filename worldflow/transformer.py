"""A causal pre-LN transformer with rotary positions and a KV cache that appends, rewinds and slides.

Every TARFlow block is one of these. The cache is what makes a flow stream: token-by-token
(sequential inversion), chunk-at-a-time (Jacobi), and a sliding window over past frames (the
environment's constant-memory state).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def rope_angles(positions: torch.Tensor, head_dim: int, base: float = 10000.0):
    """cos/sin tables for rotary embeddings at the given (possibly negative) positions: (L, head_dim/2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head's channels: x (B, H, L, hd), cos/sin (L, hd/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, H, L, head_dim) each, held as the
    first L positions of a buffer with room for more.

    Appending writes into the buffer in place. A Jacobi sweep appends a guess for a whole frame and
    rewinds it again, so concatenating would copy the entire past at every sweep; writing copies only
    the new tokens. A full buffer is replaced by one twice as long, so a sliding window settles at a
    constant size. A cache owns its buffers: `select` and `from_tensors` copy, so no two caches share
    memory and writing one never changes another.

    Keys are stored already rotated to their positions 0..L-1. `slide(n)` drops the oldest n
    tokens and rotates the kept keys back by n: RoPE only sees relative positions, so attention
    scores between kept and new tokens are unchanged while positions stay bounded for ever (no
    float drift at position 10^6). As in any sliding-window attention, kept tokens' deeper-layer
    states still carry what they once saw of the dropped ones.
    """

    def __init__(self, n_layers: int, head_dim: int):
        self._keys: list[torch.Tensor | None] = [None] * n_layers  # buffers (B, H, capacity, head_dim)
        self._values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers  # per layer: a forward pass appends one layer after another
        self.head_dim = head_dim

    @classmethod
    def from_tensors(cls, keys: list[torch.Tensor], values: list[torch.Tensor], head_dim: int) -> "KVCache":
        """A cache holding copies of the given per-layer keys (already rotated) and values."""
        cache = cls(len(keys), head_dim)
        for layer, (k, v) in enumerate(zip(keys, values)):
            cache.append(layer, k, v)
        return cache

    @property
    def length(self) -> int:
        return self.lengths[0]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        return [None if b is None else b[:, :, :n] for b, n in zip(self._keys, self.lengths)]

    @property
    def values(self) -> list[torch.Tensor | None]:
        return [None if b is None else b[:, :, :n] for b, n in zip(self._values, self.lengths)]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, L_new, head_dim) after this layer's tokens; returns all of them as views."""
        n, total = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if self._keys[layer] is None or total > self._keys[layer].shape[2]:
            capacity = max(total, 2 * n)
            self._keys[layer] = _moved(self._keys[layer], n, k, capacity)
            self._values[layer] = _moved(self._values[layer], n, v, capacity)
        self._keys[layer][:, :, n:total] = k
        self._values[layer][:, :, n:total] = v
        self.lengths[layer] = total
        return self._keys[layer][:, :, :total], self._values[layer][:, :, :total]

    def rewind(self, length: int):
        """Forget every token after the first `length` (used between Jacobi iterations)."""
        self.lengths = [min(length, n) for n in self.lengths]

    def slide(self, n: int):
        """Drop the oldest n tokens and shift the rest back to positions 0..L-n-1."""
        if n <= 0:
            return
        if n >= self.length:
            self.rewind(0)
            return
        cos, sin = rope_angles(torch.tensor([-n], device=self._keys[0].device), self.head_dim)
        for i, length in enumerate(self.lengths):
            kept = self._keys[i][:, :, n:length]
            self._keys[i] = _moved(None, 0, kept, self._keys[i].shape[2])
            self._keys[i][:, :, :length - n] = apply_rope(kept, cos, sin)
            self._values[i] = _moved(self._values[i][:, :, n:length], length - n, kept, self._values[i].shape[2])
            self.lengths[i] = length - n

    def set_rows(self, rows, other: "KVCache") -> None:
        """Overwrite batch rows with another cache of the same length (one env of a batch was reset)."""
        if other.length != self.length:
            raise ValueError(f"cache lengths differ: {other.length} vs {self.length}")
        for i, n in enumerate(self.lengths if self.length else ()):
            self._keys[i][rows, :, :n], self._values[i][rows, :, :n] = other.keys[i], other.values[i]

    def select(self, rows) -> "KVCache":
        """A new cache holding copies of the given batch rows (an index tensor or a slice)."""
        if not self.length:
            return KVCache(len(self.lengths), self.head_dim)
        return KVCache.from_tensors([k[rows] for k in self.keys], [v[rows] for v in self.values], self.head_dim)


def _moved(old: torch.Tensor | None, n: int, like: torch.Tensor, capacity: int) -> torch.Tensor:
    """A new buffer (B, H, capacity, head_dim) shaped like `like`, holding old's first n positions."""
    B, H, _, D = like.shape
    buffer = like.new_empty(B, H, capacity, D)
    if old is not None and n:
        buffer[:, :, :n] = old[:, :, :n]
    return buffer


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0 and (width // heads) % 2 == 0, "head_dim must be even for RoPE"
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int):
        B, L, W = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        past = k.shape[2] - L
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
        elif L == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # a chunk after a cached prefix: sees all of the past, causal inside the chunk
            mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        cos, sin = rope_angles(torch.arange(start, start + x.shape[1], device=x.device), self.head_dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        return self.norm(x)
