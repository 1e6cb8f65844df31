"""Shared fixtures: a small real Breakout collection and a tiny trained world model, made once per run."""

import os

import pytest

import worldflow  # noqa: F401  (before any test module loads torch: it sets OpenMP's barrier spin, so the
# suite does not crawl when other work shares the cores)

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")


@pytest.fixture(scope="session")
def breakout_data(tmp_path_factory):
    """~800 real ALE Breakout steps (a few episodes), collected in-process."""
    from worldflow.collect import collect

    out = tmp_path_factory.mktemp("data") / "breakout"
    collect("ALE/Breakout-v5", 800, str(out), seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def takecover_data(tmp_path_factory):
    """~400 real ViZDoom Take Cover steps (Dict observations, HEALTH as its game variable)."""
    from worldflow.collect import collect

    out = tmp_path_factory.mktemp("data") / "takecover"
    collect("VizdoomTakeCover-v1", 400, str(out), seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tracker_data(tmp_path_factory):
    """~600 real Breakout steps played by the scripted tracker (the ball kept in play)."""
    from worldflow.agents.scripted import BreakoutTracker
    from worldflow.collect import collect

    out = tmp_path_factory.mktemp("data") / "breakout_tracker"
    collect("ALE/Breakout-v5", 600, str(out), seed=0, progress=False, policy_factory=BreakoutTracker,
            policy_name="tracker")
    return out


@pytest.fixture(scope="session")
def tiny_run(breakout_data, tmp_path_factory):
    """The tiny config trained for its few steps: (trainer, run directory)."""
    from worldflow.config import load_config
    from worldflow.train import Trainer

    out = tmp_path_factory.mktemp("runs") / "tiny"
    trainer = Trainer(load_config(TINY), str(breakout_data), str(out))
    trainer.run(progress=False)
    return trainer, out


@pytest.fixture(scope="session")
def endless_world(tiny_run, tmp_path_factory):
    """The tiny world with its termination head pinned to 'never', so episodes end by truncation only
    (an untrained head sits at p = 0.5, where batched and single float rounding can flip a decision)."""
    import shutil

    import torch

    from worldflow.pretrained import CONTEXTS
    from worldflow.world_model import WorldFlowModel

    out = tmp_path_factory.mktemp("endless") / "world"
    model = WorldFlowModel.from_pretrained(tiny_run[1] / "latest")
    with torch.no_grad():
        model.heads.out[-1].bias[3] = -20.0  # the termination logit
    model.save_pretrained(out)
    shutil.copy(tiny_run[1] / "latest" / CONTEXTS, out / CONTEXTS)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray instance shared by every test that scales out (started once: ~4 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20,
             _temp_dir="/tmp/wf-ray")  # a short path: Ray's Unix sockets allow 107 bytes
    yield ray
    ray.shutdown()
