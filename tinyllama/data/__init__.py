"""Data: text sources -> packed token shards on disk -> (x, y) batches.

    from tinyllama.data import iter_documents, ensure_packed, read_meta, BatchLoader, eval_batches

    sources.py       the documents of a split, from any data.source (config.SOURCES)
    synthetic*.py    the built-in story corpora (English, Chinese)
    pack.py          documents -> token shards + meta.json, built atomically (tinyllama.atomic)
    loader.py        shards -> seeded, resumable training batches; evaluation windows

This package reads its settings from tinyllama.config and imports neither the training package
nor any stage.
"""

from tinyllama.data.loader import BatchLoader, TokenStream, eval_batches
from tinyllama.data.pack import ensure_packed, packed_dir, read_meta
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
]
