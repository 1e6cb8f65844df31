"""Train an actor-critic entirely inside a WorldFlow world (CleanRL style: one dataclass, the loop in view).

Algorithm: advantage actor-critic on λ-returns with an entropy bonus, as DIAMOND and IRIS train in
imagination. Chosen over PPO because every imagined frame costs a flow inversion on CPU: PPO's
several epochs per batch would reuse data, but its clipping machinery buys little when rollouts are
short, on-policy and fresh each update, and λ-returns over a 15-step imagination horizon are what
both world-model papers measured to work.

Run directory: agent.json (the hyperparameters), metrics.csv, start_contexts.safetensors (with --starts:
the real clips dreams start from), latest/ (config.json + model.safetensors,
a loadable agent, plus optimizer.safetensors + trainer.json to resume), swapped in atomically.
"""

import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from worldflow.config import TrainConfig
from worldflow.data import load_manifest
from worldflow.envs.dreams import OBSERVATIONS
from worldflow.pretrained import CONTEXTS, load_world, save_contexts
from worldflow.world_model import SAMPLERS
from worldflow.train import (checkpoint_dir_to_resume, has_checkpoint, load_optimizer, optimizer_tensors,
                             save_checkpoint_dir, start_contexts, trim_metrics)

from .actor_critic import ActorCritic, AgentSpec, lambda_returns, save_agent
from .rollouts import RolloutPool


@dataclass
class AgentConfig:
    steps: int = 50_000  # imagined environment steps in total, over all workers
    envs_per_worker: int = 16  # dreams batched in one vector env
    rollout_steps: int = 16  # steps per worker per update
    horizon: int = 15  # an imagined episode is truncated after this many steps (DIAMOND: 15)
    gamma: float = 0.985
    lam: float = 0.95
    entropy: float = 0.001
    value_coef: float = 0.5
    lr: float = 3e-4
    grad_clip: float = 10.0
    frame_stack: int = 4
    width: int = 256
    seed: int = 0
    checkpoint_every: int = 10  # updates
    # potential-based shaping (Ng et al. 1999) with the world's event risks: Φ(s) = -c·risk(s) (risk
    # summed over the world's events: the expected count in the window ahead) adds γΦ(s') - Φ(s) to
    # each imagined reward. It moves credit in time and leaves the best policy of the game's rewards
    # unchanged, which is its flaw where the dream's rewards do not depend on play (docs/breakout.md).
    # Off by default.
    event_penalty: float = 0.0
    # a cost per imagined step, c·risk(s') for the state a step reaches: the expected price of a lost
    # life or of damage, which the dream may never show as a reward or an ending. Unlike the potential
    # it does change the best policy: fewer steps at risk. Off by default.
    event_cost: float = 0.0
    # imagined episodes end with the termination head's probability (drawn) instead of above 0.5: for
    # worlds whose ending is not certain from the frames (Take Cover's health is not on screen)
    sample_termination: bool = False
    # classifier-free guidance over actions in the dreams (WorldFlowEnv's `guidance`; None: off). A world
    # whose dream under-reacts to actions (Take Cover: 0.8 mean pixel change between 10 steps of LEFT and
    # of RIGHT, the real game 2.4; guidance 3 gives 2.4) teaches an agent that its actions matter less
    # than they do. Costs a second (null-action) branch per step.
    guidance: float | None = None
    # how the dreams invert the flow: the same frames up to Jacobi's tolerance, a speed choice. On the
    # 2-core CPU of docs/throughput.md sequential was 1.3x faster at 16 guided dreams; Jacobi wins on GPUs.
    sampler: str = "jacobi"
    # what the agent sees: the dreamed frames ("frames", a convolutional encoder) or the world's own state
    # at each frame ("latent": its deep hidden state and latent grid, as Ha & Schmidhuber's controller read
    # z and h; in the real game the world computes them from the real frames)
    observation: str = "frames"
    # where dreams start: None, the world's few shipped start contexts (episode openings, as a user's
    # reset); or datasets of the world's game, whose training episodes give start_count real clips spread
    # over whole episodes, as DIAMOND and IRIS start imagination from real states of their replay buffer.
    # The first dreamed steps from a real mid-episode state (fireballs in flight) are the dream's most
    # faithful ones; from openings alone the agent meets such states only as dreamed drifting frames.
    # (On Take Cover it bought nothing measurable: there the first dreamed frame is already state-blind,
    # docs/takecover.md.)
    starts: list[str] | None = None
    start_count: int = 1024

    def __post_init__(self):  # here, not in the CLI, so a config built in Python is checked as well
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler (--sampler) must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.observation not in OBSERVATIONS:
            raise ValueError(f"observation (--observation) must be one of {OBSERVATIONS}, got {self.observation!r}")
        if self.entropy < 0:
            raise ValueError(f"entropy (--entropy) is a bonus weight >= 0, got {self.entropy}")
        if self.lr <= 0:
            raise ValueError(f"lr (--lr) is a learning rate > 0, got {self.lr}")
        if self.start_count < 1:
            raise ValueError(f"start_count (--start-count) must be at least 1, got {self.start_count}")


