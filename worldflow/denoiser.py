"""The strictly causal frame denoiser, trained by flow-score matching.

Samples of a noise-augmented flow are noisy latents x~. Tweedie's formula gives the clean
estimate E[x_t | x~_<=t] = x~_t + sigma^2 * grad log p(x~_t | x~_<t), and the flow knows that score
exactly (autograd through it). The denoiser D learns it so sampling needs no backward pass:
x^_t = x~_t - sigma * D(x~_t, x~_t-1), trained with MSE to sigma * grad_x~ NLL(x~).

Why the whole-clip gradient is a valid target for a causal network: besides the frame's own
conditional it holds the scores of *later* frames' conditionals w.r.t. x~_t, and the expectation of
such a score over the later frames is zero (d/dx of the integral of a density is 0). Regressing on
the full gradient therefore converges to the causal score; the future terms only add noise.
"""

import torch
import torch.nn as nn


class FrameDenoiser(nn.Module):
    """D(x~_t, x~_t-1): a few convolutions over the noisy latent grid and the previous one."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)  # starts as "no correction"
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, noisy: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """noisy, previous: (B, C, h, w) latent grids -> predicted sigma * grad NLL, (B, C, h, w)."""
        return self.net(torch.cat([noisy, previous], dim=1))
