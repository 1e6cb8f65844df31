"""One rule for where models run: `--device auto|cpu|cuda|cuda:N` -> a torch device string, checked."""

import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def pick_device(name: str | None = "auto") -> str:
    """'auto' (or None) -> 'cuda' when a GPU is present, else 'cpu'; 'cpu', 'cuda' and 'cuda:N' are checked
    against what this machine has, so a wrong choice fails here with a clear error, not deep in torch."""
    name = "auto" if name is None else str(name)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise ValueError(f"device must be {DEVICE_CHOICES}, got {name!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU "
                         f"(torch {torch.__version__}; install a CUDA build of torch, or use --device cpu)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return name
