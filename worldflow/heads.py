"""Reward, termination and life-loss heads: what a step earned, whether it ended the episode, and
whether a life will be lost within the next few steps, per frame.

They read the deep block's hidden state for the frame (its memory of the clip so far) and the
frame's change: a few strided convolutions over the clean latent grid and its difference from the
previous one, max-pooled so a small event anywhere (a brick vanishing, a score digit turning) counts.
Why not the hidden state alone: on the 5,000-step Breakout world, an MLP probe on the deep block's
states recovered 3% of held-out nonzero rewards (0% from states mean-pooled over the frame), while
a reward in Atari is almost always visible as a local change between two frames.

Why a life-loss head beside termination: a game over comes once an episode, but a life goes every
few hundred steps, and in Breakout whether it goes is decided where the ball meets the paddle. The
head judges that from the frames (a classifier), which is far easier to learn than drawing the
bounce; a world whose dreamed ball does not yet bounce off the paddle can still tell an agent that
a ball falling beside the paddle costs a life.
"""

import torch
import torch.nn as nn


class OutcomeHeads(nn.Module):
    """(latent_t, latent_t-1, deep state_t) -> logits (..., 5): reward sign -1/0/+1, termination, and
    a life lost within the window ahead that WorldFlowModel.life_loss_ahead defines."""

    def __init__(self, channels: int, conv_width: int, state_width: int):
        super().__init__()
        self.change = nn.Sequential(
            nn.Conv2d(2 * channels, conv_width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(conv_width, conv_width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(conv_width, conv_width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.out = nn.Sequential(nn.Linear(conv_width + state_width, state_width), nn.GELU(),
                                 nn.Linear(state_width, 4))
        # its own layers, so worlds trained before it load their reward and termination heads unchanged
        self.life_loss = nn.Sequential(nn.Linear(conv_width + state_width, state_width), nn.GELU(),
                                       nn.Linear(state_width, 1))

    def forward(self, latent: torch.Tensor, previous: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """latent, previous: (B, C, h, w) clean latent grids; state: (B, width) -> (B, 5) logits."""
        features = torch.cat([self.change(torch.cat([latent, latent - previous], dim=1)), state], dim=-1)
        return torch.cat([self.out(features), self.life_loss(features)], dim=-1)
