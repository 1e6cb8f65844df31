"""Train a world model: the autoencoder first, then the flow, heads and denoiser together.

Why in stages: the flow models the autoencoder's latents, and per-channel latent statistics are
fixed before the flow sees them; a moving latent space would make its likelihood meaningless.
The flow, the heads and the denoiser then train jointly: one backward pass of the flow loss gives
both the flow's gradients and the flow score d NLL / d x~ that is the denoiser's target.

Run directory:
    config.yaml, manifest.json      what was trained, on what
    metrics.csv                     one row per log interval
    latest/                         config.json + model.safetensors (a loadable checkpoint),
                                    start_contexts.safetensors (real frames dreams start from), and
                                    trainer.json + optimizer.safetensors (to resume); replaced atomically
"""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch.utils.data import default_collate

from .autoencoder import to_pixels
from .collect import write_json_atomic
from .config import Config
from .data import ClipDataset, as_roots, load_manifest, spread_clips
from .devices import pick_device
from .pretrained import resolve_world, save_contexts
from .world_model import WorldFlowConfig, WorldFlowModel, rename_legacy_key

CHECKPOINT = "latest"
OUTCOMES = ("rewards", "terminated", "steps_to_event")  # what each step tells the heads (ClipDataset)
START_CONTEXTS = 16


def start_contexts(data: str | list[str], frames: int, val_fraction: float, where: str = "spread",
                   count: int = START_CONTEXTS, split: str = "val"):
    """`count` real clips a dream can start from, of the `split` episodes (held-out ones by default; the
    training ones if those are too short for a whole window): (M, K, S, S, 3), (M, K-1); spread over the
    episodes, or (where="episode_start") each episode's first window."""
    try:
        clips = ClipDataset(data, frames, split, val_fraction)
    except ValueError:
        if split == "train":
            raise
        clips = ClipDataset(data, frames, "train", val_fraction)
    firsts = [i for i, (_, start) in enumerate(clips.index) if start == 0] if where == "episode_start" else None
    picks = spread_clips(clips, count, firsts)
    return picks["frames"], picks["actions"]


def build_model(cfg: Config, manifest: dict) -> WorldFlowModel:
    return WorldFlowModel(WorldFlowConfig(frame_size=manifest["frame_size"], num_actions=manifest["num_actions"],
                                          action_meanings=manifest["action_meanings"], env_id=manifest["env_id"],
                                          env_kwargs=manifest.get("env_kwargs", {}), obs_key=manifest["obs_key"],
                                          event_names=manifest["event_names"], **cfg.to_dict()["model"]))


def init_from(model: WorldFlowModel, path: str) -> tuple[list[str], list[str]]:
    """Copy a checkpoint's (or a run's latest) weights into `model` by name; returns (model tensors it
    lacked, its tensors unused).

    A tensor present in both with a different shape means another architecture: a clear error.
    """
    file = resolve_world(path) / "model.safetensors"  # a run directory or a checkpoint directory
    if not file.is_file():
        raise FileNotFoundError(f"train.init {path} is not a WorldFlow checkpoint: model.safetensors is missing")
    try:  # the tensors themselves: the checkpoint's model class may be an older version
        source = {rename_legacy_key(k): v for k, v in load_file(file).items()}
    except Exception as e:
        raise ValueError(f"train.init {file} is corrupt: {type(e).__name__}: {e}") from None
    target = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in source.items()
             if k in target and v.shape != target[k].shape]
    if wrong:
        raise ValueError(f"train.init {path} has another architecture than this config: {'; '.join(wrong[:5])}")
    model.load_state_dict({k: v for k, v in source.items() if k in target}, strict=False)
    return sorted(set(target) - set(source)), sorted(set(source) - set(target))


