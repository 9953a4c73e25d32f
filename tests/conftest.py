"""Fixtures shared across the suite. Each area (model, data, train, ...) keeps its own
fixtures in its own tests/<area>/conftest.py; only cross-area fixtures live here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Two cores: keep torch from oversubscribing them when pytest-xdist runs two workers.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora beside the checkout (../shared/data); skip when absent (fresh machines)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present on this machine")
    return SHARED_DATA
