"""Importing worldflow first sets OpenMP's barrier spin for a machine other work shares (a user's value wins)."""

import os
import subprocess
import sys

import pytest

READ = "import os; {imports}; print(os.environ.get('GOMP_SPINCOUNT'))"


@pytest.mark.parametrize("imports, preset, expected", [
    ("import worldflow, torch", None, "1000"),  # the worldflow command's order: set before torch loads
    ("import worldflow, torch", "7", "7"),  # the user's own setting is kept
    ("import torch, worldflow", None, "None"),  # too late to matter once torch has loaded: left alone
])
def test_importing_worldflow_sets_the_spin_only_before_torch_and_never_over_the_users(imports, preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    out = subprocess.run([sys.executable, "-c", READ.format(imports=imports)], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == expected