def lr_at(step: int, total: int, base: float, warmup: int, floor: float) -> float:
    """Linear warm-up, then cosine decay to floor * base."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---- optimizer state as safetensors (no pickle anywhere) ------------------------------------------
def psnr_of_unit_mse(mse: float) -> float:
    """MSE on [-1, 1] pixels -> PSNR on [0, 255] (the range is 2, so the peak squared is 4)."""
    return 10 * math.log10(4 / max(mse, 1e-10))


def optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> dict:
    return {f"{name}.{i}.{k}": v.detach().clone().reshape(-1) if v.ndim == 0 else v.detach().clone()
            for i, state in opt.state_dict()["state"].items() for k, v in state.items()}


def load_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict) -> None:
    sd = opt.state_dict()
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(f"{name}."):
            _, idx, field = key.split(".", 2)
            state.setdefault(int(idx), {})[field] = value.reshape(()) if field == "step" else value
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint_dir(out: Path, write) -> Path:
    """Have `write(dir)` fill out/latest.tmp/ completely, then swap it in for out/latest/: a crash at
    any moment leaves latest/ or latest.old/ whole (see checkpoint_dir_to_resume)."""
    final, tmp, old = (out / CHECKPOINT, out / f"{CHECKPOINT}.tmp", out / f"{CHECKPOINT}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dir_to_resume(out: Path) -> Path:
    """out/latest/, restored from latest.old/ when a save was interrupted between its two renames."""
    ckpt = out / CHECKPOINT
    if not ckpt.exists():
        (out / f"{CHECKPOINT}.old").rename(ckpt)
    return ckpt


def trim_metrics(path: Path, key: str, last: int) -> None:
    """Drop the rows of a metrics CSV logged after the checkpoint a run resumes from (they come again)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if int(r[key]) <= last]
    if fields is None:  # an empty file: nothing to keep
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def has_checkpoint(out: Path) -> bool:
    return (out / CHECKPOINT).exists() or (out / f"{CHECKPOINT}.old").exists()


