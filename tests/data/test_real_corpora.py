"""The real corpora beside the checkout (../shared/data): skipped cleanly where absent."""

import numpy as np

from tinyllama.config import DataConfig, TokenizerConfig
from tinyllama.data import ensure_packed, read_meta
from tinyllama.tokenizer import ensure_tokenizer


def test_chinese_tokenizer_round_trips_another_book(shared_data, tmp_path):
    books = shared_data / "chinese_classics"
    data = DataConfig(
        name="hlm",
        source="text_files",
        train_files=[str(books / "hongloumeng.txt")],
        doc_separator="blank_lines",
        root=str(tmp_path),
    )
    tok = ensure_tokenizer(
        TokenizerConfig(name="zh", vocab_size=4096, character_coverage=0.9995, max_train_bytes=400_000), data
    )
    other = (books / "shuihu.txt").read_text(encoding="utf-8")[20_000:22_000]  # characters never seen
    ids = tok.encode(other)
    assert tok.unk_id not in ids and tok.decode(ids) == other
    assert len(ids) < len(other)  # pieces longer than one character on average


def test_tinystories_sample_packs_every_story(shared_data, tmp_path):
    ts = shared_data / "tinystories"
    data = DataConfig(
        name="ts",
        source="tinystories",
        train_files=[str(ts / "TinyStories-train.head2MiB.txt")],
        val_files=[str(ts / "TinyStories-validation.hf-export.head.txt")],
        num_workers=0,
        root=str(tmp_path),
    )
    tok = ensure_tokenizer(TokenizerConfig(name="bpe_512", vocab_size=512, max_train_bytes=500_000), data)
    out = ensure_packed(data, tok)
    meta = read_meta(out)
    assert meta["splits"]["train"]["docs"] == 2317  # 2316 separated stories + the truncated last one
    assert meta["splits"]["val"]["docs"] == 1  # no separator: one continuous held-out stream
    train = np.fromfile(out / "train" / "00000.bin", dtype=meta["dtype"])
    assert (train == tok.bos_id).sum() == (train == tok.eos_id).sum() == 2317
    assert tok.decode(train[1:40].tolist()).startswith("One day, a little girl named Lily found a needle")
