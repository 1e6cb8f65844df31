"""WorldFlowEnv: a Gymnasium environment that steps a learned world model instead of an emulator."""

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from .dreams import check_action, draw_terminated, observation_space, open_world, start_context, torch_generator


class WorldFlowEnv(gym.Env):
    """A dream of a real game, one frame per step.

    ## Description
    The state is the deep flow block's KV cache over a sliding window of past frames (constant
    memory per step). `step(a)` conditions on `a`, Jacobi-samples the next frame's global latents,
    inverts the shallow blocks, denoises and decodes; the reward, termination and event heads read
    the deep block's state for the new frame. A reset starts from real frames: one of the world's
    shipped start contexts, or the frames given in `options`.

    ## Action Space
    `Discrete(n)`: the real game's actions; `get_action_meanings()` names them.

    ## Observation Space
    `Box(0, 255, (S, S, 3), uint8)`: RGB frames at the world's size (64 for the embedded worlds). With
    `observation="latent"`, `Box(-inf, inf, (F,), float32)`: the world's own causal state at the frame
    (the deep block's hidden state and the frame's latent grid, `WorldFlowModel.features`); render()
    still shows the frame.

    ## Rewards
    The reward head's sign of the real game's reward for the step: -1, 0 or +1.

    ## Episode End
    Terminated when the termination head's probability exceeds 0.5 (or, with
    `sample_termination=True`, with that probability: a stochastic end drawn from the env's seed).
    Truncation belongs to Gymnasium's TimeLimit: `gym.make("WorldFlow-v0")` applies 1000 steps,
    `max_episode_steps=` changes it; the env itself keeps no limit.

    ## Arguments
    `checkpoint` (run or checkpoint directory, or an embedded world's name; None: the default world),
    `render_mode` ("rgb_array" or "human"), `sampler` ("jacobi" or "sequential"), `denoiser`
    ("flow-score", "tweedie" or "none"), `temperature` (scale of the sampling noise), `guidance`
    (classifier-free guidance weight over actions, None: off), `context_frames` (real frames a reset
    primes the window with), `sample_termination`, `observation` ("frames" or "latent"), `start_contexts`
    (a start_contexts.safetensors file of real clips that resets start from instead of the world's shipped
    ones, e.g. many clips from mid-episode), `device` ("cpu", "cuda", "cuda:N" or "auto": CUDA when
    present). Observations and infos are numpy whatever the device.

    ## Info
    `event_risk` (E,): the event heads' probabilities that each of the world's events
    (`event_names`, e.g. "life_lost", "HEALTH_drop") happens within the window ahead; after a step
    also `bits_per_dim` (the model's surprise at its own frame), `terminated_prob`, `jacobi_iterations`.
    """

    metadata = {"render_modes": ["rgb_array", "human"], "render_fps": 15}

    def __init__(self, checkpoint=None, render_mode: str | None = None, sampler: str = "jacobi",
                 denoiser: str = "flow-score", temperature: float = 1.0, guidance: float | None = None,
                 context_frames: int | None = None, sample_termination: bool = False, observation: str = "frames",
                 start_contexts=None, device: str = "cpu"):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.model, self.start_frames, self.start_actions, self.context_frames = open_world(
            checkpoint, sampler, denoiser, context_frames, device, observation, start_contexts)
        cfg = self.model.config
        self.sampler, self.denoiser, self.temperature, self.guidance = sampler, denoiser, temperature, guidance
        self.sample_termination, self.render_mode, self.device = sample_termination, render_mode, self.model.device
        self.observation = observation
        self.action_meanings, self.event_names = list(cfg.action_meanings), list(cfg.event_names)
        self.observation_space = observation_space(self.model, observation)
        self.action_space = spaces.Discrete(cfg.num_actions)
        self._state, self._frame, self._window = None, None, None

    def get_action_meanings(self) -> list[str]:
        return list(self.action_meanings)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        frames, actions = start_context(self.model, self.start_frames, self.start_actions, self.np_random, options,
                                        self.context_frames)
        self._generator = torch_generator(self.np_random, self.device)
        self._state = self.model.start(frames, actions, self._generator, self.guidance)
        self._frame = frames[0, -1].numpy().copy()
        if self.render_mode == "human":
            self.render()
        return self._observation(), {"event_risk": self._state.event_risk[0].cpu().numpy()}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        action = check_action(action, self.action_space.n, self.action_meanings)
        out = self.model.sample_next(self._state, torch.tensor([action]), self._generator, self.sampler,
                                     self.denoiser, self.temperature)
        self._frame = out.frames[0].cpu().numpy()
        terminated = draw_terminated(out.terminated, [self._generator] if self.sample_termination else None)
        info = {"bits_per_dim": float(out.bits_per_dim[0]), "jacobi_iterations": out.iterations,
                "terminated_prob": float(out.terminated[0]), "event_risk": out.event_risk[0].cpu().numpy()}
        if self.render_mode == "human":
            self.render()
        return self._observation(), float(out.reward[0]), bool(terminated[0]), False, info

    def _observation(self) -> np.ndarray:
        if self.observation == "latent":
            return self.model.features(self._state)[0].cpu().numpy()
        return self._frame.copy()

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
