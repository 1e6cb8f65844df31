"""WorldFlowEnv: a Gymnasium environment that steps a learned world model instead of an emulator.

State: the deep flow block's KV cache over a sliding window of past frames (constant memory per
step). step(a): condition on a, Jacobi-sample the next frame's global latents, invert the shallow
blocks, denoise, decode; the reward and termination heads read the deep block's frame state.
info["life_loss_risk"] (reset and step) is the life-loss head's probability that a life goes within
the world's window ahead (WorldFlowModel.life_loss_ahead): the game's reward and termination stay the env's own, and an
agent may shape its training with the risk (agents/train.py).
"""

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .dreams import check_action, open_world, start_context, torch_generator


class WorldFlowEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 15}

    def __init__(self, checkpoint=None, render_mode: str | None = None, sampler: str = "jacobi",
                 denoiser: str = "flow-score", temperature: float = 1.0, guidance: float | None = None,
                 context_frames: int | None = None, max_episode_steps: int = 1000, device: str = "cpu"):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.model, self.start_frames, self.start_actions, self.context_frames = open_world(
            checkpoint, sampler, denoiser, context_frames, max_episode_steps, device)
        cfg = self.model.config
        self.sampler, self.denoiser, self.temperature, self.guidance = sampler, denoiser, temperature, guidance
        self.max_episode_steps, self.render_mode = max_episode_steps, render_mode
        self.action_meanings = list(cfg.action_meanings)
        self.observation_space = spaces.Box(0, 255, (cfg.frame_size, cfg.frame_size, 3), np.uint8)
        self.action_space = spaces.Discrete(cfg.num_actions)
        self._state, self._frame, self._window = None, None, None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        frames, actions = start_context(self.model, self.start_frames, self.start_actions, self.np_random, options,
                                        self.context_frames)
        self._generator = torch_generator(self.np_random)
        self._state = self.model.start(frames, actions, self._generator, self.guidance)
        self._frame, self._t = frames[0, -1].numpy().copy(), 0
        if self.render_mode == "human":
            self.render()
        return self._frame.copy(), {"life_loss_risk": float(self._state.life_loss_risk[0])}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        action = check_action(action, self.action_space.n, self.action_meanings)
        out = self.model.sample_next(self._state, torch.tensor([action]), self._generator, self.sampler,
                                     self.denoiser, self.temperature)
        self._frame, self._t = out.frames[0].cpu().numpy(), self._t + 1
        info = {"bits_per_dim": float(out.bits_per_dim[0]), "jacobi_iterations": out.iterations,
                "terminated_prob": float(out.terminated[0]), "life_loss_risk": float(out.life_loss_risk[0])}
        if self.render_mode == "human":
            self.render()
        return (self._frame.copy(), float(out.reward[0]), bool(out.terminated[0] > 0.5),
                self._t >= self.max_episode_steps, info)

    def render(self):
        if self.render_mode == "rgb_array":
            return None if self._frame is None else self._frame.copy()
        if self.render_mode == "human" and self._frame is not None:
            self._show(self._frame)

    def _show(self, frame: np.ndarray, scale: int = 8) -> None:
        import pygame

        if self._window is None:
            pygame.init()
            self._window = pygame.display.set_mode((frame.shape[1] * scale, frame.shape[0] * scale))
            self._clock = pygame.time.Clock()
            pygame.display.set_caption("WorldFlow")
        surface = pygame.surfarray.make_surface(frame.swapaxes(0, 1))
        self._window.blit(pygame.transform.scale(surface, self._window.get_size()), (0, 0))
        pygame.event.pump()
        pygame.display.flip()
        self._clock.tick(self.metadata["render_fps"])

    def close(self):
        if self._window is not None:
            import pygame

            pygame.display.quit()
            self._window = None
