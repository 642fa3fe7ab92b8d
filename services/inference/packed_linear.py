"""Linear layers whose weights are laid out once, at load, in oneDNN's blocked format (CPU, float32).

A plain `nn.Linear` on the CPU calls MKL's sgemm, which copies ("packs") the whole weight matrix into its
blocked layout on every call with more than one row: a decode step of a batch copies every weight before it
multiplies by it. Packed once, the step only reads each weight: measured here on SmolLM2-135M, the
stepping loop's 16 sequences go from 97 to 160-165 tokens/s and a lone thread-per-request generation from
16-17 to 18-19 (docs/inference.md). The same layout also rounds each row the same way whatever the number of
rows from two on, which the batch-invariant padding relies on (batching.py).

The ops are torch's own (`torch.ops.mkldnn`, the ones torch.compile's CPU backend freezes weights into); a
model on a GPU, in another dtype, or on a torch built without oneDNN keeps its plain layers.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN tunes the layout for (a decode step's batch); any count of rows works with it.
_ROWS_HINT = 16


def can_pack(device: str, dtype: torch.dtype) -> bool:
    return device == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """`linear` with its weight in oneDNN's layout. The weight is a copy: a tied one (an output head sharing
    the input embedding's matrix) stays where it is for the embedding."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _ROWS_HINT)
        self._bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        rows = inputs.reshape(-1, self.in_features)
        outputs = torch.ops.mkldnn._linear_pointwise(rows, self._weight, self._bias, "none", [], "")
        return outputs.view(*inputs.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=onednn"


def pack_linear_layers(model: nn.Module) -> int:
    """Replaces every `nn.Linear` of `model` (an inference-only, float32 CPU model) by a PackedLinear;
    returns how many it replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    _own_memory(model)
    return replaced


def _own_memory(model: nn.Module) -> None:
    """Copies what is left of the model out of the weights file. transformers maps the safetensors file
    and the tensors are views of that one mapping: while the embedding (say) still views it, the pages the
    packing read stay resident, the replaced weights' included (measured: 1.45 GB resident instead of
    1.04 GB for SmolLM2-135M)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
