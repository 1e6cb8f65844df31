"""Draw an evaluation: PSNR against horizon, a strip of real vs dreamed frames, and a text table."""

from pathlib import Path

import numpy as np

CURVES = ("flow-score", "tweedie", "none", "repeat_last", "reconstruction")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    return plt


def save_atomic_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot_psnr(result: dict, path) -> None:
    """PSNR vs horizon for each mode and baseline: full frame (left) and changed pixels (right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = np.arange(1, result["horizon"] + 1)
    for ax, key, title in ((axes[0], "psnr", "full frame"), (axes[1], "psnr_changed", "changed pixels")):
        for name in CURVES:
            style = "--" if name in ("repeat_last", "reconstruction") else "-"
            ax.plot(steps, result[key][name], style, marker=".", label=name)
        ax.set(title=f"PSNR, {title}", xlabel="dream step (open loop, real actions)", ylabel="dB")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_atomic_figure(fig, Path(path))
    plt.close(fig)


def plot_strip(strip: dict, path, scale: int = 2) -> None:
    """One row per source (real, then each denoiser), one column per step after the last context frame."""
    plt = _pyplot()
    rows = [k for k in strip if k != "context"]
    grid = np.concatenate([np.concatenate([strip["context"].numpy(), *strip[k].numpy()], axis=1) for k in rows])
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    S = strip["context"].shape[0] * scale
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 100, grid.shape[0] / 100 + 0.4))
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([S * (i + 0.5) for i in range(len(rows))], rows)
    ax.set_xticks([S * (j + 0.5) for j in range(grid.shape[1] // S)], ["ctx", *range(1, grid.shape[1] // S)])
    ax.set_title("last real context frame, then open-loop steps under the real actions", fontsize=9)
    fig.tight_layout()
    save_atomic_figure(fig, Path(path))
    plt.close(fig)


def table(result: dict) -> str:
    """Plain-text summary: PSNR / changed-pixel PSNR at a few horizons, then the scalar measures."""
    H = result["horizon"]
    marks = sorted({1, min(4, H), min(8, H), H})
    lines = [f"{'PSNR dB (changed)':<18}" + "".join(f"{'h=' + str(h):>16}" for h in marks) + f"{'mean':>16}"]
    for name in CURVES:
        full, moved = result["psnr"][name], result["psnr_changed"][name]
        cells = [f"{full[h - 1]:6.2f} ({moved[h - 1]:5.2f})" for h in marks]
        lines.append(f"{name:<18}" + "".join(f"{c:>16}" for c in cells)
                     + f"{np.mean(full):8.2f} ({np.mean(moved):5.2f})")
    lines.append(f"{'delta_t_psnr':<18}" + "".join(f"{result['delta_t_psnr'][h - 1]:>16.2f}" for h in marks))
    cf = result["counterfactual"]
    lines += [f"latent bits/dim {result['bits_per_dim']:.4f} over {result['windows']} windows",
              f"reward sign accuracy {result['reward_sign_accuracy']:.3f} "
              f"(on {result['nonzero_rewards']} nonzero rewards: {result['reward_sign_accuracy_nonzero']})",
              f"termination precision {result['termination_precision']} recall {result['termination_recall']} "
              f"({result['terminations']} terminations)",
              *(f"{name} within the window ahead: precision {e['precision']} recall {e['recall']} "
                f"accuracy {e['accuracy']:.3f} ({e['steps']} such steps)" for name, e in result["events"].items()),
              "nonzero rewards in the dreams' steps: real {real}, dreamed ".format(**result["dream_reward_events"])
              + ", ".join(f"{k} {v}" for k, v in result["dream_reward_events"].items() if k != "real"),
              f"counterfactual round trip {cf['roundtrip_psnr']:.1f} dB (max latent error "
              f"{cf['roundtrip_max_latent_error']:.2e}); under other actions {cf['other_actions_psnr']:.1f} dB",
              "dream frames/s at batch {}: ".format(result["clips"])
              + ", ".join(f"{k} {v:.1f}" for k, v in result["dream_frames_per_s"].items())]
    return "\n".join(lines)
