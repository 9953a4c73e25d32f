"""KV cache: keys and values of past tokens, so each generated token costs one position, not a
whole re-run of the prefix.

Buffers are preallocated (B, H_kv, capacity, D) per layer and written in place; `update` returns
views of the filled part, so decoding never concatenates tensors. A cache made by the model
itself (use_cache=True without one) starts at the prompt's length and doubles when full; a
generation loop that knows its total length makes one of that size up front:

    cache = KVCache(config, batch_size=B, max_length=prompt_len + max_new_tokens,
                    device=input_ids.device, dtype=torch.float32)
    out = model(prompt_ids, past_key_values=cache, use_cache=True)      # prefill
    out = model(next_ids, past_key_values=out.past_key_values, use_cache=True)  # one token at a time

Writers go through `update` (tensors: the attention layers), `update_arrays` (NumPy arrays:
fast_decode.py's NumPy step on CPU) or `append_arrays` (room for the compiled step, which
writes the buffers itself); `select_rows`, `repeat_interleave` and `keep_columns`
reshape a batch (rows leaving, samples of one prompt, padding cut), and the serving engine fills a
fresh cache from two others when requests join.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

if TYPE_CHECKING:
    import numpy as np

from tinyllama.model.config import LlamaConfig


class KVCache:
    """Per-layer key/value buffers of shape (B, H_kv, capacity, D), keys stored after RoPE.

    With dtype=None the buffers are allocated at each layer's first update, in the dtype and on
    the device of its keys (under autocast the projections' dtype is only known then).
    """

    def __init__(
        self,
        config: LlamaConfig,
        batch_size: int,
        max_length: int,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.shape = (batch_size, config.resolved_num_key_value_heads, max_length, config.resolved_head_dim)
        n = config.num_hidden_layers
        self.keys: List[Optional[torch.Tensor]] = [None] * n
        self.values: List[Optional[torch.Tensor]] = [None] * n
        if dtype is not None:
            self.keys = [torch.zeros(self.shape, device=device, dtype=dtype) for _ in range(n)]
            self.values = [torch.zeros_like(k) for k in self.keys]
        # Tokens written so far, per layer (a forward pass updates layer 0 first, then 1, ...);
        # update and update_arrays write the buffers and these lengths (see the module's notes).
        self.lengths: List[int] = [0] * config.num_hidden_layers
        # update_arrays' NumPy views of each layer's buffers: (the key and value tensors, their views).
        self._arrays: List[Optional[Tuple[torch.Tensor, torch.Tensor, "np.ndarray", "np.ndarray"]]] = [
            None
        ] * n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (the next token's cache index)."""
        return self.lengths[layer_idx]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H_kv, T, D) keys/values for one layer; return all (B, H_kv, past + T, D)."""
        start = self.lengths[layer_idx]
        end = start + key_states.shape[2]
        self._reserve(layer_idx, end, key_states.dtype, key_states.device)
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def update_arrays(
        self, key_states: "np.ndarray", value_states: "np.ndarray", layer_idx: int
    ) -> Tuple["np.ndarray", "np.ndarray"]:
        """`update` for float32 NumPy arrays (B, H_kv, T, D), as fast_decode.py's decoding step
        computes them: written into the same buffers through zero-copy NumPy views of them, so
        the model's forward and that step can take turns on one cache. Returns the filled part,
        (B, H_kv, past + T, D) views. The buffers must be float32 on the CPU."""
        start = self.lengths[layer_idx]
        keys, values = self.append_arrays(layer_idx, key_states.shape[2])
        end = self.lengths[layer_idx]
        keys[:, :, start:end], values[:, :, start:end] = key_states, value_states
        return keys[:, :, :end], values[:, :, :end]

    def append_arrays(self, layer_idx: int, n: int) -> Tuple["np.ndarray", "np.ndarray"]:
        """Room for `n` more positions in one layer, counted as written: returns its whole
        key and value buffers (B, H_kv, capacity, D) as float32 NumPy views, whose positions
        [old length, old length + n) the caller fills now (update_arrays, or the compiled
        decoding step of tinyllama.kernels, which writes them itself)."""
        end = self.lengths[layer_idx] + n
        views = self._arrays[layer_idx]
        # The views are made once per buffer (a step calls this for every layer): remade when
        # the buffer was replaced (grown, rows selected) or cannot hold `end` positions.
        if (
            views is None
            or views[0] is not self.keys[layer_idx]
            or views[1] is not self.values[layer_idx]
            or end > views[2].shape[2]
        ):
            self._reserve(layer_idx, end, torch.float32, torch.device("cpu"))
            if self.keys[layer_idx].dtype != torch.float32 or self.keys[layer_idx].device.type != "cpu":
                raise ValueError(
                    f"update_arrays writes float32 CPU buffers; this cache holds "
                    f"{self.keys[layer_idx].dtype} on {self.keys[layer_idx].device}"
                )
            views = self._arrays[layer_idx] = (
                self.keys[layer_idx],
                self.values[layer_idx],
                self.keys[layer_idx].numpy(),
                self.values[layer_idx].numpy(),
            )
        self.lengths[layer_idx] = end
        return views[2], views[3]

    def repeat_interleave(self, repeats: int) -> None:
        """Make each row `repeats` adjacent rows (B -> B x repeats), cached positions and all: one
        prefilled prompt then continues as several samples."""
        self.select_rows(torch.arange(self.shape[0]).repeat_interleave(repeats))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (B',) in that order (a row may repeat): rows that finished
        leave the batch, or one prefilled prompt becomes several rows."""
        for buffers in (self.keys, self.values):
            for i, buffer in enumerate(buffers):
                if buffer is not None:
                    buffers[i] = buffer.index_select(0, index)
        self.shape = (len(index),) + self.shape[1:]
        self._forget_arrays()

    def keep_columns(self, start: int, end: int) -> None:
        """Keep cached positions [start, end) of every row (a copy: the columns left of start,
        padding no row reads any more, are freed); the cache then holds end - start."""
        for buffers in (self.keys, self.values):
            for i, buffer in enumerate(buffers):
                if buffer is not None:
                    buffers[i] = buffer[:, :, start:end].clone()
        self.lengths = [end - start] * len(self.lengths)
        self.shape = tuple(self.keys[0].shape)
        self._forget_arrays()

    def _forget_arrays(self) -> None:
        """Drop update_arrays' views of replaced buffers (they would keep the old ones alive)."""
        self._arrays = [None] * len(self._arrays)

    def _reserve(self, layer_idx: int, end: int, dtype: torch.dtype, device: torch.device) -> None:
        """Make one layer's buffers hold `end` positions: allocated on first use, reallocated
        (capacity at least doubling) when full."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx] = torch.zeros(self.shape, dtype=dtype, device=device)
            self.values[layer_idx] = torch.zeros(self.shape, dtype=dtype, device=device)
        if end > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, max(end, 2 * self.keys[layer_idx].shape[2]))

    def _grow(self, layer_idx: int, capacity: int) -> None:
        """Reallocate one layer's buffers to `capacity` positions, keeping what they hold."""
        for buffers in (self.keys, self.values):
            old = buffers[layer_idx]
            new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
            new[:, :, : old.shape[2]] = old
            buffers[layer_idx] = new
        self._arrays[layer_idx] = None
