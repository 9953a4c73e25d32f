"""Tokenizer: round trips without <unk>, Llama special ids, reuse, and clear errors."""

import hashlib
import json
import os

import pytest

from tinyllama.config import DataConfig, TokenizerConfig
from tinyllama.errors import DataError
from tinyllama.tokenizer import Tokenizer, ensure_tokenizer, tokenizer_dir

ZH = "从前有一只小猫，它住在一个安静的村子里。有一天，小猫看见一只蝴蝶，就跟着它跑到了河边。"


@pytest.fixture(scope="module")
def tok(tiny_data):
    data, tok_cfg = tiny_data
    return ensure_tokenizer(tok_cfg, data)


def _files_cfg(tmp_path, text, name="t", **kw):
    f = tmp_path / f"{name}.txt"
    f.write_text(text, encoding="utf-8")
    return DataConfig(name=name, source="text_files", train_files=[str(f)], root=str(tmp_path / "root"), **kw)


def test_english_round_trip_without_unk(tok):
    text = 'Mia found 12 red shells!\n"Look," she said. Zoë\'s café: naïve — 3.14 — done.\n\nThe end.'
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_chinese_round_trip_through_byte_fallback(tok):
    ids = tok.encode(ZH)  # an English-only vocab: every CJK character falls back to its UTF-8 bytes
    assert tok.unk_id not in ids
    assert tok.decode(ids) == ZH
    assert len(ids) >= len(ZH.encode("utf-8")) - 1  # about one piece per byte


def test_chinese_tokenizer_covers_characters(tmp_path):
    data = _files_cfg(tmp_path, "\n<|endoftext|>\n".join([ZH] * 50), name="zh")
    zh = ensure_tokenizer(TokenizerConfig(name="zh", vocab_size=320, character_coverage=0.9995), data)
    rare = "龘" + ZH  # not in the training text
    ids = zh.encode(rare)
    assert zh.unk_id not in ids and zh.decode(ids) == rare
    assert len(zh.encode(ZH)) < len(ZH)  # trained pieces merge characters


def test_special_ids_digits_bos_eos(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, None)
    assert tok.vocab_size == 512
    ids = tok.encode("Once", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "Once"
    assert tok.encode_batch(["a b", "Once"], bos=True) == [
        tok.encode("a b", bos=True),
        tok.encode("Once", bos=True),
    ]


@pytest.mark.parametrize("split_digits", [True, False])
def test_split_digits(tmp_path, split_digits):
    data = _files_cfg(tmp_path, "In 2024 we had 2024 apples and 1999 pears.\n" * 50)
    t = ensure_tokenizer(
        TokenizerConfig(name=f"d{split_digits}", vocab_size=300, split_digits=split_digits), data
    )
    pieces = [t.sp.id_to_piece(i) for i in t.encode("2024")]
    assert (pieces == ["\u2581", "2", "0", "2", "4"]) == split_digits


def test_fingerprint_is_hash_of_model_file(tok):
    assert tok.fingerprint == hashlib.sha256(tok.model_path.read_bytes()).hexdigest()[:16]
    assert Tokenizer.load(tok.model_path.parent).fingerprint == tok.fingerprint


def test_pad_and_user_symbols_and_unigram(tmp_path, tiny_data):
    data = DataConfig(name="syn", num_docs=100, root=str(tmp_path))
    cfg = TokenizerConfig(
        name="u", vocab_size=400, model_type="unigram", pad_id=3, user_defined_symbols=["<|user|>"]
    )
    t = ensure_tokenizer(cfg, data)
    assert t.pad_id == 3 and t.sp.id_to_piece(3) == "<pad>"
    marker = t.sp.piece_to_id("<|user|>")
    assert marker in t.encode("hi <|user|> there") and t.sp.get_piece_size() == 400
    settings = json.loads((tokenizer_dir(cfg, data) / "settings.json").read_text())
    assert settings["tokenizer"]["model_type"] == "unigram" and settings["source"]["num_docs"] == 100


def test_reused_not_retrained_and_other_settings_refused(tmp_path, monkeypatch):
    data = DataConfig(name="syn", num_docs=100, root=str(tmp_path))
    cfg = TokenizerConfig(name="small", vocab_size=340)
    first = ensure_tokenizer(cfg, data)
    mtime = os.stat(first.model_path).st_mtime_ns
    import tinyllama.tokenizer as module

    monkeypatch.setattr(module, "train_tokenizer", lambda *a: pytest.fail("retrained"))
    assert ensure_tokenizer(cfg, data).fingerprint == first.fingerprint
    cfg.vocab_size = 360
    with pytest.raises(DataError, match=r"tokenizer\.vocab_size: 340 -> 360"):
        ensure_tokenizer(cfg, data)
    assert os.stat(first.model_path).st_mtime_ns == mtime  # nothing overwritten


def test_vocab_too_large_gives_advice_and_leaves_nothing(tmp_path):
    data = _files_cfg(tmp_path, "the cat sat on the mat\n" * 20)
    with pytest.raises(DataError, match=r"vocab_size=4096 is more than this corpus supports.*at most \d+"):
        ensure_tokenizer(TokenizerConfig(name="big", vocab_size=4096), data)
    assert list((tmp_path / "root" / "tokenizers").iterdir()) == []  # no half-made folder


def test_vocab_too_small_gives_advice(tmp_path):
    data = _files_cfg(tmp_path, "the cat sat on the mat\n" * 20)
    with pytest.raises(DataError, match=r"too small.*need at least \d+"):
        ensure_tokenizer(TokenizerConfig(name="tiny", vocab_size=100), data)


def test_model_file_and_missing_model(tok, tmp_path):
    data = DataConfig(root=str(tmp_path))
    assert (
        ensure_tokenizer(TokenizerConfig(model_file=str(tok.model_path)), data).fingerprint == tok.fingerprint
    )
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")


def test_foreign_folder_is_not_overwritten(tmp_path):
    data = DataConfig(name="syn", num_docs=50, root=str(tmp_path))
    cfg = TokenizerConfig(name="mine", vocab_size=340)
    folder = tokenizer_dir(cfg, data)
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds no tokenizer.model"):
        ensure_tokenizer(cfg, data)
    assert (folder / "notes.txt").read_text() == "keep me"
