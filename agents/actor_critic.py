"""The agent: an actor-critic over a stack of recent observations, and λ-returns to train it.

Observations are 64x64 frames (a convolutional encoder) or, with `observation="latent"`, the world's
own state at each frame (`WorldFlowModel.features`: an MLP encoder), which in the real game a
`WorldObserver` computes from the real frames. Memory is a stack of the last `frame_stack`
observations rather than a recurrent core: imagined rollouts are short (DIAMOND and IRIS use 15-20
steps), a stack needs no hidden state carried between Ray rollout calls, and the same policy runs
unchanged in the real game (the world's hidden state is a memory of its window already).
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

AGENT_CONFIG, AGENT_WEIGHTS = "config.json", "model.safetensors"


@dataclass
class AgentSpec:
    """What a saved agent needs to be rebuilt and to know which game it plays."""
    num_actions: int
    frame_size: int = 64
    frame_stack: int = 4
    width: int = 256
    env_id: str | None = None  # the real game of the world it was trained in
    action_meanings: list | None = None
    obs_key: str | None = None  # the image entry of the real game's Dict observations
    env_kwargs: dict = field(default_factory=dict)  # gym.make keywords of the real game (e.g. frame_skip)
    observation: str = "frames"  # or "latent": the world's features, `feature_size` long
    feature_size: int = 0
    world: str | None = None  # the world whose features a latent agent reads (a path or an embedded name)


class ActorCritic(nn.Module):
    def __init__(self, spec: AgentSpec):
        super().__init__()
        self.spec = spec
        if spec.observation == "latent":  # (K, F) features; the norm puts hidden state and latents on one scale
            flat = spec.frame_stack * spec.feature_size
            self.encoder = nn.Sequential(nn.Flatten(), nn.LayerNorm(flat))
        else:
            c = 3 * spec.frame_stack
            self.encoder = nn.Sequential(  # 64 -> 15 -> 6 -> 4 (Nature-DQN shapes for a 64x64 input)
                nn.Conv2d(c, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
                nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
            with torch.no_grad():
                flat = self.encoder(torch.zeros(1, c, spec.frame_size, spec.frame_size)).shape[1]
        self.torso = nn.Sequential(nn.Linear(flat, spec.width), nn.ReLU())
        self.policy = nn.Linear(spec.width, spec.num_actions)
        self.value = nn.Linear(spec.width, 1)
        nn.init.zeros_(self.policy.weight)  # a uniform policy at the start: exploration from step one
        nn.init.zeros_(self.policy.bias)

    def forward(self, stacks: torch.Tensor):
        """uint8 frame stacks (..., K, S, S, 3), or float feature stacks (..., K, F) -> action logits (..., A),
        values (...)."""
        if self.spec.observation == "latent":
            lead = stacks.shape[:-2]
            x = stacks.reshape(-1, *stacks.shape[-2:]).float()
        else:
            lead = stacks.shape[:-4]
            x = stacks.reshape(-1, *stacks.shape[-4:]).permute(0, 1, 4, 2, 3).flatten(1, 2).float() / 255.0
        h = self.torso(self.encoder(x))
        return self.policy(h).reshape(*lead, -1), self.value(h).reshape(lead)

    @torch.no_grad()
    def act(self, stacks: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """Observation stacks (N, K, ...) -> actions (N,) sampled from the policy."""
        logits, _ = self(torch.from_numpy(stacks).to(self.policy.weight.device))
        probs = torch.softmax(logits.float(), -1).to(generator.device)  # drawn where the generator is
        return torch.multinomial(probs, 1, generator=generator)[:, 0].cpu().numpy()


def lambda_returns(rewards, values, terminated, truncated, gamma: float, lam: float) -> torch.Tensor:
    """λ-returns (T, N) from rewards, terminated, truncated (T, N) and values (T+1, N).

    G_t = r_t + γ·[(1-λ)·V(s_t+1) + λ·G_t+1]. A terminated step has no future; a truncated step
    bootstraps from V of its final observation and does not look past it (the step after an episode
    ends is the vector env's reset step, which belongs to the next episode).
    """
    G, out = values[-1], []
    for t in reversed(range(rewards.shape[0])):
        future = torch.where(truncated[t], values[t + 1], (1 - lam) * values[t + 1] + lam * G)
        G = rewards[t] + gamma * (~terminated[t]) * future
        out.append(G)
    return torch.stack(out[::-1])


class FrameStack:
    """The last K observations (frames or features) of each of N streams; a stream that starts an episode
    is filled with its first one."""

    def __init__(self, first: np.ndarray, k: int):
        self.frames = np.repeat(first[:, None], k, axis=1)  # (N, K, ...)

    def push(self, obs: np.ndarray, new_episode: np.ndarray | None = None) -> np.ndarray:
        self.frames = np.concatenate([self.frames[:, 1:], obs[:, None]], axis=1)
        if new_episode is not None and new_episode.any():
            self.frames[new_episode] = obs[new_episode][:, None]
        return self.frames


def save_agent(net: ActorCritic, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / AGENT_CONFIG).write_text(json.dumps(asdict(net.spec), indent=2))
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, directory / AGENT_WEIGHTS)


def load_agent(path) -> ActorCritic:
    """An agent directory (or an `agent train` run: its latest/) -> ActorCritic in eval mode, clear errors."""
    path = Path(path)
    if (path / "latest" / AGENT_CONFIG).exists():
        path = path / "latest"
    for name in (AGENT_CONFIG, AGENT_WEIGHTS):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a WorldFlow agent: {name} is missing")
    try:
        net = ActorCritic(AgentSpec(**json.loads((path / AGENT_CONFIG).read_text())))
        net.load_state_dict(load_file(path / AGENT_WEIGHTS))
    except Exception as e:  # json, safetensors and shape errors
        raise ValueError(f"agent {path} is corrupt or incompatible: {type(e).__name__}: {e}") from None
    return net.eval()


class AgentPolicy:
    """A saved agent as the callable frame -> action that play, dream and evaluation take (one stream).
    A latent agent's features are computed from the frames by its world (`WorldObserver`)."""

    def __init__(self, path, seed: int | None = None, device: str = "cpu"):
        self.net = load_agent(path).to(device)
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.observer = None
        if self.net.spec.observation == "latent":
            from .observer import WorldObserver

            self.observer = WorldObserver(self.net.spec.world, seed or 0, device)
            if self.observer.feature_size != self.net.spec.feature_size:
                raise ValueError(f"agent {path} reads {self.net.spec.feature_size} features; its world "
                                 f"{self.net.spec.world} gives {self.observer.feature_size}")
        self.stack, self.actions = None, None

    def reset(self) -> None:
        self.stack = None

    def __call__(self, obs: np.ndarray) -> int:
        return int(self.act_batch(np.asarray(obs)[None])[0])

    def act_batch(self, frames: np.ndarray) -> np.ndarray:
        """N streams at once (N, S, S, 3) -> actions (N,); the first call after reset() starts their stacks."""
        if self.stack is None:
            obs = frames if self.observer is None else self.observer.first(frames)
            self.stack = FrameStack(obs, self.net.spec.frame_stack)
        else:
            self.stack.push(frames if self.observer is None else self.observer.next(frames, self.actions))
        self.actions = self.net.act(self.stack.frames, self.generator)
        return self.actions
