"""Loader: windows are true slices of the stream, seeded, disjoint across ranks, resumable."""

import json

import numpy as np
import pytest
import torch

from tinyllama.config import DataConfig
from tinyllama.data import BatchLoader, TokenStream, ensure_packed, eval_batches, read_meta
from tinyllama.errors import DataError
from tinyllama.tokenizer import ensure_tokenizer


@pytest.fixture(scope="module")
def packed(tiny_data):
    data, tok_cfg = tiny_data
    return ensure_packed(data, ensure_tokenizer(tok_cfg, data))


def make_ramp(folder, train_tokens=20_000, val_tokens=3_000, shard_tokens=7_000):
    """A packed folder whose token at position i is i: a window's first token is its start."""
    from tinyllama.data.pack import _ShardWriter

    splits = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        writer = _ShardWriter(folder, split, np.dtype("uint16"), shard_tokens)
        writer.write(np.arange(n, dtype=np.uint16), 1)
        splits[split] = writer.close()
    meta = {
        "format": 1,
        "dtype": "uint16",
        "splits": splits,
        "source": {},
        "tokenizer": {"fingerprint": "ramp", "vocab_size": 65536, "bos_id": 1, "eos_id": 2},
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    return make_ramp(tmp_path_factory.mktemp("ramp"))


def test_real_batches_are_shifted_text(packed, tiny_data):
    data, tok_cfg = tiny_data
    tok = ensure_tokenizer(tok_cfg, data)
    x, y = BatchLoader(packed, "train", batch_size=4, seq_len=32, seed=1).next_batch()
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 512
    assert "." in tok.decode(x[0].tolist())


def test_windows_are_seeded_slices(ramp):
    x, y = BatchLoader(ramp, "train", batch_size=8, seq_len=32, seed=1).next_batch()
    starts = x[:, 0:1]
    assert torch.equal(x, starts + torch.arange(32)) and torch.equal(y, starts + 1 + torch.arange(32))
    again = BatchLoader(ramp, "train", batch_size=8, seq_len=32, seed=1).next_batch()
    assert torch.equal(again[0], x)
    assert not torch.equal(BatchLoader(ramp, "train", batch_size=8, seq_len=32, seed=2).next_batch()[0], x)


def test_ranks_read_disjoint_windows(ramp):
    T, B = 63, 8
    ranks = [
        BatchLoader(ramp, "train", batch_size=B, seq_len=T, seed=0, rank=r, world_size=3) for r in range(3)
    ]
    steps = 20_000 // 64 // (3 * B)  # within the first epoch
    seen = [[int(s) for _ in range(steps) for s in loader.next_batch()[0][:, 0]] for loader in ranks]
    assert len(set(seen[0]) | set(seen[1]) | set(seen[2])) == 3 * len(seen[0])  # disjoint
    assert len({s % (T + 1) for r in seen for s in r}) == 1  # one window grid per epoch, shared by ranks
    assert ranks[0].state_dict() == ranks[1].state_dict() == ranks[2].state_dict()


def starts(loader, micro_steps):
    """The first token of every window `loader` reads in `micro_steps` batches, in order."""
    return [int(s) for _ in range(micro_steps) for s in loader.next_batch()[0][:, 0]]


def test_the_order_is_global_whatever_the_number_of_ranks(ramp):
    """Each micro-step the ranks together read the next world x batch windows of one order, so
    2 ranks x batch 4 read per step what 1 rank x batch 4 x 2 accumulation reads, across epochs
    (312 windows: the 100 micro-steps wrap past the end of the first epoch)."""
    T, B, steps = 63, 4, 100
    one = starts(BatchLoader(ramp, "train", batch_size=B, seq_len=T, seed=5), 2 * steps)
    two = [starts(BatchLoader(ramp, "train", B, T, 5, rank=r, world_size=2), steps) for r in range(2)]
    for step in range(steps):
        single = one[2 * B * step : 2 * B * (step + 1)]
        both = two[0][B * step : B * (step + 1)] + two[1][B * step : B * (step + 1)]
        assert sorted(single) == sorted(both), step


def test_resume_on_another_number_of_ranks_continues_the_global_order(ramp):
    T, B = 63, 4
    full = starts(BatchLoader(ramp, "train", batch_size=B, seq_len=T, seed=6), 170)  # 680 > 312 windows
    ranks = [BatchLoader(ramp, "train", B, T, 6, rank=r, world_size=2) for r in range(2)]
    first = [starts(loader, 45) for loader in ranks]  # 360 windows: into the second epoch
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict() and state["epoch"] == 1
    resumed = BatchLoader(ramp, "train", batch_size=B, seq_len=T, seed=6)
    resumed.load_state_dict(state)
    assert sorted(first[0] + first[1]) == sorted(full[:360])
    assert starts(resumed, 80) == full[360:]
    with pytest.raises(DataError, match="saved seed is 6"):
        BatchLoader(ramp, "train", B, T, seed=7).load_state_dict(state)


def test_epochs_cover_every_window_once_in_new_orders(ramp):
    loader = BatchLoader(ramp, "train", batch_size=1, seq_len=98, seed=4)
    n = 20_000 // 99  # 202 windows, 2 tokens of slack for the epoch's grid offset
    epochs = [[int(loader.next_batch()[0][0, 0]) for _ in range(n)] for _ in range(3)]
    for starts in epochs:
        assert len(set(starts)) == n and len({s % 99 for s in starts}) == 1 and max(starts) <= 20_000 - 99
    assert epochs[0] != epochs[1] != epochs[2]


def test_resume_replays_exactly_across_epochs(ramp):
    def loader():
        return BatchLoader(ramp, "train", batch_size=16, seq_len=511, seed=3)

    full = loader()
    assert len(full._order_of(0)[1]) == 39  # 10 batches of 16 span five epochs
    batches = [full.next_batch() for _ in range(10)]
    first = loader()
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    for want in batches[4:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert resumed.epoch == 4
    other = BatchLoader(ramp, "train", batch_size=16, seq_len=255, seed=3)
    with pytest.raises(DataError, match="saved seq_len is 511"):
        other.load_state_dict(state)


def test_eval_batches_sequential_and_split_across_ranks(ramp):
    T = 99
    rows = torch.cat([x for x, _ in eval_batches(ramp, "val", batch_size=4, seq_len=T)])
    assert rows[:, 0].tolist() == [i * 100 for i in range(30)]  # every whole window, in order
    assert len(list(eval_batches(ramp, "val", 4, T, max_batches=2))) == 2
    parts = [list(eval_batches(ramp, "val", 4, T, rank=r, world_size=4)) for r in range(4)]
    assert [len(p) for p in parts] == [2, 2, 2, 2]  # 7 windows each: batches of 4 and 3
    assert torch.cat([x for p in parts for x, _ in p])[:, 0].tolist() == [i * 100 for i in range(28)]


def test_windows_cross_shard_boundaries(tmp_path, tiny_data):
    data, tok_cfg = tiny_data
    tok = ensure_tokenizer(tok_cfg, data)
    out = ensure_packed(
        DataConfig(name="s", num_docs=20, num_workers=0, shard_tokens=100, root=str(tmp_path)), tok
    )
    meta = read_meta(out)
    stream = TokenStream(out, meta, "train")
    flat = np.concatenate(
        [np.fromfile(out / s["file"], dtype="uint16") for s in meta["splits"]["train"]["shards"]]
    )
    assert len(meta["splits"]["train"]["shards"]) > 5
    assert stream.read(95, 210).tolist() == flat[95:305].tolist()


def test_too_small_corpus_and_incompatible_model(packed):
    tokens = read_meta(packed)["splits"]["val"]["tokens"]
    with pytest.raises(
        DataError,
        match=f"has {tokens} tokens, but one window of seq_len \\+ 1 = 4001 tokens needs at least 4001",
    ):
        BatchLoader(packed, "val", batch_size=1, seq_len=4000, seed=0)
    with pytest.raises(DataError, match="needs at least"):
        next(eval_batches(packed, "val", 1, tokens))
    loader = BatchLoader(packed, "train", batch_size=1, seq_len=8, seed=0)
    loader.check_compatible(loader.fingerprint, 512)
    with pytest.raises(DataError, match="packed with tokenizer .* but the model uses tokenizer deadbeef"):
        loader.check_compatible("deadbeef", 512)
    with pytest.raises(DataError, match="vocab size 512, larger than the model's vocab_size=256"):
        loader.check_compatible(loader.fingerprint, 256)
