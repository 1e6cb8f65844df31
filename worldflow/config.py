"""Model and training configuration: YAML files checked key by key against these dataclasses.

A config describes the model and its training, never the game: action count and meanings come
from the dataset's manifest, so any config trains on any collected game. The defaults here are the
shipped recipe (the default world's shape and schedule, sized for 2 CPU cores); a config file states
only what differs from them, or from the file its `base:` names.
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class ModelConfig:
    # autoencoder: frame (S, S, 3) -> latent grid (S/ae_downsample, S/ae_downsample, latent_channels)
    latent_channels: int = 4
    ae_downsample: int = 4
    ae_width: int = 64
    ae_subpixel: bool = False  # decoder's last upsampling by PixelShuffle: cheaper, for fast worlds
    patch: int = 2  # latent patch side per token: tokens per frame = (S / ae_downsample / patch)^2
    # flow: shallow per-frame blocks, then one deep block causal over the clip
    width: int = 128
    heads: int = 4
    shallow_blocks: int = 2
    shallow_depth: int = 2
    deep_depth: int = 4
    noise_sigma: float = 0.3  # noise augmentation on per-channel-normalised latents
    action_dropout: float = 0.1  # p of the null action token, for classifier-free guidance
    context_frames: int = 8  # sliding window of the deep block's KV cache, in frames
    denoiser_width: int = 64
    head_width: int = 32  # reward / termination heads' convolutions over the frame's change
    # the event heads predict "the event happens within this many steps": long enough to reach back
    # from the event to the play that caused it (docs/breakout.md: a lost life, 7-10 steps after a miss)
    event_horizon: int = 12
    # ...counted from this many steps ahead: the heads predict an event in [delay, delay + horizon)
    # steps. With a game's own delay between cause and event, the steps where the outcome is already
    # decided fall outside the window, so no action in a dream can lower a risk that is already spent.
    event_delay: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    clip_frames: int = 8
    batch_size: int = 8
    ae_steps: int = 1500
    ae_lr: float = 1e-3
    # weight of the reconstruction MSE over pixels that changed since the previous frame (the moving
    # sprites), added to the full-frame MSE: without it the autoencoder drops small sprites
    ae_motion_weight: float = 1.0
    flow_steps: int = 8000
    # extra weight of the flow's per-token NLL where the frame changed since the previous one
    # (WorldFlowModel.compute_losses): small moving sprites are a few of a frame's tokens, and the
    # static rest dominates a plain likelihood. 0 = the plain likelihood.
    flow_motion_weight: float = 0.0
    # false: the flow stage fits only the reward / termination / life-loss heads, on a fixed flow and
    # denoiser (a forward pass a step, no flow backward): new heads for a trained world (with init)
    train_flow: bool = True
    lr: float = 3e-4
    denoiser_lr: float = 3e-4
    warmup_steps: int = 200
    min_lr_fraction: float = 0.1  # the cosine schedule decays each learning rate to this fraction of it
    # AdamW's moment decays, for every optimiser (the TARFlow / STARFlow recipe's)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    skip_grad_norm: float = 100.0  # skip an update whose gradient norm is this far above the clip
    val_fraction: float = 0.1
    log_every: int = 25
    checkpoint_every: int = 250
    threads: int = 0  # torch threads; 0 = torch's default
    # mixed precision of the transformers' matmuls: "auto" = bf16 on CUDA, off on CPU (where it measured
    # slower at batch 1 and lost accuracy); "bf16" or "off" force it. The flows' affine steps and
    # log-determinants are float32 either way (flow.TARFlowBlock._affine).
    autocast: str = "auto"
    # where the world's shipped start contexts come from, in held-out episodes: "spread" = windows spread
    # over them; "episode_start" = their first windows, so a dream starts where a real episode does (for
    # games whose state builds up unseen, such as Take Cover's health)
    start_contexts: str = "spread"
    # fine-tune: start from this checkpoint's weights (same architecture; tensors it lacks keep their
    # initialisation). With ae_steps 0 its autoencoder and latent statistics are kept as they are.
    init: str = ""
    # mirror augmentation for a game that is its own mirror image (Take Cover's room; not a game with a
    # score drawn in text): each training clip is flipped left-right with probability 1/2 and its actions
    # mapped through this list (action i -> mirror_actions[i], e.g. [0, 2, 1]: NOOP, RIGHT <-> LEFT). A world
    # that favours one direction only because its data happened to, cannot. Empty: off.
    mirror_actions: list = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"unknown config key '{where}.{key}' (known keys: {', '.join(known)})")
        expected = known[key].type
        expected = {"int": int, "float": float, "str": str, "bool": bool, "list": list}.get(expected, expected)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ValueError(f"config key '{where}.{key}' must be {expected.__name__}, "
                             f"got {type(value).__name__} ({value!r})")
        kwargs[key] = value
    return cls(**kwargs)


AUTOCAST = ("auto", "bf16", "off")
START_CONTEXTS = ("spread", "episode_start")


def config_from_dict(values: dict) -> Config:
    if not isinstance(values, dict):
        raise ValueError("a config must be a mapping with sections 'model' and 'train'")
    unknown = set(values) - {"model", "train"}
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)} (known: model, train)")
    cfg = Config(model=_build(ModelConfig, values.get("model", {}), "model"),
                 train=_build(TrainConfig, values.get("train", {}), "train"))
    if cfg.train.start_contexts not in START_CONTEXTS:
        raise ValueError(f"config key 'train.start_contexts' must be one of {START_CONTEXTS}, "
                         f"got {cfg.train.start_contexts!r}")
    if cfg.train.autocast not in AUTOCAST:
        raise ValueError(f"config key 'train.autocast' must be one of {AUTOCAST}, got {cfg.train.autocast!r}")
    return cfg


def read_config_values(path, chain: tuple = ()) -> dict:
    """A YAML config's values, merged over those of the file its `base:` names (a path relative to it).

    A config file states only what differs from its base: a shipped world's config over the shared
    recipe, a fine-tune over the world it refines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist" + (f" (base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ValueError(f"config {path} is its own base (via {' -> '.join(map(str, chain))})")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config must be a mapping with sections 'model' and 'train'")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ValueError(f"{path}: 'base' must be the path of another config file, got {base!r}")
    merged = read_config_values(path.parent / base, chain + (path.resolve(),))
    for section, entries in values.items():
        if isinstance(entries, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **entries}
        else:
            merged[section] = entries
    return merged


def load_config(path) -> Config:
    values = read_config_values(path)
    try:
        return config_from_dict(values)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
