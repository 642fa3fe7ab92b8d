"""The KV cache of the stepping loop: one dense buffer per layer, one row per running sequence.

Row r holds its sequence's keys and values at columns [0, length). A decode step writes one column per row
(each at that row's own length) and attends over a view of rows [0, n) and columns [0, longest + 1): no
copy, no per-step reallocation, whatever the mix of lengths. A prefill step is packed: the prompt chunks
of the joining sequences run as one sequence of tokens, each token's keys written into its own row, and
each chunk then attends to its own row (attention.py), so prompts of different lengths cost no padding.

The buffer grows (and shrinks) only when the longest sequence or the number of rows calls for it, rounded
up to spare reallocations but never beyond the token limit it is given (the stepping loop's KV budget).
transformers' attention code sees it as any other `Cache`: `update` stores the new keys and values and
returns what attention reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin

# Capacity grows in steps of this many columns, so that a growing sequence reallocates rarely.
_COLUMN_GRANULE = 256


@dataclass
class _DenseStep:
    """Decode: rows [0, rows) each write one token at column `columns[row]`; attention sees `kv_length`."""

    rows: int
    columns: torch.Tensor  # (rows,) long
    kv_length: int


@dataclass
class _PackedStep:
    """Prefill: token t writes at (rows[t], columns[t]); attention picks each chunk's row itself."""

    rows: torch.Tensor  # (tokens,) long
    columns: torch.Tensor


class _SlotLayer(CacheLayerMixin):
    def __init__(self, cache: SlotKVCache) -> None:
        super().__init__()
        self._cache = cache
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffers are sized by SlotKVCache.reserve before every forward

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        step = self._cache.step
        if isinstance(step, _DenseStep):
            rows = self._cache.row_index[: step.rows]
            # (rows, heads, 1, dim) → (rows, heads, dim): one new column per row.
            self.keys[rows, :, step.columns] = key_states[:, :, 0]
            self.values[rows, :, step.columns] = value_states[:, :, 0]
            return self.keys[: step.rows, :, : step.kv_length], self.values[: step.rows, :, : step.kv_length]
        # (1, heads, tokens, dim) → (tokens, heads, dim), written cell by cell.
        self.keys[step.rows, :, step.columns] = key_states[0].transpose(0, 1)
        self.values[step.rows, :, step.columns] = value_states[0].transpose(0, 1)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        step = self._cache.step
        return (step.kv_length if isinstance(step, _DenseStep) else self._cache.capacity[1]), 0

    def get_seq_length(self) -> int:
        return self.get_mask_sizes(0)[0]

    def get_max_length(self) -> int:
        return -1


def bytes_per_token(config: PretrainedConfig, dtype: torch.dtype) -> int:
    """Memory one token of context takes in the cache: keys and values in every layer."""
    heads, head_dim, layers = _shape(config)
    return 2 * layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def _shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(key/value heads, head size, layers) of a model."""
    text_config = config.get_text_config()
    head_dim = getattr(text_config, "head_dim", None) or (
        text_config.hidden_size // text_config.num_attention_heads
    )
    return text_config.num_key_value_heads, head_dim, text_config.num_hidden_layers


class SlotKVCache(Cache):
    """Dense per-row keys and values for every layer of one model (see the module docstring)."""

    def __init__(
        self, config: PretrainedConfig, device: str, dtype: torch.dtype, token_limit: int | None = None
    ) -> None:
        self._heads, self._head_dim, layers = _shape(config)
        # Rows × columns the buffers may ever hold (the KV budget); rounding up never goes beyond it.
        self._token_limit = token_limit
        self._device = device
        self._dtype = dtype
        self.step: _DenseStep | _PackedStep | None = None
        self.row_index = torch.arange(0, device=device)
        super().__init__(layers=[_SlotLayer(self) for _ in range(layers)])
        self._allocate(0, 0)

    @property
    def capacity(self) -> tuple[int, int]:
        """(rows, columns) the buffers hold now."""
        return self._rows, self._columns

    def reserve(self, rows: int, columns: int) -> None:
        """Makes room for `rows` × `columns`, keeping the cells in that range (the caller's rows and
        columns cover every cell still needed). Rows grow in powers of two and columns in granules, so
        that growing reallocates rarely, but never beyond the token limit: near it, the rounding (and
        capacity kept from before) gives way, down to exactly `rows` × `columns`."""
        if rows <= self._rows and columns <= self._columns:
            return
        shapes = (
            (max(_round_up_rows(rows), self._rows), max(_round_up_columns(columns), self._columns)),
            (_round_up_rows(rows), _round_up_columns(columns)),
            (rows, _round_up_columns(columns)),
            (_round_up_rows(rows), columns),
        )
        limit = self._token_limit
        new_rows, new_columns = next(
            (shape for shape in shapes if limit is None or shape[0] * shape[1] <= limit), (rows, columns)
        )
        self._resize(new_rows, new_columns, self._rows, self._columns)

    def shrink(self, rows: int, columns: int) -> None:
        """Frees memory once the buffers hold more than twice what the running sequences need (all of it
        when nothing runs); the rows kept keep their first `columns` cells."""
        new_rows, new_columns = _round_up_rows(rows), _round_up_columns(columns)
        if self._rows > 2 * new_rows or self._columns > 2 * new_columns or (not rows and self._rows):
            self._resize(new_rows if rows else 0, new_columns if rows else 0, rows, columns)

    def move_row(self, source: int, destination: int, length: int) -> None:
        """Copies the first `length` columns of row `source` into row `destination`."""
        for layer in self.layers:
            layer.keys[destination, :, :length] = layer.keys[source, :, :length]
            layer.values[destination, :, :length] = layer.values[source, :, :length]

    def swap_rows(self, first: int, second: int, length: int) -> None:
        """Exchanges the first `length` columns of two rows."""
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                held = buffer[first, :, :length].clone()
                buffer[first, :, :length] = buffer[second, :, :length]
                buffer[second, :, :length] = held

    def dense_step(self, columns: torch.Tensor, kv_length: int) -> None:
        self.step = _DenseStep(int(columns.numel()), columns, kv_length)

    def packed_step(self, rows: torch.Tensor, columns: torch.Tensor) -> None:
        self.step = _PackedStep(rows, columns)

    def _resize(self, rows: int, columns: int, keep_rows: int, keep_columns: int) -> None:
        old = [(layer.keys, layer.values) for layer in self.layers]
        keep_rows = min(keep_rows, rows, self._rows)
        keep_columns = min(keep_columns, columns, self._columns)
        self._allocate(rows, columns)
        for layer, (keys, values) in zip(self.layers, old, strict=True):
            layer.keys[:keep_rows, :, :keep_columns] = keys[:keep_rows, :, :keep_columns]
            layer.values[:keep_rows, :, :keep_columns] = values[:keep_rows, :, :keep_columns]

    def _allocate(self, rows: int, columns: int) -> None:
        shape = (rows, self._heads, columns, self._head_dim)
        for layer in self.layers:
            layer.keys = torch.zeros(shape, device=self._device, dtype=self._dtype)
            layer.values = torch.zeros(shape, device=self._device, dtype=self._dtype)
        self._rows, self._columns = rows, columns
        self.row_index = torch.arange(rows, device=self._device)


def _round_up_columns(columns: int) -> int:
    return max(1, -(-columns // _COLUMN_GRANULE)) * _COLUMN_GRANULE


def _round_up_rows(rows: int) -> int:
    """Rows grow in powers of two, so that sequences joining one by one reallocate rarely."""
    return 1 << max(0, rows - 1).bit_length()