class Trainer:
    """One training process. Data-parallel under Ray Train, every rank runs one of these with its own
    batches, gradients are averaged by DistributedDataParallel, and rank 0 alone writes the run."""

    def __init__(self, cfg: Config, data: str | list[str], out: str, rank: int = 0, world_size: int = 1,
                 device: str = "cpu"):
        self.cfg, self.out, t = cfg, Path(out), cfg.train
        self.rank, self.world_size, self.device = rank, world_size, torch.device(pick_device(device))
        cuda = self.device.type == "cuda"
        self.autocast = t.autocast == "bf16" or (t.autocast == "auto" and cuda)
        if t.threads:
            torch.set_num_threads(t.threads)
        self.train_set = ClipDataset(data, t.clip_frames, "train", t.val_fraction)
        self.manifest = self.train_set.manifest
        self.contexts = start_contexts(data, cfg.model.context_frames, t.val_fraction, t.start_contexts)
        self.mirror = None
        if t.mirror_actions:
            n = len(self.manifest["action_meanings"])
            if sorted(t.mirror_actions) != list(range(n)):
                raise ValueError(f"config key 'train.mirror_actions' must map each of the data's {n} actions "
                                 f"{self.manifest['action_meanings']} to its mirror image (a permutation of "
                                 f"0..{n - 1}), got {t.mirror_actions}")
            self.mirror = torch.tensor(t.mirror_actions)
        torch.manual_seed(t.seed)
        self.model = build_model(cfg, self.manifest).to(self.device)
        m = self.model
        steps = {k: torch.from_numpy(np.concatenate([ep[k] for ep in self.train_set.episodes]))
                 for k in OUTCOMES}
        self.outcome_weights = {k: v.to(self.device) for k, v in m.outcome_weights(**steps).items()}
        betas = (t.adam_beta1, t.adam_beta2)
        self.ae_opt = torch.optim.AdamW(m.ae.parameters(), lr=t.ae_lr, betas=betas, weight_decay=t.weight_decay)
        self.flow_params = [p for mod in (*m.shallow, m.deep, m.heads) for p in mod.parameters()]
        self.flow_opt = torch.optim.AdamW(self.flow_params, lr=t.lr, betas=betas, weight_decay=t.weight_decay)
        self.den_opt = torch.optim.AdamW(m.denoiser.parameters(), lr=t.denoiser_lr, betas=betas)
        self.generator = torch.Generator().manual_seed(t.seed)
        self.step, self.skipped = 0, 0
        if has_checkpoint(self.out):
            self._resume()
        else:
            if t.init:
                new, unused = init_from(self.model, t.init)
                if rank == 0:
                    print(f"initialised from {t.init}; new tensors: {new or 'none'}; unused: {unused or 'none'}")
            if rank == 0:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                write_json_atomic(self.out / "manifest.json", self.manifest)
        self.net = self.model  # what the steps call; DistributedDataParallel around it when data-parallel
        if world_size > 1:
            # each rank draws its own batches and noise (a resumed rank too: the checkpoint holds rank 0's)
            seed = np.random.SeedSequence([t.seed, rank, self.step]).generate_state(1)[0]
            self.generator.manual_seed(int(seed))
            # find_unused_parameters: each stage trains only part of the model (the AE, or the flow)
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index or 0] if cuda else None, find_unused_parameters=True)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.ae_steps + self.cfg.train.flow_steps

    def batch(self) -> dict:
        """A batch of random training clips on the trainer's device (drawn from its CPU generator)."""
        idx = torch.randint(len(self.train_set), (self.cfg.train.batch_size,), generator=self.generator)
        batch = default_collate([self.train_set[int(i)] for i in idx])
        if self.mirror is not None:  # each clip flipped left-right with probability 1/2, its actions mirrored
            flip = torch.rand(len(idx), generator=self.generator) < 0.5
            batch["frames"][flip] = batch["frames"][flip].flip(-2)  # (B, T, H, W, 3): W
            batch["actions"][flip] = self.mirror[batch["actions"][flip]]
        return {k: v.to(self.device) for k, v in batch.items()}

    def mixed_precision(self):
        """bf16 autocast around a forward pass where chosen (TrainConfig.autocast), else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite: a rank that skipped its backward alone would hang the rest."""
        finite = torch.isfinite(loss.detach()).float()
        if self.world_size > 1:
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite)

    # ---- one step of each stage -----------------------------------------------------------------
    def ae_step(self) -> dict:
        t = self.cfg.train
        for group in self.ae_opt.param_groups:
            group["lr"] = lr_at(self.step, t.ae_steps, t.ae_lr, t.warmup_steps, t.min_lr_fraction)
        with self.mixed_precision():
            loss, mse, moved_mse = self.net("ae", self.batch()["frames"], t.ae_motion_weight)
        self.ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.ae.parameters(), t.grad_clip)
        self.ae_opt.step()
        return dict(ae_mse=mse.item(), ae_psnr=psnr_of_unit_mse(mse.item()), ae_moved_psnr=psnr_of_unit_mse(moved_mse.item()))

    @torch.no_grad()
    def fit_latent_stats(self, batches: int = 8) -> None:
        lat = torch.cat([self.model.ae.encode(to_pixels(self.batch()["frames"].flatten(0, 1))) for _ in range(batches)])
        self.model.latent_mean.copy_(lat.mean(dim=(0, 2, 3)))
        self.model.latent_std.copy_(lat.std(dim=(0, 2, 3)).clamp_min(1e-3))

    def flow_step(self) -> dict:
        t = self.cfg.train
        step = self.step - t.ae_steps
        for group in self.flow_opt.param_groups:
            group["lr"] = lr_at(step, t.flow_steps, t.lr, t.warmup_steps, t.min_lr_fraction)
        b = self.batch()
        outcomes = {k: b[k] for k in OUTCOMES}
        with self.mixed_precision():
            if t.train_flow:
                losses, noisy = self.net("flow", b["frames"], b["actions"], outcomes, self.generator,
                                         self.outcome_weights, t.flow_motion_weight)
            else:  # the heads alone, on a fixed flow: no flow gradient, so no denoiser target either
                losses, noisy = self.net("heads", b["frames"], b["actions"], outcomes, self.generator,
                                         self.outcome_weights), None
        if not self.all_finite(losses["total"]):
            self.skipped += 1
            return {k: float("nan") for k in losses}
        self.flow_opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        norm = torch.nn.utils.clip_grad_norm_(self.flow_params, t.grad_clip)
        if torch.isfinite(norm) and norm < t.skip_grad_norm * t.grad_clip:
            self.flow_opt.step()
        else:  # a spike far above the clip: skip it rather than let it through, clipped or not
            self.skipped += 1
        out = {k: v.item() for k, v in losses.items()}
        out.update(grad_norm=norm.item())
        if noisy is not None:
            with self.mixed_precision():
                den = self.net("denoiser", noisy)
            self.den_opt.zero_grad(set_to_none=True)
            den.backward()
            self.den_opt.step()
            out.update(denoiser=den.item(), bits_per_dim=(out["flow"] + 0.5 * math.log(2 * math.pi)) / math.log(2))
        return out

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self) -> Path:
        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            save_contexts(tmp, *self.contexts)
            tensors = {**optimizer_tensors("ae", self.ae_opt), **optimizer_tensors("flow", self.flow_opt),
                       **optimizer_tensors("denoiser", self.den_opt), "rng": self.generator.get_state()}
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "trainer.json").write_text(json.dumps(dict(step=self.step, skipped=self.skipped)))

        return save_checkpoint_dir(self.out, write)

    def _resume(self) -> None:
        ckpt = checkpoint_dir_to_resume(self.out) if self.rank == 0 else self.out / CHECKPOINT
        loaded = WorldFlowModel.from_pretrained(ckpt).to(self.device)
        self.model.load_state_dict(loaded.state_dict())
        tensors = load_file(ckpt / "optimizer.safetensors", device=str(self.device))
        load_optimizer("ae", self.ae_opt, tensors)
        load_optimizer("flow", self.flow_opt, tensors)
        load_optimizer("denoiser", self.den_opt, tensors)
        self.generator.set_state(tensors["rng"].cpu())
        state = json.loads((ckpt / "trainer.json").read_text())
        self.step, self.skipped = state["step"], state["skipped"]
        if self.rank == 0:
            trim_metrics(self.out / "metrics.csv", "step", self.step)

    def _write_metrics(self, rows: list[dict]) -> None:
        path = self.out / "metrics.csv"
        fields = ["step", "stage", "ae_mse", "ae_psnr", "ae_moved_psnr", "flow", "bits_per_dim", "reward", "terminated", "events", "total",
                  "denoiser", "grad_norm", "lr"]
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows(rows)

    # ---- the loop -------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> Path:
        from tqdm import tqdm

        t, lead = self.cfg.train, self.rank == 0
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", disable=not (progress and lead))
        self.model.train()
        try:
            while self.step < self.total_steps:
                if self.step == t.ae_steps and not (t.init and t.ae_steps == 0):  # a fine-tune keeps its stats
                    self.fit_latent_stats()
                stage = "ae" if self.step < t.ae_steps else "flow"
                metrics = self.ae_step() if stage == "ae" else self.flow_step()
                self.step += 1
                bar.update(1)
                if lead and (self.step % t.log_every == 0 or self.step == self.total_steps):
                    opt = self.ae_opt if stage == "ae" else self.flow_opt
                    self._write_metrics([dict(step=self.step, stage=stage, lr=opt.param_groups[0]["lr"], **metrics)])
                    bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()
                                     if k in ("ae_psnr", "ae_moved_psnr", "bits_per_dim", "reward", "events", "denoiser")})
                if lead and self.step % t.checkpoint_every == 0:
                    self.save()
        except KeyboardInterrupt:
            if lead:
                bar.write(f"interrupted at step {self.step}: saving a checkpoint to resume from")
                self.save()
            raise
        finally:
            bar.close()
        return self.save() if lead else self.out / CHECKPOINT


