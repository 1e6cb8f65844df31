"""The TARFlow core: exact inverses, exact log-determinants, Jacobi == sequential, guidance, density fit."""

import math

import pytest
import torch

from worldflow.flow import TARFlow, TARFlowBlock, add_noise


def random_block(order="raster", local=False, num_classes=3, token_dim=3, seed=0, tokens_per_frame=None):
    """A block whose head (and position embedding, if it has one) is not the zero-initialised
    identity, so the tests exercise real maps.

    Scales per token land in about [0.5, 2] (a trained block's range); much wider random maps
    compound float32 rounding across frames past the 1e-4 target no matter how inversion is done.
    """
    torch.manual_seed(seed)
    block = TARFlowBlock(token_dim, width=32, depth=2, heads=4, order=order, local=local, num_classes=num_classes,
                         tokens_per_frame=tokens_per_frame)
    torch.nn.init.normal_(block.head.weight, std=0.1)
    torch.nn.init.normal_(block.head.bias, std=0.1)
    if num_classes:
        torch.nn.init.normal_(block.cond_tokens.weight, std=0.1)
    if tokens_per_frame:
        torch.nn.init.normal_(block.pos, std=0.5)
    return block.eval()


ORDERS = [("raster", False), ("reverse", False), ("reverse_within_frame", False), ("raster", True),
          ("reverse", True)]


@pytest.mark.parametrize("order,local", ORDERS)
@torch.no_grad()
def test_inverse_of_forward_is_identity(order, local):
    block = random_block(order, local, tokens_per_frame=6)
    x, cond = torch.randn(2, 3, 6, 3), torch.randint(0, 4, (2, 3))
    z, _ = block(x, cond)
    assert (z - x).abs().max() > 0.1  # the map is not the identity
    assert (block.inverse_sequential(z, cond) - x).abs().max() < 1e-4
    xj = block.jacobi_invert(z, cond, tol=1e-9)
    assert (xj.x - x).abs().max() < 1e-4


@pytest.mark.parametrize("order,local", ORDERS)
def test_logdet_equals_brute_force_jacobian(order, local):
    block = random_block(order, local, token_dim=2, tokens_per_frame=3)
    x, cond = torch.randn(1, 2, 3, 2), torch.tensor([[1, 3]])
    _, logdet = block(x, cond)
    jac = torch.autograd.functional.jacobian(lambda v: block(v.view(1, 2, 3, 2), cond)[0].flatten(), x.flatten())
    assert torch.allclose(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-4)
    # per token: the Jacobian is triangular (in the block's order), so each token's share is the
    # log of its own diagonal block, a 2x2 block of the token's channels, at the token's place in x
    per_token = block(x, cond, per_token=True)[1]
    diagonal = torch.stack([torch.linalg.slogdet(jac[2 * i:2 * i + 2, 2 * i:2 * i + 2])[1] for i in range(6)])
    assert per_token.shape == (1, 2, 3) and torch.allclose(per_token.flatten(), diagonal, atol=1e-4)


@pytest.mark.parametrize("order", ["raster", "reverse_within_frame", "reverse"])
@torch.no_grad()
def test_jacobi_matches_sequential_within_n_iterations(order):
    N = 8
    block = random_block(order, tokens_per_frame=N)
    z, cond = torch.randn(3, 4, N, 3), torch.randint(0, 3, (3, 4))
    x_seq = block.inverse_sequential(z, cond)
    x_jac, iters, logdet, _ = block.jacobi_invert(z, cond, tol=1e-10)
    assert (x_jac - x_seq).abs().max() < 1e-4
    assert torch.allclose(logdet, block(x_seq, cond)[1], atol=1e-3)  # the inverse reports the forward's log-det
    assert len(iters) == 4 and all(1 <= n <= N for n in iters)


