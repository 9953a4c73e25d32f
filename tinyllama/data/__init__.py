"""Data: text sources -> packed token shards on disk -> (x, y) batches.

    from tinyllama.data import iter_documents, ensure_packed, read_meta, BatchLoader, eval_batches

The loader (which needs torch) is imported on first use, so packing worker processes, which
import this package, start without torch.
"""
from tinyllama.data.pack import ensure_packed, packed_dir, read_meta
from tinyllama.data.sources import DataWarning, describe_source, iter_documents

_LAZY = {"BatchLoader", "eval_batches", "TokenStream"}


def __getattr__(name):
    if name in _LAZY:
        from tinyllama.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'tinyllama.data' has no attribute {name!r}")


__all__ = ["iter_documents", "describe_source", "DataWarning", "ensure_packed", "packed_dir", "read_meta",
           "BatchLoader", "eval_batches", "TokenStream"]