def train(cfg: Config, data: str | list[str], out: str, progress: bool = True, ray_workers: int = 0,
          ray_address: str | None = None, device: str = "auto") -> Path:
    """Train in this process on `device`, or data-parallel on `ray_workers` Ray Train workers: one GPU
    each over NCCL when the cluster has GPUs (and `device` is not "cpu"), else CPU over gloo.

    Under Ray every worker reads `data` and rank 0 writes `out`: on a multi-node cluster both must
    be paths every node sees (shared storage). The checkpoint is the same either way.
    """
    if ray_workers == 0:
        return Trainer(cfg, data, out, device=device).run(progress)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .scale import init_ray

    data, out = [str(r.resolve()) for r in as_roots(data)], Path(out).resolve()  # workers do not share our cwd
    load_manifest(data)  # a missing dataset fails here, not inside every worker
    init_ray(ray_address, log_to_driver=progress)

    use_gpu = device != "cpu" and ray.cluster_resources().get("GPU", 0) >= ray_workers

    def worker_loop(_):
        ctx = ray.train.get_context()
        # Ray Train gives each GPU worker its own device (CUDA_VISIBLE_DEVICES); torch sees it as cuda:0
        Trainer(cfg, data, str(out), ctx.get_world_rank(), ctx.get_world_size(),
                device="cuda" if use_gpu else "cpu").run(progress)

    TorchTrainer(worker_loop, torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                 scaling_config=ScalingConfig(num_workers=ray_workers, use_gpu=use_gpu),
                 run_config=RunConfig(name="ray_train", storage_path=str(out))).fit()
    return out / CHECKPOINT
