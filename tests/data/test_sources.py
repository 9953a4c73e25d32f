"""Text sources: every file format and separator, held-out validation, HF datasets from local
folders, the offline error, and each kind of bad input."""

import json
import os
import subprocess
import sys

import pytest

from tinyllama.config import DataConfig
from tinyllama.data import DataWarning, iter_documents, sources
from tinyllama.errors import DataError

DOCS = ["First story.\nIt has two lines.", "Second story.", "Third: \u00e9t\u00e9 \u4f60\u597d."]


def files_cfg(paths, **kw):
    return DataConfig(name="t", source="text_files", train_files=[str(p) for p in paths], **kw)


@pytest.mark.parametrize(
    "sep, text",
    [
        ("<|endoftext|>", "\n<|endoftext|>\n".join(DOCS) + "\n<|endoftext|>\n"),
        ("blank_lines", "\n\n\n".join(d.replace("\n", " ") for d in DOCS)),
    ],
)
def test_txt_separators(tmp_path, sep, text):
    f = tmp_path / "a.txt"
    f.write_text(text, encoding="utf-8")
    want = DOCS if sep != "blank_lines" else [d.replace("\n", " ") for d in DOCS]
    cfg = files_cfg([f], doc_separator=sep, val_files=[str(f)])
    assert list(iter_documents(cfg, "train")) == want


def test_one_document_per_file_and_globs(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"{i}.txt").write_text(d + "\n\n")
    cfg = files_cfg([tmp_path / "*.txt"], doc_separator="file", val_fraction=0.0)
    assert list(iter_documents(cfg, "train")) == DOCS


def test_jsonl_json_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)))
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in DOCS]))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "c.parquet")
    assert list(iter_documents(files_cfg([tmp_path / "a.jsonl"], val_fraction=0.0), "train")) == DOCS
    both = files_cfg([tmp_path / "b.json", tmp_path / "c.parquet"], text_field="body", val_fraction=0.0)
    assert list(iter_documents(both, "train")) == DOCS + DOCS
    with pytest.raises(DataError, match=r"no text field 'text' \(found \['body'\]\): set data.text_field"):
        list(iter_documents(files_cfg([tmp_path / "b.json"]), "train"))
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents(files_cfg([tmp_path / "c.parquet"]), "train"))


def test_held_out_fraction_is_deterministic_and_disjoint(tmp_path):
    docs = [f"story number {i}" for i in range(2000)]
    f = tmp_path / "many.txt"
    f.write_text("\n<|endoftext|>\n".join(docs))
    cfg = files_cfg([f], val_fraction=0.1, seed=5)
    train, val = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "val"))
    assert sorted(train + val, key=lambda s: int(s.split()[-1])) == docs
    assert 150 < len(val) < 250 and val == list(iter_documents(cfg, "val"))
    cfg.seed = 6
    assert list(iter_documents(cfg, "val")) != val
    cfg.max_docs = 10
    assert len(list(iter_documents(cfg, "train"))) == 10


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match=r"'.*nothing\*\.txt' matches no file"):
        list(iter_documents(files_cfg([tmp_path / "nothing*.txt"]), "train"))
    with pytest.raises(DataError, match="needs data.train_files"):
        list(iter_documents(DataConfig(source="text_files"), "train"))


def test_empty_file_warns_and_empty_corpus_fails(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "full.txt").write_text("A story.")
    with pytest.warns(DataWarning, match="empty.txt is empty; skipped"):
        assert list(iter_documents(files_cfg([tmp_path / "*.txt"], val_fraction=0.0), "train")) == [
            "A story."
        ]
    (tmp_path / "blank.txt").write_text("\n\n<|endoftext|>\n\n")
    with pytest.raises(DataError, match="holds no documents"), pytest.warns(DataWarning):
        list(iter_documents(files_cfg([tmp_path / "empty.txt", tmp_path / "blank.txt"]), "train"))


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 \ufffd ok\n".encode("utf-8") + b"na\xefve \xff\xfe end\n")
    # three invalid sequences: \xef starting a 3-byte character that "v" breaks, \xff, \xfe; the
    # U+FFFD that was already in the text is not counted
    with pytest.warns(DataWarning, match=r"latin1.txt: 3 byte sequence\(s\) are not valid UTF-8"):
        docs = list(iter_documents(files_cfg([f], val_fraction=0.0), "train"))
    assert docs == ["caf\u00e9 \ufffd ok\nna\ufffdve \ufffd\ufffd end"]


def test_hf_dataset_saved_to_disk_and_streaming(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"story": DOCS * 3}),
            "validation": datasets.Dataset.from_dict({"story": ["held out"]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = DataConfig(name="h", source="hf", hf_path=str(tmp_path / "ds"), text_field="story")
    assert list(iter_documents(cfg, "train")) == DOCS * 3
    assert list(iter_documents(cfg, "val")) == ["held out"]
    cfg.streaming = True
    assert list(iter_documents(cfg, "train")) == DOCS * 3
    cfg.hf_val_split = "test"
    with pytest.raises(DataError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        list(iter_documents(cfg, "val"))


def test_hf_local_data_files_folder(tmp_path):
    folder = tmp_path / "jsonl_ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    cfg = DataConfig(name="h", source="hf", hf_path=str(folder), hf_val_split=None, val_fraction=0.2)
    train, val = list(iter_documents(cfg, "train")), list(iter_documents(cfg, "val"))
    assert len(train) + len(val) == 50 and val and not set(train) & set(val)


def test_tinystories_unreachable_hub_fails_fast_with_advice(monkeypatch):
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataError, match=r"cannot reach the Hugging Face Hub.*data.train_files="):
        next(iter_documents(DataConfig(name="ts", source="tinystories"), "train"))


def test_tinystories_offline_mode_error_in_a_fresh_process(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    code = (
        "from tinyllama.config import DataConfig\nfrom tinyllama.data import iter_documents\n"
        "next(iter_documents(DataConfig(name='ts', source='tinystories'), 'train'))"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "DataError: cannot reach the Hugging Face Hub" in r.stderr and "data.train_files=" in r.stderr


def test_tinystories_local_sample(shared_data):
    f = shared_data / "tinystories" / "TinyStories-train.head2MiB.txt"
    cfg = DataConfig(name="ts", source="tinystories", train_files=[str(f)], val_fraction=0.0)
    docs = list(iter_documents(cfg, "train"))
    assert len(docs) == 2317  # 2316 separated stories + the truncated last one
    assert docs[0].startswith("One day, a little girl named Lily found a needle in her room.")
