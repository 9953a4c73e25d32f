"""Data: text sources -> packed token shards on disk -> (x, y) batches; conversations likewise.

    from tinyllama.data import iter_documents, ensure_packed, read_meta, BatchLoader, eval_batches

    sources.py       the documents of a split, from any data.source (config.SOURCES)
    synthetic*.py    the built-in story corpora (English, Chinese)
    pack.py          documents -> token shards + meta.json, built atomically (tinyllama.atomic)
    loader.py        shards -> seeded, resumable training batches; evaluation windows
    conversations.py conversations of your files / a HF dataset / the built-in chat corpus
    sft_batches.py   encoded conversations -> windows (packed or padded), counted overflow
    sft_data.py      conversations -> packed windows on disk; their training and evaluation batches

This package reads its settings from tinyllama.config and imports neither the training package
nor any stage.
"""

from tinyllama.data.loader import BatchLoader, ModelBatch, TokenStream, eval_batches
from tinyllama.data.pack import ensure_packed, packed_dir, read_meta
from tinyllama.data.sft_data import (
    SFTBatchLoader,
    ensure_chat_packed,
    packing_report,
    read_chat_meta,
    sft_eval_batches,
)
from tinyllama.data.sources import DataWarning, describe_source, iter_documents

__all__ = [
    "iter_documents",
    "describe_source",
    "DataWarning",
    "ensure_packed",
    "packed_dir",
    "read_meta",
    "BatchLoader",
    "eval_batches",
    "TokenStream",
    "ModelBatch",
    "SFTBatchLoader",
    "ensure_chat_packed",
    "read_chat_meta",
    "packing_report",
    "sft_eval_batches",
]
