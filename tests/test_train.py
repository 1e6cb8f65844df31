"""Training: end to end from real frames, exact resume after a stop, clear errors, real learning."""

import csv
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worldflow.cli import main
from worldflow.config import config_from_dict, load_config
from worldflow.data import ClipDataset
from worldflow.train import Trainer, build_model, lr_at
from worldflow.world_model import WorldFlowModel

TINY = str(Path(__file__).parent.parent / "configs" / "tiny.yaml")


def test_cli_trains_on_two_datasets_and_writes_metrics(breakout_data, tracker_data, tmp_path, capsys):
    assert main(["train", "--config", TINY, "--data", str(breakout_data), str(tracker_data),
                 "--out", str(tmp_path / "run")]) == 0
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,stage") and len(rows) == 1 + 5  # tiny: 10 steps, a row every 2
    assert json.loads((tmp_path / "run" / "latest" / "trainer.json").read_text())["step"] == 10
    WorldFlowModel.from_pretrained(tmp_path / "run" / "latest")
    datasets = json.loads((tmp_path / "run" / "manifest.json").read_text())["datasets"]
    assert [d["policy"] for d in datasets] == ["random", "tracker"]


def _weights(path):
    return load_file(path / "latest" / "model.safetensors")


@pytest.mark.parametrize("how", ["ctrl-c", "crash"])
def test_stopped_training_resumes_to_the_same_weights(breakout_data, tmp_path, how):
    cfg = load_config(TINY)
    Trainer(cfg, str(breakout_data), str(tmp_path / "ref")).run(progress=False)

    stopped = Trainer(cfg, str(breakout_data), str(tmp_path / "stopped"))
    original = stopped.flow_step

    def stop_at_step_8():
        if stopped.step == 8:
            raise KeyboardInterrupt if how == "ctrl-c" else RuntimeError("killed")
        return original()

    stopped.flow_step = stop_at_step_8
    with pytest.raises(KeyboardInterrupt if how == "ctrl-c" else RuntimeError):
        stopped.run(progress=False)
    # Ctrl-C saves at step 8; a crash leaves the periodic checkpoint of step 5
    saved = json.loads((tmp_path / "stopped" / "latest" / "trainer.json").read_text())["step"]
    assert saved == (8 if how == "ctrl-c" else 5)
    Trainer(cfg, str(breakout_data), str(tmp_path / "stopped")).run(progress=False)
    ref, got = _weights(tmp_path / "ref"), _weights(tmp_path / "stopped")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    steps = [line.split(",")[0] for line in (tmp_path / "stopped" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["2", "4", "6", "8", "10"]  # no row lost, none doubled


def test_sigterm_stops_the_cli_like_ctrl_c(breakout_data, tmp_path, monkeypatch):
    original = Trainer.flow_step

    def terminated_at_step_8(self):
        if self.step == 8:
            signal.raise_signal(signal.SIGTERM)  # what `kill PID` sends
        return original(self)

    monkeypatch.setattr(Trainer, "flow_step", terminated_at_step_8)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["train", "--config", TINY, "--data", str(breakout_data), "--out", str(tmp_path / "run")])
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back
    assert code == 130
    assert json.loads((tmp_path / "run" / "latest" / "trainer.json").read_text())["step"] == 8


def test_resume_survives_a_crash_between_checkpoint_renames(tiny_run, breakout_data, tmp_path):
    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "latest").rename(copy / "latest.old")  # save() died after moving the old one aside
    trainer = Trainer(load_config(TINY), str(breakout_data), str(copy))
    assert trainer.step == 10 and (copy / "latest" / "model.safetensors").exists()


