"""Linear layers that read a GGUF file's quantized weights as stored, on the CPU.

A model loaded from a GGUF file by transformers holds every weight dequantized to float32: a
forward of SmolLM2-135M then reads 540 MB where the file holds 96 MB. `keep_quantized` swaps
each nn.Linear whose weight the file stores in a type the kernel runs (Q4_0, Q4_1, Q8_0) for a
GGUFLinear holding the file's blocks, bytes as they are, and a forward multiplies them with
float32 activations and float32 accumulation (kernels/gguf_linear.cpp, built for this CPU at
first use: cpu_kernels.py). Each weight is exactly its dequantized float32 value; the sums are
taken as d * sum(q x) + m * sum(x) per block, so results differ from the float32 path's by
float rounding only. A weight of any other type stays dequantized, named in one
log line. Each swap is checked: the blocks, dequantized, must equal the layer's weight bit for
bit (after the row order transformers gives Llama's q/k projections), else the layer stays.

A GGUFLinear may carry a LoRA delta in full precision (`add_lora`): y = x W^T + s (x A^T) B^T,
the shipped CLLM's adapter on the quantized base, never re-quantized.

Inference only, like packed_linear: no backward, no state_dict, no other dtype or device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import cpu_kernels

log = logging.getLogger(__name__)

BLOCK = 32                                   # weights per block in every type the kernel runs
KERNEL_TYPES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}       # bytes per block of each


def split_blocks(blocks: np.ndarray, qtype: str, in_features: int):
    """A GGUF tensor's blocks [N, in/32 * bytes] (uint8) -> (qs, d, m) as GGUFLinear holds
    them; m is None for Q8_0 (Q4_0's is -8 d: w = (q - 8) d)."""
    rows, per_row = blocks.shape[0], in_features // BLOCK
    raw = np.ascontiguousarray(blocks).reshape(rows, per_row, KERNEL_TYPES[qtype])
    scale = lambda at: torch.from_numpy(
        raw[:, :, at: at + 2].copy().view(np.float16).reshape(rows, per_row).astype(np.float32))
    if qtype == "Q8_0":
        qs = torch.from_numpy(raw[:, :, 2:].copy().view(np.int8).reshape(rows, in_features))
        return qs, scale(0), None
    first = 4 if qtype == "Q4_1" else 2
    qs = torch.from_numpy(raw[:, :, first:].copy().reshape(rows, in_features // 2))
    d = scale(0)
    return qs, d, scale(2) if qtype == "Q4_1" else -8 * d


class GGUFLinear(nn.Module):
    """y = x W^T (+ bias) (+ LoRA) with W as a GGUF file's blocks: [..., in] -> [..., out].
    Held as the kernel reads them: the quants as stored (qs), the blocks' scales (d) and for
    Q4_0/Q4_1 their minimums (m) as float32 [out, in/32] (the file's fp16, converted exactly)."""

    def __init__(self, blocks: np.ndarray, qtype: str, in_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if qtype not in KERNEL_TYPES:
            raise ValueError(f"the GGUF kernel does not run {qtype}")
        self.in_features, self.out_features = in_features, blocks.shape[0]
        self.qtype = qtype
        qs, d, m = split_blocks(blocks, qtype, in_features)
        self.register_buffer("qs", qs, persistent=False)
        self.register_buffer("d", d, persistent=False)
        self.register_buffer("m", m, persistent=False)
        self.bias = bias
        self.lora: tuple[torch.Tensor, torch.Tensor] | None = None   # A, s B^T

    def add_lora(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        """A low-rank delta s * B A (a [r, in], b [out, r], float32), applied unmerged."""
        self.lora = (a.detach().float().contiguous(),                          # [r, in]
                     (b.detach().float() * float(scale)).T.contiguous())      # [r, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            raise ValueError(f"a GGUF linear layer takes float32 input, got {x.dtype}")
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("a GGUF linear layer has no backward: load the model without "
                               "keep_quantized for training")
        flat = x.reshape(-1, self.in_features)                              # [N, in]
        if self.m is None:
            y = torch.ops.fastchat_cllm_cpu.q8_linear(flat, self.qs, self.d)
        else:
            y = torch.ops.fastchat_cllm_cpu.q4_linear(flat, self.qs, self.d, self.m)
        if self.lora is not None:      # row by row, as the kernel: a row's delta does not
            a, b = self.lora           # depend on the rows beside it
            y = y + torch.ops.fastchat_cllm_cpu.low_rank(flat, a, b)                # [N, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)                  # [..., out]

    @property
    def nbytes(self) -> int:
        """Bytes a forward reads of this layer's weight."""
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m)
                   if t is not None)

    def _apply(self, fn, recurse=True):
        probe = fn(torch.empty(0))
        if probe.dtype != torch.float32 or probe.device.type != "cpu":
            raise ValueError("a model on GGUF weights stays on the CPU in float32: load it "
                             "again without keep_quantized to move or convert it")
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        raise ValueError("a model on GGUF weights has no state_dict: load it without "
                         "keep_quantized to save it")

    def extra_repr(self) -> str:
        lora = f", lora rank {self.lora[0].shape[0]}" if self.lora is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.qtype}, bias={self.bias is not None}{lora}")


@dataclass
class Report:
    """What keep_quantized did: layers swapped per type, layers left dequantized (why), bytes."""

    swapped: dict[str, int] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)       # module name -> why
    quantized_bytes: int = 0
    float_bytes: int = 0

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.swapped.items())) or "none"
        return (f"GGUF weights kept quantized: {sum(self.swapped.values())} linear layers "
                f"({types}), {self.quantized_bytes / 2**20:.0f} MiB read per forward where "
                f"float32 read {self.float_bytes / 2**20:.0f} MiB; "
                f"{len(self.kept)} left dequantized")


