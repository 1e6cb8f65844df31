"""The causal transformer's KV cache must reproduce the full causal forward exactly."""

import pytest
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


def test_gradients_flow_through_a_cached_chunk_as_through_the_full_forward():
    # the flow-score reference differentiates the newest frame through the cache of the past ones
    net, past = make(), torch.randn(2, 6, 32)
    x = torch.randn(2, 3, 32, requires_grad=True)
    cache = net.new_cache()
    with torch.no_grad():
        net(past, cache)
    (cached,) = torch.autograd.grad(net(x, cache).square().sum(), x)
    (full,) = torch.autograd.grad(net(torch.cat([past, x], dim=1))[:, 6:].square().sum(), x)
    assert torch.allclose(cached, full, atol=1e-5)
    assert cache.length == 9 and not cache.buffer.requires_grad


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
def test_a_sliding_window_streams_exactly_what_a_fresh_run_over_it_gives():
    # With one layer a token's key/value depend on that token alone, so after any number of slides
    # the streamed chunk must equal a fresh run over the kept tokens: this checks that slid keys keep
    # their relative positions, through the compactions that rotate them back to position 0.
    torch.manual_seed(1)
    net, x = CausalTransformer(width=32, depth=1, heads=4).eval(), torch.randn(2, 200, 32)
    cache, kept, ends = net.new_cache(), 0, []
    for t in range(0, 200, 5):
        streamed = net(x[:, t:t + 5], cache)
        fresh = net(x[:, kept:t + 5])[:, -5:]
        assert torch.allclose(streamed, fresh, atol=1e-5), t
        ends.append(cache.end)
        if cache.length > 12:
            kept += cache.length - 12
            cache.slide(cache.length - 12)
    assert max(ends) <= cache.buffer.shape[4] < 200  # compacted in place, never grown with the stream
    assert ends.index(max(ends)) < len(ends) - 1  # ... and back to the start at least once


@torch.no_grad()
def test_selected_and_reset_rows_stream_as_they_would_alone():
    torch.manual_seed(2)
    net, x = make(), torch.randn(3, 30, 32)
    whole = net.new_cache()
    net(x[:, :20], whole)
    whole.slide(8)  # a running batch: its live tokens no longer start at buffer index 0
    row = whole.select(torch.tensor([1]))
    assert torch.allclose(net(x[1:2, 20:], row), net(x[:, 20:], whole)[1:2], atol=1e-5)
    whole.rewind(12)
    # a row reset from a fresh cache (its tokens at positions 0..11) streams as that fresh cache does
    fresh = net.new_cache()
    net(x[:1, 8:20] * 2, fresh)
    expected = net(x[2:, 20:], fresh.select(slice(None)))
    whole.set_rows(torch.tensor([2]), fresh)
    assert torch.allclose(net(x[:, 20:], whole)[2:], expected, atol=1e-5)
    with pytest.raises(ValueError, match="lengths differ"):
        whole.set_rows(torch.tensor([0]), net.new_cache())


@torch.no_grad()
def test_sliding_bounds_the_cache_over_a_long_stream():
    net = make()
    cache = net.new_cache()
    for _ in range(50):
        out = net(torch.randn(1, 4, 32), cache)
        if cache.length > 12:
            cache.slide(cache.length - 12)
    assert cache.length == 12 and torch.isfinite(out).all()