def test_corrupt_checkpoint_and_bad_config_give_clear_errors(tiny_run, tmp_path, breakout_data, capsys):
    _, run = tiny_run
    bad = tmp_path / "bad"
    shutil.copytree(run / "latest", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        WorldFlowModel.from_pretrained(bad)
    with pytest.raises(ValueError, match=r"unknown config key 'train.learning_rate'"):
        config_from_dict({"train": {"learning_rate": 1e-3}})
    with pytest.raises(ValueError, match=r"'model.width' must be int"):
        config_from_dict({"model": {"width": "wide"}})
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model:\n  widht: 64\n")
    assert main(["train", "--config", str(cfg), "--data", str(breakout_data), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'model.widht'" in capsys.readouterr().err


def test_a_config_states_only_what_differs_from_its_base(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text("model:\n  width: 48\n  deep_depth: 3\ntrain:\n  flow_steps: 10\n")
    (tmp_path / "world.yaml").write_text("base: recipes/base.yaml\nmodel:\n  deep_depth: 5\n")
    cfg = load_config(tmp_path / "world.yaml")
    assert (cfg.model.width, cfg.model.deep_depth, cfg.train.flow_steps) == (48, 5, 10)  # merged key by key
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"nowhere.yaml does not exist \(base of"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="its own base"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "typo.yaml").write_text("base: world.yaml\nmodel:\n  widht: 1\n")
    with pytest.raises(ValueError, match="unknown config key 'model.widht'"):
        load_config(tmp_path / "typo.yaml")


def test_optimiser_and_schedule_choices_come_from_the_config(breakout_data, tmp_path):
    tiny = load_config(TINY).to_dict()
    cfg = config_from_dict({"model": tiny["model"], "train": {**tiny["train"], "adam_beta2": 0.99, "min_lr_fraction": 0.25}})
    trainer = Trainer(cfg, str(breakout_data), str(tmp_path / "run"))
    assert all(opt.param_groups[0]["betas"] == (0.9, 0.99) for opt in (trainer.ae_opt, trainer.flow_opt, trainer.den_opt))
    # linear warm-up to the base rate, then a cosine down to the configured fraction of it
    assert lr_at(0, 100, 1.0, 10, 0.25) == pytest.approx(0.1) and lr_at(9, 100, 1.0, 10, 0.25) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10, 0.25) == pytest.approx(0.25) and lr_at(55, 100, 1.0, 10, 0.25) == pytest.approx(0.625)


def test_mirror_augmentation_flips_clips_and_swaps_their_actions(breakout_data, tmp_path):
    tiny = load_config(TINY).to_dict()
    plain = Trainer(load_config(TINY), str(breakout_data), str(tmp_path / "plain"))
    mirror = [0, 1, 3, 2]  # Breakout: NOOP, FIRE, RIGHT <-> LEFT
    cfg = config_from_dict({"model": tiny["model"], "train": {**tiny["train"], "mirror_actions": mirror}})
    trainer = Trainer(cfg, str(breakout_data), str(tmp_path / "mirror"))
    flipped = same = 0
    for _ in range(4):  # the same generator state draws the same clips; the mirror trainer flips about half
        a, b = plain.batch(), trainer.batch()
        for i in range(len(a["frames"])):
            if torch.equal(a["frames"][i], b["frames"][i]):
                same += 1
                assert torch.equal(a["actions"][i], b["actions"][i])
            else:
                flipped += 1
                assert torch.equal(a["frames"][i].flip(-2), b["frames"][i])
                assert torch.equal(torch.tensor(mirror)[a["actions"][i]], b["actions"][i])
        trainer.generator.set_state(plain.generator.get_state())  # realign after the flip draws
    assert flipped > 0 and same > 0
    bad = config_from_dict({"model": tiny["model"], "train": {**tiny["train"], "mirror_actions": [0, 1, 2]}})
    with pytest.raises(ValueError, match="mirror_actions"):
        Trainer(bad, str(breakout_data), str(tmp_path / "bad"))


def test_fine_tune_keeps_the_autoencoder_and_trains_what_the_old_checkpoint_lacked(tiny_run, breakout_data, tmp_path):
    _, run = tiny_run
    old = tmp_path / "old"  # as written by an older model: one tensor missing, one the model no longer has
    shutil.copytree(run / "latest", old)
    tensors = load_file(old / "model.safetensors")
    del tensors["deep.cond_tokens.weight"]
    tensors["heads.retired.weight"] = torch.zeros(2)
    save_file(tensors, old / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"another version of the model.*deep\.cond_tokens\.weight"):
        WorldFlowModel.from_pretrained(old)  # never silently uninitialised weights
    cfg = load_config(TINY)
    cfg.train.ae_steps, cfg.train.flow_steps, cfg.train.init = 0, 3, str(old)
    Trainer(cfg, str(breakout_data), str(tmp_path / "ft")).run(progress=False)
    tuned = WorldFlowModel.from_pretrained(tmp_path / "ft" / "latest").state_dict()
    kept = [k for k in tensors if k.startswith("ae.") or k.startswith("latent_")]
    assert kept and all(torch.equal(tuned[k], tensors[k]) for k in kept)
    assert tuned["deep.cond_tokens.weight"].abs().max() > 0  # started at zero, then trained
    wide = load_config(TINY)
    wide.model.width, wide.train.init = 64, str(run)  # a run directory stands for its latest checkpoint
    with pytest.raises(ValueError, match="another architecture"):
        Trainer(wide, str(breakout_data), str(tmp_path / "wide"))


def test_heads_only_fine_tune_trains_the_heads_and_leaves_the_rest(tiny_run, breakout_data, tmp_path):
    _, run = tiny_run
    before = WorldFlowModel.from_pretrained(run / "latest").state_dict()
    cfg = load_config(TINY)
    cfg.train.ae_steps, cfg.train.flow_steps, cfg.train.train_flow, cfg.train.init = 0, 3, False, str(run)
    Trainer(cfg, str(breakout_data), str(tmp_path / "heads")).run(progress=False)
    after = WorldFlowModel.from_pretrained(tmp_path / "heads" / "latest").state_dict()
    heads = [k for k in before if k.startswith("heads.")]
    assert any(k.startswith("heads.events.") for k in heads)
    assert all(not torch.equal(before[k], after[k]) for k in heads if k.endswith("weight"))
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("heads."))
    with open(tmp_path / "heads" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["events"]) > 0 and r["flow"] == "" for r in rows)