def shaped_rewards(rewards, risk, terminated, gamma: float, penalty: float, cost: float = 0.0) -> torch.Tensor:
    """rewards, terminated (T, N) and the event risk of every state (T+1, N) -> the imagined rewards
    with the potential's shaping γΦ(s') - Φ(s), Φ = -penalty·risk (a terminal state's potential is 0;
    over an episode it telescopes to γ^T·Φ(s_T) - Φ(s_0), no return of its own), minus cost·risk(s')."""
    return rewards + penalty * (risk[:-1] - gamma * (~terminated) * risk[1:]) - cost * risk[1:]


def a2c_loss(net: ActorCritic, batch: dict, cfg: AgentConfig):
    """Actor-critic loss on one trajectory; autoreset steps (the env ignored their action) are masked out."""
    b = {k: torch.tensor(v) for k, v in batch.items() if isinstance(v, np.ndarray)}  # copies: Ray's arrays are read-only
    logits, values = net(b["stacks"])  # (T+1, N, A), (T+1, N)
    risk = b["event_risk"].sum(-1)  # (T+1, N): the expected number of events in the window ahead
    rewards = shaped_rewards(b["rewards"], risk, b["terminated"], cfg.gamma, cfg.event_penalty, cfg.event_cost)
    returns = lambda_returns(rewards, values.detach(), b["terminated"], b["truncated"], cfg.gamma, cfg.lam)
    mask = (~b["reset_step"]).float()
    dist = torch.distributions.Categorical(logits=logits[:-1])
    advantage = (returns - values[:-1]).detach()
    n = mask.sum().clamp_min(1)
    policy = -(dist.log_prob(b["actions"]) * advantage * mask).sum() / n
    value = 0.5 * ((values[:-1] - returns).pow(2) * mask).sum() / n
    entropy = (dist.entropy() * mask).sum() / n
    return policy + cfg.value_coef * value - cfg.entropy * entropy, dict(
        policy=policy.item(), value=value.item(), entropy=entropy.item(),
        event_risk=((risk[1:] * mask).sum() / n).item())


def check_starts(cfg: AgentConfig, world) -> None:
    """cfg.starts must be datasets of the world's game, played with its env options."""
    manifest = load_manifest(cfg.starts)
    recorded = (manifest["env_id"], manifest.get("env_kwargs", {}))
    if recorded != (world.env_id, dict(world.env_kwargs)):
        raise ValueError(f"--starts {' '.join(cfg.starts)} holds {recorded[0]} {recorded[1]}, but the world was "
                         f"trained on {world.env_id} {dict(world.env_kwargs)}: start from data of its own game")


# agent.json keys from before events were generic -> today's
LEGACY_CONFIG_KEYS = {"life_loss_penalty": "event_penalty", "life_loss_cost": "event_cost"}


