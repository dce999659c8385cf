"""CPU inference with prepacked weights: a model's nn.Linear layers swapped for PackedLinear,
which holds the weight in oneDNN's blocked layout, reordered once at load, and multiplies with
oneDNN's linear kernel.

Why: torch's CPU nn.Linear calls MKL's sgemm, which streams a 1-token forward as matrix-vector
products and, for 2 or more tokens, repacks the whole weight matrix on every call. On the 2-core
machines here (SmolLM2-135M fp32, 2 threads, 200 cached tokens, median of 9 forwards) a forward
of 1 / 2 / 4 / 16 new tokens took 39.5 / 64.9 / 54.1 / 61.7 ms plain and 18.2 / 20.4 / 23.3 /
31.0 ms packed: autoregressive decoding about 2x faster, and a window of 2 or 4 about 1.1-1.3x a
1-token forward instead of 1.4-1.6x, which is what Jacobi decoding pays for its guesses. Logits
differ from the plain ones by float rounding only (max |diff| ~1e-4 there, argmax equal).

Inference only: a PackedLinear has no weight parameter and no backward, so training loads its
models unpacked; the batched engine's compiled step (the worker's --compile) freezes and
prepacks the weights itself and does not need this.
"""
from __future__ import annotations

import torch
from torch import nn

PACK_ROWS = 16      # the row count oneDNN's reorder is tuned for (1-64 measured: 16 was best)
DTYPES = (torch.float32, torch.bfloat16)


def packable(model: nn.Module) -> str | None:
    """None when `model` can be packed, else why not (one line)."""
    weight = next(model.parameters(), None)
    if weight is None or weight.device.type != "cpu":
        return "not on the CPU"
    if weight.dtype not in DTYPES:
        return f"{weight.dtype} (packing takes float32 or bfloat16)"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN (mkldnn)"
    return None


class PackedLinear(nn.Module):
    """y = x W^T + b with W prepacked for oneDNN: [..., in_features] -> [..., out_features]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(),
                                                                  PACK_ROWS)
            self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)                       # [N, in]
        if flat.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a CPU model for a PackedLinear, in place; the number swapped.
    ValueError when the model cannot be packed (`packable`). A weight tied to another module
    (SmolLM2's lm_head and embeddings) stays where it is tied and gains a packed copy."""
    why = packable(model)
    if why is not None:
        raise ValueError(f"cannot pack the model's linear layers: {why}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    return swapped


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def pack_for_inference(model: nn.Module) -> nn.Module:
    """`model` packed where `packable` allows (on the CPU, float32/bfloat16), else unchanged."""
    if packable(model) is None:
        pack_linears(model)
    return model
