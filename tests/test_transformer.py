"""The causal transformer's KV cache must reproduce the full causal forward exactly."""

import torch

from worldflow.transformer import CausalTransformer


def make(seed=0):
    torch.manual_seed(seed)
    return CausalTransformer(width=32, depth=2, heads=4).eval()


@torch.no_grad()
def test_token_by_token_and_chunked_cache_match_full_forward():
    net, x = make(), torch.randn(2, 11, 32)
    full = net(x)
    cache = net.new_cache()
    one_by_one = torch.cat([net(x[:, i:i + 1], cache) for i in range(11)], dim=1)
    assert torch.allclose(one_by_one, full, atol=1e-5)
    cache = net.new_cache()
    chunks = torch.cat([net(x[:, :4], cache), net(x[:, 4:5], cache), net(x[:, 5:], cache)], dim=1)
    assert torch.allclose(chunks, full, atol=1e-5)
    assert cache.length == 11


@torch.no_grad()
def test_rewind_forgets_a_chunk():
    net, x, y = make(), torch.randn(1, 6, 32), torch.randn(1, 3, 32)
    cache = net.new_cache()
    net(x, cache)
    net(y, cache)  # a Jacobi guess ...
    cache.rewind(6)  # ... taken back
    after = net(x[:, :3] * 0.5, cache)
    ref = net(torch.cat([x, x[:, :3] * 0.5], dim=1))[:, 6:]
    assert torch.allclose(after, ref, atol=1e-5)


@torch.no_grad()
def test_sliding_window_keeps_relative_positions_exact():
    # With one layer a token's key/value depend on that token alone, so after a slide the cache must
    # equal a fresh run over the kept tokens: this checks the re-rotation by -n exactly.
    torch.manual_seed(1)
    net, x = CausalTransformer(width=32, depth=1, heads=4).eval(), torch.randn(2, 20, 32)
    cache = net.new_cache()
    net(x[:, :12], cache)
    cache.slide(5)  # drop tokens 0..4; the rest move to positions 0..6
    assert cache.length == 7
    streamed = net(x[:, 12:], cache)
    fresh = net(x[:, 5:])[:, 7:]
    assert torch.allclose(streamed, fresh, atol=1e-5)
    # without the re-rotation (positions 0.. for the new tokens against keys at 5..11) it would differ
    cache = net.new_cache()
    net(x[:, :12], cache)
    cache.keys = [k[:, :, 5:] for k in cache.keys]
    cache.values = [v[:, :, 5:] for v in cache.values]
    assert not torch.allclose(net(x[:, 12:], cache), fresh, atol=1e-3)


@torch.no_grad()
def test_sliding_bounds_the_cache_over_a_long_stream():
    net = make()
    cache = net.new_cache()
    for _ in range(50):
        out = net(torch.randn(1, 4, 32), cache)
        if cache.length > 12:
            cache.slide(cache.length - 12)
    assert cache.length == 12 and torch.isfinite(out).all()
