"""Attention for the stepping loop whose result for a sequence does not depend on what shares its batch.

A greedy request must get the same answer batched as alone, and a seeded one the same sample. Float
results change with the shapes of the products that compute them, and a near tie between two tokens then
flips. torch's fused CPU attention (scaled_dot_product_attention) gives each row a slightly different
result depending on the batch size and on how far the dense view is padded beyond the row's own length.
The plain form below (scores, softmax, weighted sum, each a batched product per row and head) does not:
padding beyond a row's length only adds exact zeros, and every row is its own matrix product. It is also
faster than the fused kernel for decode steps here (one query per row). Prefill runs per sequence: each
prompt chunk attends to its own cells only, with the same shapes it would have alone.

The stepping loop passes its plan with every forward pass (`attention_plan=`); without one (the
thread-per-request path) the model's usual attention runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

IMPLEMENTATION = "sophia_batch_invariant"


@dataclass(frozen=True)
class DensePlan:
    """Decode: row r attends to its first `lengths[r]` cache columns (its new token included)."""

    lengths: torch.Tensor  # (rows,) long, on the model's device


@dataclass(frozen=True)
class Segment:
    """One prompt chunk in a packed prefill: query tokens [start, end) of the pack are positions
    [first_position, first_position + end - start) of cache row `row`."""

    start: int
    end: int
    row: int
    first_position: int


@dataclass(frozen=True)
class PackedPlan:
    segments: tuple[Segment, ...]


def use_batch_invariant_attention(model: PreTrainedModel) -> None:
    AttentionInterface.register(IMPLEMENTATION, _attention)
    model.set_attn_implementation(IMPLEMENTATION)


def _attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """query (batch, heads, q, dim); key, value (batch, kv heads, kv, dim) → (batch, q, heads, dim)."""
    plan = kwargs.pop("attention_plan", None)
    if plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    if isinstance(plan, DensePlan):
        return _dense(query, key, value, plan, scaling), None
    return _packed(query, key, value, plan, scaling), None


def _dense(query, key, value, plan: DensePlan, scaling: float) -> torch.Tensor:
    rows, heads, _, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    # One query per row: the query heads sharing a key/value head become that head's rows (no repeat).
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scaling
    visible = torch.arange(kv_length, device=key.device)[None, :] < plan.lengths[:, None]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    output = torch.matmul(torch.softmax(scores.float(), dim=-1).to(value.dtype), value)
    return output.reshape(rows, 1, heads, dim)


def _packed(query, key, value, plan: PackedPlan, scaling: float) -> torch.Tensor:
    """query (1, heads, tokens, dim) packs the chunks; key and value are the whole cache buffers."""
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    output = query.new_empty(tokens, heads, dim)
    for segment in plan.segments:
        length = segment.end - segment.start
        seen = segment.first_position + length
        # (kv heads, group × chunk, dim): the chunk's queries for each key/value head.
        chunk = query[0, :, segment.start : segment.end].reshape(kv_heads, group * length, dim)
        keys, values = key[segment.row, :, :seen], value[segment.row, :, :seen]
        scores = torch.matmul(chunk, keys.transpose(-1, -2)) * scaling
        positions = torch.arange(segment.first_position, seen, device=query.device)
        causal = torch.arange(seen, device=query.device)[None, :] <= positions[:, None]
        scores = scores.view(kv_heads, group, length, seen).masked_fill(~causal, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(values.dtype).view(kv_heads, group * length, seen)
        attended = torch.matmul(weights, values).view(heads, length, dim)
        output[segment.start : segment.end] = attended.transpose(0, 1)
    return output.unsqueeze(0)
