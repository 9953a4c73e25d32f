"""Packing: exact token streams and counts, shards, dtype, reuse, atomicity, mismatches."""

import json
from pathlib import Path

import numpy as np
import pytest

from tinyllama.config import DataConfig
from tinyllama.data import ensure_packed, iter_documents, pack, read_meta
from tinyllama.errors import DataError
from tinyllama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_data):
    data, tok_cfg = tiny_data
    return Tokenizer.load(Path(data.root) / "tokenizers" / f"{data.name}-{tok_cfg.name}")


def small_cfg(tmp_path, **kw):
    kw = {"name": "small", "num_docs": 60, "seed": 3, "num_workers": 0, "root": str(tmp_path), **kw}
    return DataConfig(**kw)


def read_split(out, meta, split):
    return np.concatenate(
        [np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    )


def test_exact_stream_and_counts(tmp_path, tok):
    cfg = small_cfg(tmp_path, shard_tokens=1000)
    out = ensure_packed(cfg, tok)
    meta = read_meta(out)
    for split in ("train", "val"):
        docs = list(iter_documents(cfg, split))
        want = [t for d in docs for t in [tok.bos_id] + tok.encode(d) + [tok.eos_id]]
        got = read_split(out, meta, split)
        assert got.tolist() == want
        assert meta["splits"][split]["tokens"] == len(want) and meta["splits"][split]["docs"] == len(docs)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) == -(-len(read_split(out, meta, "train")) // 1000)
    assert all(s["tokens"] == 1000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 1000
    assert meta["dtype"] == "uint16" and meta["splits"]["val"]["docs"] == 1
    assert meta["tokenizer"] == {
        "fingerprint": tok.fingerprint,
        "vocab_size": 512,
        "bos_id": 1,
        "eos_id": 2,
        "unk_id": 0,
        "pad_id": None,
        "model_path": str(tok.model_path),
    }
    assert meta["source"] == {"source": "synthetic", "max_docs": None, "num_docs": 60, "seed": 3}


def test_workers_give_identical_bytes(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(pack, "CHUNK_BYTES", 2000)  # many chunks, so the order across workers matters
    one = ensure_packed(small_cfg(tmp_path / "a"), tok)
    two = ensure_packed(small_cfg(tmp_path / "b", num_workers=2), tok)
    for split in ("train", "val"):
        assert (one / split / "00000.bin").read_bytes() == (two / split / "00000.bin").read_bytes()


def test_uint32_when_vocab_exceeds_uint16(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(Tokenizer, "vocab_size", property(lambda self: 70_000))
    out = ensure_packed(small_cfg(tmp_path), tok)
    meta = read_meta(out)
    assert meta["dtype"] == "uint32"
    assert (
        read_split(out, meta, "val")[:3].tolist()
        == [1] + tok.encode(next(iter_documents(small_cfg(tmp_path), "val")))[:2]
    )


def test_reused_on_second_run(tmp_path, tok, monkeypatch):
    cfg = small_cfg(tmp_path)
    out = ensure_packed(cfg, tok)
    monkeypatch.setattr(pack, "_pack", lambda *a: pytest.fail("packed again"))
    assert ensure_packed(cfg, tok) == out


def test_interrupted_packing_leaves_nothing_complete(tmp_path, tok, monkeypatch):
    cfg = small_cfg(tmp_path)
    calls = []

    def dies(self, tokens, n_docs):
        calls.append(1)
        raise KeyboardInterrupt  # Ctrl-C while writing the first shard

    monkeypatch.setattr(pack._ShardWriter, "write", dies)
    with pytest.raises(KeyboardInterrupt):
        ensure_packed(cfg, tok)
    assert calls and list((tmp_path / "packed" / "small").iterdir()) == []
    monkeypatch.undo()
    # A run killed with SIGKILL leaves its temporary folder behind: it never looks complete,
    # and the next run removes it.
    stale = tmp_path / "packed" / "small" / f".tmp-{tok.fingerprint}-999999999"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "00000.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(DataError, match="not complete packed data"):
        read_meta(stale)
    out = ensure_packed(cfg, tok)
    assert read_meta(out)["splits"]["train"]["docs"] == 60 and not stale.exists()


def test_truncated_shard_is_detected(tmp_path, tok):
    out = ensure_packed(small_cfg(tmp_path), tok)
    shard = out / "train" / "00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="missing or truncated"):
        read_meta(out)


def test_other_tokenizer_or_source_is_refused(tmp_path, tok):
    cfg = small_cfg(tmp_path)
    out = ensure_packed(cfg, tok)
    cfg.num_docs = 61
    with pytest.raises(DataError, match="packed from another source"):
        ensure_packed(cfg, tok)
    meta = json.loads((out / "meta.json").read_text())
    meta["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (out / "meta.json").write_text(json.dumps(meta))
    cfg.num_docs = 60
    with pytest.raises(DataError, match="packed with tokenizer 0123456789abcdef"):
        ensure_packed(cfg, tok)
    assert (out / "train" / "00000.bin").exists()  # nothing deleted


def test_empty_validation_split(tmp_path, tok):
    f = tmp_path / "one.txt"
    f.write_text("Just one story.")
    cfg = DataConfig(
        name="one",
        source="text_files",
        train_files=[str(f)],
        val_fraction=0.0,
        num_workers=0,
        root=str(tmp_path),
    )
    with pytest.raises(DataError, match="val split .* holds no documents.*val_fraction"):
        ensure_packed(cfg, tok)
    assert not any(p.name == tok.fingerprint for p in (tmp_path / "packed" / "one").iterdir())


def test_ordered_map_reads_lazily_and_keeps_order():
    """The thread pool must not read the whole corpus ahead (memory would grow with it) and must
    return results in input order whatever order the threads finish in."""
    import random
    import time
    from concurrent.futures import ThreadPoolExecutor

    read = []

    def items():
        for i in range(50):
            read.append(i)
            yield i

    def slow_square(i):
        time.sleep(random.random() * 0.002)
        return i * i

    with ThreadPoolExecutor(2) as pool:
        out = []
        for result in pack._ordered_map(pool, slow_square, items(), in_flight=4):
            out.append(result)
            assert len(read) - len(out) <= 4  # never more than in_flight items read ahead
    assert out == [i * i for i in range(50)]


def test_worker_error_reaches_the_caller(tmp_path, tok, monkeypatch):
    def broken(self, docs):
        raise DataError("bad chunk")

    monkeypatch.setattr(pack._ChunkEncoder, "__call__", broken)
    with pytest.raises(DataError, match="bad chunk"):
        ensure_packed(small_cfg(tmp_path, num_workers=2), tok)
    assert not list((tmp_path / "packed").rglob("meta.json"))  # nothing that looks complete
