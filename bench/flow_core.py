"""Flow-core benchmark: time to invert one TARFlow block, token-by-token vs Jacobi.

A zero-initialised block is the identity and Jacobi would converge in one sweep, which flatters
it; so the block is first fitted briefly to an AR(1) sequence (each token strongly predicts the
next), giving the long-range token dependence that makes Jacobi work for its speed.

    python bench/flow_core.py            # prints a table, writes bench/results/flow_core.json
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from worldflow.flow import TARFlowBlock


def ar1_sequences(batch: int, n: int, dim: int, rho: float = 0.9, generator=None) -> torch.Tensor:
    eps = torch.randn(batch, n, dim, generator=generator)
    x = torch.empty_like(eps)
    x[:, 0] = eps[:, 0]
    for i in range(1, n):
        x[:, i] = rho * x[:, i - 1] + (1 - rho**2) ** 0.5 * eps[:, i]
    return x[:, None]  # (B, T=1, N, D)


def fit(block: TARFlowBlock, steps: int, n: int, generator) -> float:
    opt = torch.optim.AdamW(block.parameters(), lr=1e-3, betas=(0.9, 0.95))
    for _ in range(steps):
        x = ar1_sequences(32, n, block.token_dim, generator=generator)
        z, logdet = block(x)
        loss = 0.5 * z.pow(2).mean() - logdet.mean() / x[0].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def timed(fn, repeats: int):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--token-dim", type=int, default=8)
    parser.add_argument("--fit-steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "flow_core.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    block = TARFlowBlock(args.token_dim, args.width, args.depth, heads=4)
    final_loss = fit(block, args.fit_steps, 64, g)
    block.eval()
    print(f"block: width {args.width}, depth {args.depth}, token dim {args.token_dim}; "
          f"fitted {args.fit_steps} steps to AR(1), loss {final_loss:.3f}; torch threads {torch.get_num_threads()}")

    rows = []
    header = f"{'tokens':>6} {'batch':>5} {'sequential ms':>14} {'jacobi ms':>10} {'iters':>6} {'speedup':>8} {'max |dx|':>9}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for n in (16, 64, 256):
            for batch in (1, 64):
                z = torch.randn(batch, 1, n, args.token_dim, generator=g)
                t_seq, x_seq = timed(lambda: block.inverse_sequential(z), args.repeats)
                t_jac, (x_jac, iters, _, _) = timed(lambda: block.jacobi_invert(z, tol=args.tol), args.repeats)
                row = dict(tokens=n, batch=batch, sequential_ms=1e3 * t_seq, jacobi_ms=1e3 * t_jac,
                           jacobi_iterations=iters[0], speedup=t_seq / t_jac,
                           max_abs_diff=(x_jac - x_seq).abs().max().item())
                rows.append(row)
                print(f"{n:>6} {batch:>5} {row['sequential_ms']:>14.1f} {row['jacobi_ms']:>10.1f} "
                      f"{row['jacobi_iterations']:>6} {row['speedup']:>7.1f}x {row['max_abs_diff']:>9.1e}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(config=vars(args), fit_loss=final_loss, threads=torch.get_num_threads(),
                                   rows=rows), indent=2))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