def train_agent(cfg: AgentConfig, out, checkpoint=None, workers: int = 0, ray_address: str | None = None,
                progress: bool = True, device: str = "cpu", gpus_per_worker: float = 0.0) -> Path:
    """Train in `checkpoint`'s dream (None: the default world) into run directory `out` (resumed if it
    holds one). Each update collects rollout_steps x envs_per_worker steps from every worker, so the
    run does the fewest whole updates that reach `cfg.steps` (it may do a little more, never less)."""
    from tqdm import tqdm

    out = Path(out)
    model = load_world(checkpoint)[0]  # fails early, here, on a bad world
    world = model.config
    if cfg.starts:
        check_starts(cfg, world)
    spec = AgentSpec(num_actions=world.num_actions, frame_size=world.frame_size, frame_stack=cfg.frame_stack,
                     width=cfg.width, env_id=world.env_id, action_meanings=list(world.action_meanings),
                     obs_key=world.obs_key, env_kwargs=dict(world.env_kwargs), observation=cfg.observation,
                     feature_size=model.feature_size if cfg.observation == "latent" else 0,
                     world=None if checkpoint is None else str(checkpoint))
    del model
    torch.manual_seed(cfg.seed)
    net = ActorCritic(spec)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, eps=1e-5)
    per_update = cfg.rollout_steps * cfg.envs_per_worker * max(workers, 1)
    updates, update = max(1, -(-cfg.steps // per_update)), 0
    if has_checkpoint(out):
        # a resumed run may go on for more steps, but changing any other hyperparameter would make one
        # run out of two different recipes that agent.json could not tell apart
        # (a field agent.json predates had its default then)
        try:
            recorded = json.loads((out / "agent.json").read_text())["config"]
            saved = {**asdict(AgentConfig()), **{LEGACY_CONFIG_KEYS.get(k, k): v for k, v in recorded.items()}}
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{out} holds an agent checkpoint but no readable agent.json ({e}): "
                             "train into a new --out") from None
        changed = [f"{k}: {saved[k]} -> {v}" for k, v in asdict(cfg).items() if k != "steps" and saved[k] != v]
        if changed:
            raise ValueError(f"{out} was trained with other hyperparameters ({', '.join(changed)}); "
                             "resume it with the same ones, or train into a new --out")
        ckpt = checkpoint_dir_to_resume(out)
        net.load_state_dict(load_file(ckpt / "model.safetensors"))
        load_optimizer("agent", opt, load_file(ckpt / "optimizer.safetensors"))
        update = json.loads((ckpt / "trainer.json").read_text())["update"]
        trim_metrics(out / "metrics.csv", "update", update)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "agent.json").write_text(json.dumps(dict(config=asdict(cfg), world=str(checkpoint or "default"),
                                                        workers=workers)))

    def save() -> Path:
        def write(tmp: Path) -> None:
            save_agent(net, tmp)
            save_file(optimizer_tensors("agent", opt), tmp / "optimizer.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(dict(update=update)))

        return save_checkpoint_dir(out, write)

    contexts = out / CONTEXTS if cfg.starts else None
    if contexts is not None and not contexts.exists():  # drawn once: a resumed run starts from the same clips
        save_contexts(out, *start_contexts(cfg.starts, world.context_frames, TrainConfig().val_fraction,
                                           count=cfg.start_count, split="train"))
    # a resumed run continues the policy; its dreams restart from fresh seeds (the env state is not saved)
    pool = RolloutPool(spec, checkpoint, workers, cfg.envs_per_worker, cfg.horizon, cfg.seed + update, ray_address,
                       cfg.sample_termination, cfg.guidance, device, gpus_per_worker, cfg.sampler,
                       None if contexts is None else str(contexts.resolve()))
    bar = tqdm(total=updates, initial=update, desc="agent", unit="update", disable=not progress)
    log = open(out / "metrics.csv", "a", newline="")
    writer = csv.DictWriter(log, ["update", "frames", "loss", "policy", "value", "entropy", "event_risk", "episodes",
                                  "dream_return", "workers_heard", "replaced", "seconds"])
    if log.tell() == 0:
        writer.writeheader()
    try:
        while update < updates:
            start = time.perf_counter()
            trajectories = pool.collect(net, cfg.rollout_steps)
            opt.zero_grad(set_to_none=True)
            stats = []
            for batch in trajectories:  # gradients accumulate over workers: one update per round
                loss, parts = a2c_loss(net, batch, cfg)
                (loss / len(trajectories)).backward()
                stats.append(dict(loss=loss.item(), **parts))
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            update += 1
            returns = np.concatenate([b["episode_returns"] for b in trajectories])
            row = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
            row.update(update=update, frames=update * per_update, episodes=len(returns),
                       dream_return=float(returns.mean()) if len(returns) else "", replaced=pool.replaced,
                       workers_heard=" ".join(str(b["worker_id"]) for b in trajectories),
                       seconds=time.perf_counter() - start)
            writer.writerow(row)
            log.flush()
            bar.update(1)
            bar.set_postfix(dream_return=row["dream_return"], entropy=f"{row['entropy']:.2f}",
                            risk=f"{row['event_risk']:.3f}")
            if update % cfg.checkpoint_every == 0:
                save()
    except KeyboardInterrupt:
        bar.write(f"interrupted at update {update}: saving a checkpoint to resume from")
        save()
        raise
    finally:
        bar.close()
        log.close()
        pool.close()
    return save()
