"""Linear layers packed once for oneDNN: the same products as nn.Linear, each row rounded the same way
whatever the number of rows (from two on), and the chat model loaded on the CPU uses them."""

import os
import pathlib

import pytest
import torch
from torch import nn

from services.inference.engine import CHAT_MODEL_ID, load_chat_model
from services.inference.packed_linear import PackedLinear, can_pack, pack_linear_layers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not can_pack("cpu", torch.float32), reason="torch built without oneDNN")


def linear(inputs: int, outputs: int, bias: bool) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(inputs, outputs, bias=bias).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_computes_what_the_plain_one_does_for_any_leading_shape(bias):
    plain = linear(576, 1536, bias)
    packed = PackedLinear(plain)
    inputs = torch.randn(3, 7, 576)
    with torch.inference_mode():
        expected, got = plain(inputs), packed(inputs)
    assert got.shape == (3, 7, 1536)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("inputs", "outputs"), [(576, 576), (576, 1536), (1536, 576), (576, 49152)])
def test_each_row_is_rounded_alike_for_any_number_of_rows_from_two(inputs, outputs):
    packed = PackedLinear(linear(inputs, outputs, bias=False))
    rows = torch.randn(40, inputs)
    with torch.inference_mode():
        everything = packed(rows)
        for count in (2, 3, 4, 5, 12, 13, 16, 17, 32):
            assert torch.equal(packed(rows[:count]), everything[:count]), count


def test_every_linear_layer_is_replaced_and_the_rest_kept():
    inner = nn.Sequential(linear(16, 4, bias=False))
    model = nn.Sequential(linear(8, 16, bias=True), nn.ReLU(), inner, nn.LayerNorm(4))
    inputs = torch.randn(5, 8)
    with torch.inference_mode():
        expected = model(inputs)
        assert pack_linear_layers(model) == 2
        got = model(inputs)
    layers = [type(m) for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]
    assert layers == [PackedLinear, PackedLinear]
    assert isinstance(model[3], nn.LayerNorm)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_chat_model_loads_packed_on_the_cpu_unless_told_not_to():
    weights_dir = pathlib.Path(os.environ.get("SOPHIA_WEIGHTS_DIR") or REPO_ROOT / "var" / "models")
    packed = load_chat_model(CHAT_MODEL_ID, weights_dir, device="cpu")
    plain = load_chat_model(CHAT_MODEL_ID, weights_dir, device="cpu", cpu_packed_weights=False)
    kinds = {type(m) for m in packed.model.modules()}
    assert PackedLinear in kinds and nn.Linear not in kinds
    assert PackedLinear not in {type(m) for m in plain.model.modules()}
    prompt = torch.tensor([packed.prompt_token_ids([{"role": "user", "content": "Name three colours."}])])
    with torch.inference_mode():
        torch.testing.assert_close(
            packed.model(input_ids=prompt).logits, plain.model(input_ids=prompt).logits, rtol=1e-4, atol=1e-4
        )
