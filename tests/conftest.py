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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(DataConfig, TokenizerConfig): 400 synthetic stories (~120k tokens, val ~2.6k tokens),
    BPE vocab 512. data.root is a session tmp folder that already holds the trained tokenizer
    and the packed shards, so ensure_tokenizer / ensure_packed with these configs reuse them."""
    from tinyllama.config import DataConfig, TokenizerConfig
    from tinyllama.data import ensure_packed
    from tinyllama.tokenizer import ensure_tokenizer

    root = tmp_path_factory.mktemp("tiny_data")
    data = DataConfig(name="synthetic", source="synthetic", num_docs=400, seed=1234, num_workers=0,
                      root=str(root))
    tok = TokenizerConfig(name="bpe_512", vocab_size=512, num_threads=1)
    ensure_packed(data, ensure_tokenizer(tok, data))
    return data, tok
