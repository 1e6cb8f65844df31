"""One --device rule everywhere: auto picks CUDA when present; a checkpoint scores the same on any device."""

from pathlib import Path

import pytest
import torch

from worldflow.cli import main
from worldflow.data import ClipDataset, spread_clips
from worldflow.devices import pick_device
from worldflow.world_model import WorldFlowModel

TINY = Path(__file__).parent.parent / "configs" / "tiny.yaml"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def test_device_names_are_checked_against_the_machine():
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu") == pick_device(None)
    assert pick_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            pick_device("cuda:0")


def test_commands_refuse_a_device_they_cannot_use(tiny_run, capsys, tmp_path):
    assert main(["dream", str(tiny_run[1]), "--steps", "2", "--out", str(tmp_path / "c.gif"), "--device", "tpu"]) == 2
    assert "device must be auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


def _scores(run, data, device: str) -> torch.Tensor:
    model = WorldFlowModel.from_pretrained(run / "latest").to(device).eval()
    clips = spread_clips(ClipDataset(data, 4, "all"), 4)
    with torch.no_grad():  # the noise comes from a CPU generator: the same numbers on every device
        return model.log_prob(clips["frames"], clips["actions"], torch.Generator().manual_seed(0)).cpu()


def test_a_reloaded_checkpoint_scores_identically(tiny_run, breakout_data):
    assert torch.equal(_scores(tiny_run[1], breakout_data, "cpu"), _scores(tiny_run[1], breakout_data, "cpu"))


@cuda
def test_a_cpu_checkpoint_scores_the_same_on_cuda(tiny_run, breakout_data):
    cpu, gpu = _scores(tiny_run[1], breakout_data, "cpu"), _scores(tiny_run[1], breakout_data, "cuda")
    assert torch.allclose(cpu, gpu, rtol=1e-4, atol=1e-2)


@cuda
def test_training_runs_on_cuda_and_reloads_on_cpu(breakout_data, tmp_path):
    from worldflow.config import load_config
    from worldflow.train import Trainer

    trainer = Trainer(load_config(TINY), str(breakout_data), str(tmp_path / "run"), device="cuda")
    assert next(trainer.model.parameters()).is_cuda and trainer.autocast  # bf16 by default on CUDA
    trainer.run(progress=False)
    cpu, gpu = _scores(tmp_path / "run", breakout_data, "cpu"), _scores(tmp_path / "run", breakout_data, "cuda")
    assert torch.isfinite(cpu).all() and torch.allclose(cpu, gpu, rtol=1e-4, atol=1e-2)
