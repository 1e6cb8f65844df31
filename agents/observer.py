"""WorldObserver: a world model reading real frames, so an agent trained on the dream's own state
(`observation="latent"`) gets the same features outside it, as Ha & Schmidhuber's controller read
their world model's z and h in the real game."""

import numpy as np
import torch

from worldflow.pretrained import load_world


class WorldObserver:
    """Frames (N, S, S, 3) uint8 and the actions taken before them -> features (N, F) float32, one stream
    per row: `first` starts the streams (the window primed with the frame, as a dream's reset is), `next`
    advances them through `WorldFlowModel.observe`."""

    def __init__(self, checkpoint, seed: int = 0, device: str = "cpu"):
        self.model = load_world(checkpoint, device)[0]
        self.generator = torch.Generator(device=self.model.device).manual_seed(seed)
        self.state = None

    @property
    def feature_size(self) -> int:
        return self.model.feature_size

    def first(self, frames: np.ndarray) -> np.ndarray:
        frames = torch.from_numpy(np.ascontiguousarray(frames))[:, None]  # (N, 1, S, S, 3)
        self.state = self.model.start(frames, torch.zeros(len(frames), 0, dtype=torch.long), self.generator)
        return self.model.features(self.state).cpu().numpy()

    def next(self, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
        self.model.observe(self.state, torch.from_numpy(np.ascontiguousarray(frames)),
                           torch.as_tensor(actions, dtype=torch.long), self.generator)
        return self.model.features(self.state).cpu().numpy()
