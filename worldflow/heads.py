"""Reward, termination and event heads: what a step earned, whether it ended the episode, and whether
each of the dataset's events (a life lost, damage taken, ...) happens within the next few steps.

They read the deep block's hidden state for the frame (its memory of the clip so far) and the
frame's change: a few strided convolutions over the clean latent grid and its difference from the
previous one, max-pooled so a small event anywhere (a brick vanishing, a score digit turning) counts.
Why not the hidden state alone: on the 5,000-step Breakout world, an MLP probe on the deep block's
states recovered 3% of held-out nonzero rewards (0% from states mean-pooled over the frame), while
a reward in Atari is almost always visible as a local change between two frames.

Why event heads beside termination: a game over comes once an episode, but a life goes (or damage is
taken) every few hundred steps, and whether it will is decided on screen some steps before (where the
ball meets the paddle, where a fireball flies). The head judges that from the frames (a classifier),
which is far easier to learn than drawing the outcome itself, and it tells an agent in the dream what
its play will cost.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class HeadLogits:
    reward: torch.Tensor  # (..., 3) logits of the reward's sign -1 / 0 / +1
    terminated: torch.Tensor  # (...) logit that the step ended the episode
    events: torch.Tensor  # (..., E) logits that each event happens within the window ahead

    def view(self, *lead: int) -> "HeadLogits":
        """The same logits with leading dimensions `lead` (e.g. (B, T-1) from B*(T-1) rows)."""
        return HeadLogits(self.reward.view(*lead, 3), self.terminated.view(*lead),
                          self.events.view(*lead, self.events.shape[-1]))


class OutcomeHeads(nn.Module):
    """(latent_t, latent_t-1, deep state_t) -> HeadLogits: reward sign, termination, and each of
    `num_events` events within the window ahead that WorldFlowModel.event_ahead defines."""

    def __init__(self, channels: int, conv_width: int, state_width: int, num_events: int):
        super().__init__()
        self.change = nn.Sequential(
            nn.Conv2d(2 * channels, conv_width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(conv_width, conv_width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(conv_width, conv_width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.out = nn.Sequential(nn.Linear(conv_width + state_width, state_width), nn.GELU(),
                                 nn.Linear(state_width, 4))  # reward sign (3), termination (1)
        self.events = nn.Sequential(nn.Linear(conv_width + state_width, state_width), nn.GELU(),
                                    nn.Linear(state_width, num_events)) if num_events else None

    def forward(self, latent: torch.Tensor, previous: torch.Tensor, state: torch.Tensor) -> HeadLogits:
        """latent, previous: (B, C, h, w) clean latent grids; state: (B, width) -> logits of B steps."""
        features = torch.cat([self.change(torch.cat([latent, latent - previous], dim=1)), state], dim=-1)
        out = self.out(features)
        events = self.events(features) if self.events is not None else features.new_zeros(len(features), 0)
        return HeadLogits(out[:, :3], out[:, 3], events)
