"""`worldflow eval`: the measures themselves, and the command's JSON and plots on a tiny run."""

import json
import shutil

import pytest
import torch

from worldflow.cli import main
from worldflow.evaluate import fidelity, ssim

PNG = b"\x89PNG\r\n\x1a\n"
SERIES = ("flow-score", "tweedie", "none", "repeat_last", "reconstruction")


def test_fidelity_measures_changed_pixels_and_ssim():
    last = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    real = last[:, None].repeat(1, 3, 1, 1, 1)
    real[:, :, 0, 0] = 200  # one pixel moves; the rest of the screen is static
    copy = last[:, None].expand_as(real)
    m = fidelity(copy, real, last)
    # copying the last frame misses the one changed pixel by 200 in each channel
    assert m["psnr_changed"][0] == pytest.approx(10 * torch.log10(torch.tensor(255**2 / 200**2)).item())
    assert m["psnr"][0] > m["psnr_changed"][0] + 20  # 255 of 256 pixels are right for free
    assert fidelity(real, real, last)["psnr_changed"][0] == float("inf")
    noise = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    frames = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    assert torch.allclose(ssim(frames, frames), torch.ones(2))
    assert (ssim(frames, noise) < 0.2).all()


def _check_result(result, horizon):
    assert result["bits_per_dim"] > 0
    for key in ("psnr", "psnr_changed", "ssim"):
        assert set(result[key]) == set(SERIES)
        assert all(len(v) == horizon for v in result[key].values())
    assert len(result["delta_t_psnr"]) == horizon
    # the autoencoder's own reconstruction is the ceiling of every dream
    assert min(result["psnr"]["reconstruction"]) > max(result["psnr"]["none"])
    # counterfactual replay: encoding a real clip and decoding it under its own actions gives it back
    assert result["counterfactual"]["roundtrip_max_latent_error"] < 1e-3
    events = result["dream_reward_events"]
    assert set(events) == {"real", "flow-score", "tweedie", "none"}
    assert all(0 <= v <= result["clips"] * horizon for v in events.values())


def test_eval_writes_json_and_real_pngs(tiny_run, breakout_data, tmp_path, capsys):
    _, run = tiny_run
    out = tmp_path / "new" / "dir" / "tiny_eval.json"  # a folder that does not exist yet is made
    assert main(["eval", str(run), "--data", str(breakout_data), "--horizon", "3", "--clips", "4",
                 "--windows", "16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    _check_result(result, 3)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result  # the JSON is printed last
    for key in ("psnr_plot", "strip"):
        data = open(result[key], "rb").read()
        assert data.startswith(PNG) and len(data) > 1000


def test_eval_without_data_collects_fresh_episodes_of_the_worlds_game(tiny_run, tmp_path):
    _, run = tiny_run
    out = tmp_path / "fresh.json"
    assert main(["eval", str(run), "--horizon", "2", "--clips", "2", "--windows", "4", "--collect-steps", "150",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    _check_result(result, 2)
    manifest = json.loads((tmp_path / "fresh_data" / "manifest.json").read_text())
    assert manifest["env_id"] == "ALE/Breakout-v5" and result["split"] == "all"


def test_eval_refuses_data_of_another_game(tiny_run, breakout_data, tmp_path, capsys):
    _, run = tiny_run
    other = tmp_path / "other"
    shutil.copytree(breakout_data, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "env_id": "ALE/Pong-v5"}))
    assert main(["eval", str(run), "--data", str(other), "--json", str(tmp_path / "e.json")]) == 2
    assert "ALE/Pong-v5" in capsys.readouterr().err