@torch.no_grad()
def test_streaming_frames_through_a_cache_matches_the_whole_clip_inverse():
    block = random_block("reverse_within_frame", tokens_per_frame=4)
    z, cond = torch.randn(2, 5, 4, 3), torch.randint(0, 3, (2, 5))
    x_ref = block.inverse_sequential(z, cond)
    cache, prev, hiddens = block.transformer.new_cache(), None, []
    for t in range(5):
        x_t, _, _, h_t = block.invert_frame(z[:, t], cache, cond[:, t], init=prev, tol=1e-10)
        assert (x_t - x_ref[:, t]).abs().max() < 1e-4
        prev = x_t
        hiddens.append(h_t)
    z_ref, logdet_ref, hidden = block(x_ref, cond, return_hidden=True)
    assert torch.allclose(torch.stack(hiddens, 1), hidden, atol=1e-4)
    # and data -> noise one frame at a time through a cache matches the whole-clip forward
    cache, logdet = block.transformer.new_cache(), 0
    for t in range(5):
        z_t, ld, h_t = block.forward_frame(x_ref[:, t], cache, cond[:, t])
        assert torch.allclose(z_t, z_ref[:, t], atol=1e-4) and torch.allclose(h_t, hidden[:, t], atol=1e-4)
        logdet = logdet + ld
    assert torch.allclose(logdet, logdet_ref, atol=1e-3)
    block.forward_frame(x_ref[:, 0], cache, cond[:, 0], commit=False)
    assert cache.length == 5 * (4 + 1)


@pytest.mark.parametrize("guidance", [None, 1.5])
@torch.no_grad()
def test_each_row_of_a_batch_stops_on_its_own_and_gets_what_it_would_alone(guidance):
    N = 8
    block = random_block(tokens_per_frame=N)
    past, cond = torch.randn(3, 2, N, 3), torch.randint(0, 3, (3, 3))

    def primed(rows):
        cache = block.transformer.new_cache()
        for t in range(2):
            x, c = past[rows, t], cond[rows, t]
            if guidance is not None:  # the cache holds [cond; null] rows
                x, c = torch.cat([x, x]), torch.cat([c, torch.full_like(c, 3)])
            block.forward_frame(x, cache, c)
        return cache

    z = torch.randn(3, N, 3)
    exact = block.invert_frame(z, primed(slice(None)), cond[:, 2], guidance=guidance, tol=1e-10).x
    init = z.clone()
    init[1] = exact[1]  # row 1 starts at its answer: it settles after one sweep, the others take more
    batch = block.invert_frame(z, primed(slice(None)), cond[:, 2], guidance=guidance, init=init, tol=1e-4)
    alone = [block.invert_frame(z[i:i + 1], primed(slice(i, i + 1)), cond[i:i + 1, 2], guidance=guidance,
                                init=init[i:i + 1], tol=1e-4) for i in range(3)]
    assert alone[1].iterations == 1 and batch.iterations == max(a.iterations for a in alone) > 1
    assert torch.allclose(batch.x, torch.cat([a.x for a in alone]), atol=1e-6)
    assert torch.allclose(batch.logdet, torch.cat([a.logdet for a in alone]), atol=1e-5)
    assert torch.allclose(batch.hidden, torch.cat([a.hidden for a in alone]), atol=1e-5)


@torch.no_grad()
def test_every_token_of_a_frame_sees_its_action_and_earlier_frames_do_not():
    block = random_block()
    torch.nn.init.zeros_(block.cond_embed.weight)  # the start token no longer carries the action
    x, cond = torch.randn(2, 3, 5, 3), torch.randint(0, 3, (2, 3))
    other = cond.clone()
    other[:, 1] = (other[:, 1] + 1) % 3
    z, z_other = block(x, cond)[0], block(x, other)[0]
    assert torch.equal(z[:, 0], z_other[:, 0])  # causal: frame 0 came before the changed action
    assert (z[:, 1, 1:] - z_other[:, 1, 1:]).abs().amin() > 0  # every token after the start sees it directly


@torch.no_grad()
def test_guidance_zero_is_the_conditional_inverse_and_positive_guidance_changes_it():
    block = random_block(tokens_per_frame=5)
    torch.nn.init.normal_(block.cond_embed.weight, std=1.0)
    z, cond = torch.randn(2, 2, 5, 3), torch.randint(0, 3, (2, 2))
    x_cond = block.inverse_sequential(z, cond)
    for method in ("sequential", "jacobi"):
        x_w0 = block.inverse(z, cond, method=method, guidance=0.0, tol=1e-10).x
        assert (x_w0 - x_cond).abs().max() < 1e-4
        x_w2 = block.inverse(z, cond, method=method, guidance=2.0, tol=1e-10).x
        assert torch.isfinite(x_w2).all() and (x_w2 - x_cond).abs().max() > 1e-2
    x_w2_seq = block.inverse(z, cond, method="sequential", guidance=2.0)[0]
    x_w2_jac = block.inverse(z, cond, method="jacobi", guidance=2.0, tol=1e-10)[0]
    assert (x_w2_seq - x_w2_jac).abs().max() < 1e-4


