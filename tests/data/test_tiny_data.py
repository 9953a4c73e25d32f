"""The shared `tiny_data` fixture: artifacts already on disk and reused, as other areas expect."""

from tinyllama.data import BatchLoader, ensure_packed, read_meta
from tinyllama.tokenizer import ensure_tokenizer


def test_tiny_data_is_ready_and_reused(tiny_data):
    data, tok_cfg = tiny_data
    tok = ensure_tokenizer(tok_cfg, data)
    out = ensure_packed(data, tok)
    meta = read_meta(out)
    assert tok.vocab_size == 512 and meta["tokenizer"]["fingerprint"] == tok.fingerprint
    assert meta["splits"]["train"]["docs"] == 400 and meta["splits"]["val"]["docs"] == 8
    x, y = BatchLoader(out, "train", batch_size=2, seq_len=128, seed=0).next_batch()
    assert x.shape == y.shape == (2, 128)