def test_a_few_hundred_steps_lower_held_out_bits_per_dim(breakout_data, tmp_path):
    cfg = config_from_dict({**load_config(TINY).to_dict(),
                            "train": {**load_config(TINY).to_dict()["train"], "ae_steps": 60, "flow_steps": 250,
                                      "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 1000}})
    trainer = Trainer(cfg, str(breakout_data), str(tmp_path / "run"))
    trainer.run(progress=False)
    trained = trainer.model.eval()
    # the same autoencoder and latent statistics with a freshly initialised flow
    torch.manual_seed(123)
    fresh = build_model(cfg, trainer.manifest).eval()
    fresh.load_state_dict({k: v for k, v in trained.state_dict().items()
                           if k.startswith(("ae.", "latent_"))}, strict=False)
    val = ClipDataset(breakout_data, cfg.train.clip_frames, "val")
    frames = torch.stack([val[i]["frames"] for i in range(0, len(val), max(1, len(val) // 16))])
    actions = torch.stack([val[i]["actions"] for i in range(0, len(val), max(1, len(val) // 16))])
    with torch.no_grad():
        before = fresh.bits_per_dim(frames, actions).mean().item()
        after = trained.bits_per_dim(frames, actions).mean().item()
    assert after < before - 0.05, (before, after)


def test_ray_train_with_two_workers_gives_a_loadable_checkpoint(breakout_data, tmp_path, ray_local):
    out = tmp_path / "ray_run"
    assert main(["train", "--config", TINY, "--data", str(breakout_data), "--out", str(out), "--ray-workers", "2"]) == 0
    assert json.loads((out / "latest" / "trainer.json").read_text())["step"] == 10
    model = WorldFlowModel.from_pretrained(out / "latest")
    init = build_model(load_config(TINY), json.loads((out / "manifest.json").read_text()))
    trained, fresh = model.state_dict(), init.state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in fresh)  # the workers' updates reached rank 0
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 5  # one writer: rank 0


def test_start_contexts_can_be_each_held_out_episodes_first_window(breakout_data):
    from worldflow.data import ClipDataset
    from worldflow.train import start_contexts

    frames, actions = start_contexts(str(breakout_data), 4, 0.1, "episode_start")
    firsts = {ep["frames"][0].tobytes() for ep in ClipDataset(breakout_data, 4, "val").episodes}
    assert frames.shape[1:] == (4, 64, 64, 3) and actions.shape == (len(frames), 3)
    assert all(f[0].numpy().tobytes() in firsts for f in frames)  # each starts where a real episode does
    with pytest.raises(ValueError, match="train.start_contexts"):
        config_from_dict({"train": {"start_contexts": "middle"}})
