"""RNG states of Python, NumPy, torch and CUDA, as plain tensors and tuples, so they travel in a
checkpoint loadable with torch.load(weights_only=True) and resume bit-identically."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> Dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        # NumPy's MT19937 key is a uint32 array: stored as int64 so weights_only loading accepts it.
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStates:
    """This process's RNG states as a stateful object (state_dict / load_state_dict), so the
    checkpointer saves and restores them like any other piece of the run's state."""

    def state_dict(self) -> Dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        set_rng_state(state)
