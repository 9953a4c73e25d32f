"""Which torch device a process runs on: one answer for training and for every stage.

Training asks through `tinyllama.train.distributed.setup_distributed` (one GPU per torchrun
process); the evaluate, sample and export stages ask through `tinyllama.checkpoint.load_for_inference`.
Neither reads the other's module, so the stages need nothing of the training package.
"""

from __future__ import annotations

import torch

from tinyllama.errors import ConfigError


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """run.device ("auto", "cpu", "cuda", "cuda:N") -> the torch device this process uses."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"run.device={requested!r} but CUDA is not available: use run.device=cpu")
    if requested.startswith("cuda:"):
        return torch.device(requested)
    return torch.device("cuda", local_rank)  # one GPU per process under torchrun
