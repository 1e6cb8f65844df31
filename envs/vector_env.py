"""WorldFlowVectorEnv: N dreams stepped as one batched model call (a native VectorEnv, not N copies).

Spaces, rewards, events and arguments are WorldFlowEnv's, batched. `gym.make_vec` applies no
TimeLimit to a vector entry point, so this env truncates itself after `max_episode_steps` (the
registered 1000 unless given). Autoreset is NEXT_STEP (Gymnasium's default, what RLlib assumes):
the step after a sub-env ends resets it, ignoring its action, and returns its first frame with
reward 0. Each sub-env keeps its own np_random and torch stream (sampling noise, and drawn endings
with `sample_termination`), seeded as a single WorldFlowEnv with seed+i would be, so sub-env i
dreams what that single env dreams.
"""

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from .dreams import check_action, draw_terminated, observation_space, open_world, start_context, torch_generator

ROW_TENSORS = ("last_solution", "last_shallow", "last_noisy", "last_clean", "event_risk", "hidden")  # WorldState's per-row tensors besides the cache


class WorldFlowVectorEnv(gym.vector.VectorEnv):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 15, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, checkpoint=None, render_mode: str | None = None, sampler: str = "jacobi",
                 denoiser: str = "flow-score", temperature: float = 1.0, guidance: float | None = None,
                 context_frames: int | None = None, max_episode_steps: int = 1000, sample_termination: bool = False,
                 observation: str = "frames", start_contexts=None, device: str = "cpu"):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"the vector env renders only 'rgb_array', got {render_mode!r}")
        if num_envs < 1:
            raise ValueError(f"num_envs must be at least 1, got {num_envs}")
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be at least 1, got {max_episode_steps}")
        self.model, self.start_frames, self.start_actions, self.context_frames = open_world(
            checkpoint, sampler, denoiser, context_frames, device, observation, start_contexts)
        cfg = self.model.config
        self.num_envs, self.render_mode = num_envs, render_mode
        self.sampler, self.denoiser, self.temperature, self.guidance = sampler, denoiser, temperature, guidance
        self.max_episode_steps, self.device = max_episode_steps, self.model.device
        self.sample_termination, self.observation = sample_termination, observation
        self.action_meanings, self.event_names = list(cfg.action_meanings), list(cfg.event_names)
        self.single_observation_space = observation_space(self.model, observation)
        self.single_action_space = spaces.Discrete(cfg.num_actions)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._rngs = [seeding.np_random()[0] for _ in range(num_envs)]
        self._state = None

    def get_action_meanings(self) -> list[str]:
        return list(self.action_meanings)

    def _reset_row(self, i: int, options: dict | None):
        """Start sub-env i from a context; returns its one-row state and first frame."""
        frames, actions = start_context(self.model, self.start_frames, self.start_actions, self._rngs[i], options,
                                        self.context_frames)
        self._torch_rngs[i] = torch_generator(self._rngs[i], self.device)
        return self.model.start(frames, actions, self._torch_rngs[i], self.guidance), frames[0, -1]

    # The dream's tensors are made in inference mode (WorldFlowModel.start / sample_next), which allows
    # in-place writes to them only inside it: resets that write rows into the batch state run there too.
    @torch.inference_mode()
    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None):
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, int) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds given for {self.num_envs} envs")
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        self._torch_rngs = [None] * self.num_envs
        rows = [self._reset_row(i, options) for i in range(self.num_envs)]
        states = [state for state, _ in rows]
        caches = [state.cache for state in states]
        self._state = states[0]
        self._state.cache = caches[0].empty_like(caches[0].batch_size * self.num_envs)
        for i, cache in enumerate(caches):
            self._state.cache.set_rows(self._cache_rows(i), cache)
        for name in ROW_TENSORS:
            setattr(self._state, name, torch.cat([getattr(s, name) for s in states]))
        self._frames = torch.stack([f for _, f in rows]).numpy()
        self._t = np.zeros(self.num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(self.num_envs, dtype=bool)
        return self._observations(), self._risk_info()

    def _cache_rows(self, i: int) -> torch.Tensor:
        """Sub-env i's rows of the batched cache: with guidance it holds [cond; null] halves."""
        return torch.tensor([i, i + self.num_envs] if self.guidance is not None else [i])

    def _replace_row(self, i: int, state) -> None:
        self._state.cache.set_rows(self._cache_rows(i), state.cache)
        for name in ROW_TENSORS:
            getattr(self._state, name)[i] = getattr(state, name)[0]

    @torch.inference_mode()
    def step(self, actions):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        acts = [check_action(a, self.single_action_space.n, self.action_meanings) for a in actions]
        noise = torch.stack([torch.randn(self.model.tokens_per_frame, self.model.token_dim, generator=g,
                                         device=self.device) for g in self._torch_rngs])
        out = self.model.sample_next(self._state, torch.tensor(acts), sampler=self.sampler, denoiser=self.denoiser,
                                     temperature=self.temperature, noise=noise)
        frames = out.frames.cpu().numpy()
        rewards = out.reward.cpu().numpy().astype(np.float64)
        terminated = draw_terminated(out.terminated, self._torch_rngs if self.sample_termination else None)
        self._t += 1
        truncated = self._t >= self.max_episode_steps
        for i in np.flatnonzero(self._needs_reset):  # NEXT_STEP autoreset: this step starts a new episode
            state, first = self._reset_row(int(i), None)
            self._replace_row(int(i), state)
            frames[i], rewards[i], terminated[i], truncated[i], self._t[i] = first.numpy(), 0.0, False, False, 0
        self._needs_reset = terminated | truncated
        self._frames = frames
        infos = {"bits_per_dim": out.bits_per_dim.cpu().numpy(), "_bits_per_dim": np.ones(self.num_envs, bool),
                 "terminated_prob": out.terminated.cpu().numpy(), "_terminated_prob": np.ones(self.num_envs, bool),
                 **self._risk_info()}  # a row reset this step: its new start's risk, as its frame is the new start
        return self._observations(), rewards, terminated, truncated, infos

    def _observations(self) -> np.ndarray:
        if self.observation == "latent":  # every row's, reset rows' from their new start
            return self.model.features(self._state).cpu().numpy()
        return self._frames.copy()

    def _risk_info(self) -> dict:
        return {"event_risk": self._state.event_risk.cpu().numpy().copy(), "_event_risk": np.ones(self.num_envs, bool)}

    def render(self):
        return None if self.render_mode is None or self._state is None else tuple(self._frames)

