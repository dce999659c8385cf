"""CPU inference with prepacked weights: a model's nn.Linear layers swapped for PackedLinear,
which holds the weight in oneDNN's blocked layout, reordered once at load, and multiplies with
oneDNN's linear kernel.

Why: torch's CPU nn.Linear calls MKL's sgemm, which streams a 1-token forward as matrix-vector
products and, for 2 or more tokens, repacks the whole weight matrix on every call. Packed, a
forward of SmolLM2 fp32 on the 2-core machines here runs about 2x faster, and a window of a few
tokens costs little more than one token, which is what Jacobi decoding pays for its guesses
(measurements: docs/prepacked-weights.md). Logits differ from the plain ones by float rounding.

Inference only: a packed model's parameters are frozen, a PackedLinear has no weight parameter,
no backward, no state_dict and no other dtype or device, and each refuses with a clear error.
Training loads its models unpacked; the batched engine's compiled step (the worker's --compile)
freezes and prepacks the weights itself and takes an unpacked model.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACK_ROWS = 16      # the row count oneDNN's reorder is tuned for (of 1, 4, 16, 64: 16 was best)
DTYPES = (torch.float32, torch.bfloat16)


def refusal(device, dtype) -> str | None:
    """None when a model on `device` in `dtype` can be packed, else why not (one line)."""
    if torch.device(device).type != "cpu":
        return "not on the CPU"
    if dtype not in DTYPES:
        return f"{dtype} (packing takes float32 or bfloat16)"
    if not torch.backends.mkldnn.is_available():
        return "this torch has no oneDNN (mkldnn)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no oneDNN bfloat16 kernels"
    return None


def packable(model: nn.Module) -> str | None:
    """None when `model` can be packed, else why not."""
    weight = next(model.parameters(), None)
    return "it has no parameters" if weight is None else refusal(weight.device, weight.dtype)


class PackedLinear(nn.Module):
    """y = x W^T + b with W prepacked for oneDNN: [..., in_features] -> [..., out_features]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        why = refusal(weight.device, weight.dtype)
        if why is not None:
            raise ValueError(f"cannot pack a linear layer: {why}")
        self.dtype = weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise ValueError(f"a {self.dtype} packed linear layer got {x.dtype} input")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a packed linear layer has no backward: load the model "
                               "without pack for training")
        flat = x.reshape(-1, self.in_features)                       # [N, in]
        if flat.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], self.out_features)
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)           # [..., out]

    def _apply(self, fn, recurse=True):
        """.to()/.float()/.cuda(): only what leaves a CPU tensor of this dtype as it is."""
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.dtype != self.dtype or probe.device.type != "cpu":
            raise ValueError(f"a packed model stays on the CPU in {self.dtype}: load it again "
                             f"without pack to move or convert it")
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise ValueError("a packed model has no state_dict: save the model loaded without pack")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.dtype}")


def pack_linears(model: nn.Module) -> int:
    """Freeze `model` and swap every nn.Linear of it for a PackedLinear, in place (a layer kept
    in another dtype stays as it is); the number swapped. ValueError when it cannot be packed
    (`packable`), or when oneDNN refuses its first layer (then nothing is swapped). A weight
    tied to another module (SmolLM2's lm_head and embeddings) stays where it is tied and gains
    a packed copy."""
    why = packable(model)
    if why is not None:
        raise ValueError(f"cannot pack the model's linear layers: {why}")
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and not refusal(child.weight.device, child.weight.dtype)]
    for i, (parent, name, child) in enumerate(swaps):     # the first one probed
        setattr(parent, name, PackedLinear(child) if i else probed(child))
    model.requires_grad_(False)
    return len(swaps)


def probed(linear: nn.Linear) -> PackedLinear:
    """`linear` packed and run once on a zero row; ValueError when oneDNN refuses it."""
    try:
        layer = PackedLinear(linear)
        with torch.inference_mode():
            layer(torch.zeros(1, linear.in_features, dtype=linear.weight.dtype))
    except (RuntimeError, AttributeError) as e:      # AttributeError: no such op here
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot pack the model's linear layers: oneDNN refused: "
                         f"{first_line}") from e
    return layer


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())


def pack_for_inference(model: nn.Module) -> nn.Module:
    """`model` packed where `packable` allows (on the CPU, float32/bfloat16), else unchanged;
    where oneDNN refuses it, unchanged with a warning (torch's nn.Linear still works)."""
    if packable(model) is None:
        try:
            pack_linears(model)
        except ValueError as e:
            log.warning("%s; running torch's nn.Linear instead", e)
    return model
