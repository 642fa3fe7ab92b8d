"""The stepping loop's KV cache: where each step writes, what attention reads, rows kept dense."""

import torch
from transformers import LlamaConfig

from services.inference.kv_cache import SlotKVCache, bytes_per_token

CONFIG = LlamaConfig(
    hidden_size=16, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3, vocab_size=32
)
HEADS, DIM = 2, 4


def cache() -> SlotKVCache:
    return SlotKVCache(CONFIG, "cpu", torch.float32)


def states(tokens: int, value: float, rows: int = 1) -> torch.Tensor:
    """Key states whose every entry names the token: value + index / 100."""
    per_token = value + torch.arange(tokens, dtype=torch.float32) / 100
    return per_token[None, None, :, None].expand(rows, HEADS, tokens, DIM).clone()


def prefill(kv: SlotKVCache, row: int, tokens: int, value: float, start: int = 0):
    """Writes `tokens` cells of `row` from column `start`; returns what attention gets (the buffers)."""
    kv.reserve(row + 1, start + tokens)
    kv.packed_step(torch.full((tokens,), row), torch.arange(start, start + tokens))
    # A forward pass updates every layer; the first layer's view is what the test looks at.
    updated = [kv.update(states(tokens, value), states(tokens, -value), layer) for layer in range(3)]
    return updated[0]


def test_bytes_per_token_counts_keys_and_values_of_every_layer():
    assert bytes_per_token(CONFIG, torch.float32) == 2 * 3 * HEADS * DIM * 4
    assert bytes_per_token(CONFIG, torch.bfloat16) == 2 * 3 * HEADS * DIM * 2


def test_packed_prefill_writes_each_token_into_its_own_row():
    kv = cache()
    keys, values = prefill(kv, row=0, tokens=3, value=1.0)
    assert keys.data_ptr() == kv.layers[0].keys.data_ptr()  # the buffer itself: attention picks the rows
    assert torch.equal(keys[0, :, :3], states(3, 1.0)[0]) and torch.equal(
        values[0, :, :3], states(3, -1.0)[0]
    )
    keys, _ = prefill(kv, row=1, tokens=2, value=2.0)
    assert torch.equal(keys[1, :, :2], states(2, 2.0)[0])
    assert torch.equal(keys[0, :, :3], states(3, 1.0)[0])  # row 0 untouched by row 1's prefill


def test_a_prompt_in_chunks_continues_where_the_last_chunk_ended():
    kv = cache()
    prefill(kv, row=0, tokens=2, value=1.0)
    keys, _ = prefill(kv, row=0, tokens=2, value=5.0, start=2)
    assert torch.equal(keys[0, :, :2], states(2, 1.0)[0]) and torch.equal(keys[0, :, 2:4], states(2, 5.0)[0])


def test_a_decode_step_appends_one_column_per_row_at_its_own_length():
    kv = cache()
    prefill(kv, row=0, tokens=3, value=1.0)
    prefill(kv, row=1, tokens=1, value=2.0)
    kv.dense_step(torch.tensor([3, 1]), kv_length=4)
    new = torch.stack([states(1, 7.0)[0], states(1, 8.0)[0]])
    keys, _ = kv.update(new, -new, 0)
    assert keys.shape == (2, HEADS, 4, DIM)
    assert torch.equal(keys[0, :, 3], new[0, :, 0]) and torch.equal(keys[1, :, 1], new[1, :, 0])
    assert torch.equal(keys[0, :, :3], states(3, 1.0)[0])
    assert keys.data_ptr() == kv.layers[0].keys.data_ptr()  # a view of the buffer, not a copy


def test_growing_keeps_the_content_and_rows_grow_in_powers_of_two():
    kv = cache()
    prefill(kv, row=0, tokens=3, value=1.0)
    kv.reserve(3, 300)
    assert kv.capacity == (4, 512)
    assert torch.equal(kv.layers[2].keys[0, :, :3], states(3, 1.0)[0])


def test_moving_and_swapping_rows_carry_their_cells():
    kv = cache()
    prefill(kv, row=0, tokens=2, value=1.0)
    prefill(kv, row=1, tokens=2, value=2.0)
    kv.swap_rows(0, 1, 2)
    assert torch.equal(kv.layers[1].keys[0, :, :2], states(2, 2.0)[0])
    assert torch.equal(kv.layers[1].values[1, :, :2], states(2, -1.0)[0])
    kv.move_row(1, 0, 2)
    assert torch.equal(kv.layers[1].keys[0, :, :2], states(2, 1.0)[0])


def test_shrinking_frees_memory_only_well_below_capacity():
    kv = cache()
    kv.reserve(8, 600)
    assert kv.capacity == (8, 768)
    kv.shrink(5, 500)  # still more than half used
    assert kv.capacity == (8, 768)
    prefill(kv, row=0, tokens=3, value=1.0)
    kv.shrink(1, 3)
    assert kv.capacity == (1, 256)
    assert torch.equal(kv.layers[0].keys[0, :, :3], states(3, 1.0)[0])
    kv.shrink(0, 0)
    assert kv.capacity == (0, 0)


def test_growth_rounds_up_only_within_the_token_limit():
    # 17 rows × 1,984 columns fit the limit; rounded up (32 × 2,048) they would take twice that.
    kv = SlotKVCache(CONFIG, "cpu", torch.float32, token_limit=17 * 1984)
    prefill(kv, row=0, tokens=3, value=1.0)
    kv.reserve(17, 1984)
    assert kv.capacity == (17, 1984)
    assert torch.equal(kv.layers[1].keys[0, :, :3], states(3, 1.0)[0])
    kv.reserve(9, 1000)  # held already
    assert kv.capacity == (17, 1984)