def refusal(model: nn.Module) -> str | None:
    """None when `model`'s linear layers can run on GGUF blocks here, else why not."""
    weight = next(model.parameters(), None)
    if weight is None:
        return "it has no parameters"
    if weight.device.type != "cpu":
        return f"it is on {weight.device.type}, the kernel runs on the CPU"
    if weight.dtype != torch.float32:
        return f"it is in {weight.dtype}, the kernel takes float32"
    return None


def q_k_rows(name: str, rows: int, config) -> np.ndarray | None:
    """The row order transformers gives a Llama q/k projection loaded from GGUF (llama.cpp
    stores them permuted for its rotary layout): HF row i is file row order[i]. Tried after
    the stored order (other architectures keep it)."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or not name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return None
    n = heads if name.endswith("q_proj") else kv_heads
    dim = rows // n // 2
    return np.arange(rows).reshape(n, dim, 2).swapaxes(2, 1).reshape(rows)


def keep_quantized(model: nn.Module, gguf_path: Path) -> Report:
    """Swap `model`'s nn.Linear layers for GGUFLinear on the file's blocks, in place, where the
    file stores them in KERNEL_TYPES and they check out (see the module docstring). The model
    must be the one transformers loaded from `gguf_path`. Raises KernelError / ValueError when
    nothing can be swapped here (kernel, device, dtype); the model is then unchanged."""
    import gguf

    why = refusal(model)
    if why is not None:
        raise ValueError(f"cannot keep the GGUF weights quantized: {why}")
    cpu_kernels.load()
    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    names = name_map(model, reader)
    report = Report()
    linears = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear]
    for name, module in linears:
        tensor = tensors.get(names(name) + ".weight") if names(name) else None
        if tensor is None and name.endswith("lm_head"):
            tensor = tensors.get("token_embd.weight")      # tied output: the embedding matrix
        report.float_bytes += module.weight.numel() * 4
        layer, why = swap_for(name, module, tensor, model.config)
        if layer is None:
            report.kept[name] = why
            report.quantized_bytes += module.weight.numel() * 4
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        report.swapped[layer.qtype] = report.swapped.get(layer.qtype, 0) + 1
        report.quantized_bytes += layer.nbytes
    model.requires_grad_(False)
    for name, why in report.kept.items():
        log.warning("GGUF layer %s stays dequantized to float32: %s", name, why)
    return report


def name_map(model: nn.Module, reader):
    """module name -> the file's tensor name (without .weight), by gguf's own name table."""
    import gguf

    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        return lambda name: None
    table = gguf.get_tensor_name_map(archs[arch], model.config.num_hidden_layers)
    return lambda name: table.get_name(name)


def swap_for(name: str, module: nn.Linear, tensor, config) -> tuple[GGUFLinear | None, str]:
    """(the GGUFLinear for `module` on `tensor`'s blocks, "") or (None, why not)."""
    import gguf

    if tensor is None:
        return None, "no tensor of the file maps to it"
    qtype = tensor.tensor_type.name
    if qtype not in KERNEL_TYPES:
        return None, f"its type {qtype} has no kernel here"
    out_features, in_features = module.weight.shape
    if in_features % BLOCK:
        return None, f"its shape {tuple(module.weight.shape)} does not fit the kernel"
    blocks = np.asarray(tensor.data)
    if blocks.shape[0] != out_features:
        return None, f"the file's {tensor.name} has {blocks.shape[0]} rows, the layer {out_features}"
    weight = module.weight.detach()
    order = q_k_rows(name, out_features, config)
    for candidate in [blocks] + ([blocks[order]] if order is not None else []):  # llama's q/k
        values = torch.from_numpy(gguf.quants.dequantize(candidate, tensor.tensor_type).copy())
        if torch.equal(values.view_as(weight), weight):
            blocks = candidate
            break
    else:
        return None, f"the file's {tensor.name}, dequantized, is not the layer's weight"
    bias = None if module.bias is None else module.bias.detach().clone()
    return GGUFLinear(blocks, qtype, in_features, bias), ""


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, GGUFLinear) for m in model.modules())


def summary(model: nn.Module) -> str:
    """One line on what a model's linear layers read: GGUF blocks (by type) and float32."""
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    floats = [m for m in model.modules() if isinstance(m, nn.Linear)]
    types: dict[str, int] = {}
    for m in layers:
        types[m.qtype] = types.get(m.qtype, 0) + 1
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
    return (f"{len(layers)} on the GGUF file's blocks ({kinds}, "
            f"{sum(m.nbytes for m in layers) / 2**20:.0f} MiB)"
            + (f", {len(floats)} dequantized" if floats else ""))