@torch.no_grad()
def test_stack_log_prob_and_bits_per_dim_are_consistent():
    flow = TARFlow([random_block("raster", seed=1), random_block("reverse_within_frame", seed=2)])
    x, cond = torch.randn(4, 2, 3, 3), torch.randint(0, 3, (4, 2))
    z, logdet = flow(x, cond)
    log_prob = flow.log_prob(x, cond)
    expected = torch.distributions.Normal(0, 1).log_prob(z).sum(dim=(1, 2, 3)) + logdet
    assert torch.allclose(log_prob, expected, atol=1e-4)
    assert torch.allclose(flow.bits_per_dim(x, cond), -log_prob / (18 * math.log(2)), atol=1e-5)
    x_back, iters = flow.inverse(z, cond, tol=1e-10)
    assert (x_back - x).abs().max() < 1e-4 and len(iters) == 2
    noisy = add_noise(x, 0.3, torch.Generator().manual_seed(0))
    assert 0.2 < (noisy - x).std() < 0.4


def test_small_flow_fits_a_known_density_to_its_entropy():
    """x1 ~ N(0,1), x2 | x1 ~ N(sin 2x1, 0.5^2): a non-Gaussian density whose entropy is known exactly."""

    def sample(n, g):
        eps = torch.randn(n, 2, generator=g)
        x1 = eps[:, 0]
        return torch.stack([x1, 0.5 * eps[:, 1] + torch.sin(2 * x1)], dim=1).view(n, 1, 2, 1)

    entropy = 0.5 * math.log(2 * math.pi * math.e) + 0.5 * math.log(2 * math.pi * math.e * 0.25)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    flow = TARFlow.alternating(token_dim=1, n_blocks=2, width=32, depth=1, heads=2)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    for _ in range(800):
        loss = -flow.log_prob(sample(256, g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        held_out_nll = -flow.log_prob(sample(20000, g)).mean().item()
    assert abs(held_out_nll - entropy) < 0.1, (held_out_nll, entropy)


@pytest.mark.parametrize("bad,match", [
    (torch.randn(2, 3, 3), "shape"),
    (torch.randn(2, 1, 3, 4), "shape"),
    (torch.randn(2, 1, 3, 3, dtype=torch.float64), "float32"),
    (torch.randint(0, 5, (2, 1, 3, 3)), "float32"),
    (torch.full((2, 1, 3, 3), float("nan")), "NaN"),
    ([[1.0]], "torch.Tensor"),
])
def test_bad_tokens_raise_clear_errors(bad, match):
    block = random_block()
    with pytest.raises(ValueError, match=match):
        block(bad)
    with pytest.raises(ValueError, match=match):
        block.jacobi_invert(bad)


@torch.no_grad()
def test_position_embedding_starts_neutral_and_fixes_the_frame_size():
    block, x = random_block(tokens_per_frame=4), torch.randn(2, 3, 4, 3)
    plain = TARFlowBlock(3, width=32, depth=2, heads=4, num_classes=3).eval()
    plain.load_state_dict({k: v for k, v in block.state_dict().items() if k != "pos"})
    assert (block(x)[0] - plain(x)[0]).abs().max() > 1e-2  # the positions are used
    torch.nn.init.zeros_(block.pos)
    assert torch.equal(block(x)[0], plain(x)[0])  # at zero, as it starts, it changes nothing
    with pytest.raises(ValueError, match=r"\(batch, frames, 4, 3\)"):
        block(torch.randn(2, 3, 5, 3))
    with pytest.raises(ValueError, match=r"\(batch, frames, 4, 3\)"):
        block.jacobi_invert(torch.randn(2, 3, 5, 3))


def test_bad_conditions_raise_clear_errors():
    block, x = random_block(), torch.randn(2, 3, 4, 3)
    with pytest.raises(ValueError, match="shape"):
        block(x, torch.zeros(2, 2, dtype=torch.long))  # one condition short
    with pytest.raises(ValueError, match="ids must lie"):
        block(x, torch.full((2, 3), 7))
    with pytest.raises(ValueError, match="long"):
        block(x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="without conditioning"):
        random_block(num_classes=0)(x, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="method"):
        block.inverse(x, method="newton")
