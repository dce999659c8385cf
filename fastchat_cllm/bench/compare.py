"""`--compare-stock-worker`: the serving benchmark on our worker, then on FastChat's stock
`model_worker`, each behind a stack of its own.

Each side gets a fresh stack on free loopback ports (serving/stack.py: FastChat's stock
controller, the worker, our API server), made ready as `python -m fastchat_cllm.serve` does;
then the serving mode's load (serving.py) runs at every concurrency level and the stack stops.
Both workers load the same Hugging Face folder (a GGUF file or LoRA folder, the default SmolLM2
included, is first saved as one: the stock loader reads no other) under the same served name,
device and dtype, and format prompts alike (serving/stock_worker.py). Completion tokens are
counted with the model's tokenizer on both sides: the stock worker's usage counts one token
fewer when it stops at max_tokens.
"""
from __future__ import annotations

import os
import sys
import tempfile
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import loading
from .prompts import Prompt
from .serving import ServingConfig, run_serving

# side -> the worker module its stack starts
WORKERS = {"fastchat-cllm": "fastchat_cllm.worker", "stock": "fastchat_cllm.stock_worker"}
LOGDIR = Path(tempfile.gettempdir()) / "fastchat-cllm-compare-logs"


@dataclass(frozen=True)
class CompareConfig:
    model: str | None = None               # path or alias; None: the embedded SmolLM2
    concurrency: tuple[int, ...] = (1, 4, 16)
    max_new_tokens: int = 128
    requests_per_stream: int = 1
    timeout: float = 600.0                 # seconds per request
    device: str = "cpu"
    dtype: str = "float32"
    worker_concurrency: int | None = None  # both workers' --limit-worker-concurrency (None: own)
    logdir: str = str(LOGDIR)              # each side logs to logdir/<side>/
    distinct: bool = True                  # ServingConfig.distinct

    def __post_init__(self):
        self.serving("http://127.0.0.1/v1", "x")          # its checks
        if self.worker_concurrency is not None and self.worker_concurrency < 1:
            raise ValueError(f"worker concurrency must be >= 1, got {self.worker_concurrency}")

    def serving(self, url: str, name: str) -> ServingConfig:
        return ServingConfig(url, name, self.concurrency, self.max_new_tokens,
                             self.requests_per_stream, self.timeout, usage=False,
                             distinct=self.distinct)

    def worker_flags(self, name: str) -> list[str]:
        flags = ["--model-names", name, "--device", self.device, "--dtype", self.dtype]
        if self.worker_concurrency is not None:
            flags += ["--limit-worker-concurrency", str(self.worker_concurrency)]
        return flags

    def as_dict(self) -> dict:
        return {**asdict(self), "concurrency": list(self.concurrency), "workers": WORKERS}


def served_name(model: str | None) -> str:
    """The name both workers serve: the alias, or the file or folder name (no .gguf)."""
    if not model:
        return loading.DEFAULT_MODEL
    name = os.path.basename(os.path.normpath(model))
    return name[: -len(".gguf")] if name.endswith(".gguf") else name


def hf_folder(model: str | None, into: Path) -> str:
    """`model` itself when the stock loader can read it (a Hugging Face folder or hub id), else
    our loader's model (GGUF dequantized, LoRA merged) saved in fp32 under `into`."""
    source = loading.resolve(model)
    if source.gguf_file is None and source.lora_config is None:
        return str(model)
    import torch

    print(f"saving {model or 'the default model'} as a Hugging Face folder ...", file=sys.stderr)
    weights, tokenizer = loading.load(model, dtype=torch.float32)
    folder = into / served_name(model)
    plain_copy(weights).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def plain_copy(model):
    """The same weights in a model of the same class without the loader's quantization record
    (transformers refuses to save a GGUF-loaded model, and its config would make every loader
    read the folder as GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(settings),
                                             dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


def run_side(side: str, folder: str, config: CompareConfig, prompts: list[Prompt],
             tokenizer) -> dict:
    """Start the side's stack, measure every level through its API server, stop it."""
    from ..serving.stack import Stack, free_ports, parse

    controller, worker, api = free_ports(3)
    name = served_name(config.model)
    args, worker_args = parse(["--model-path", folder, "--controller-port", str(controller),
                               "--worker-port", str(worker), "--api-port", str(api),
                               "--logdir", str(Path(config.logdir) / side),
                               *config.worker_flags(name)])
    stack = Stack(args, worker_args, WORKERS[side])
    try:
        with redirect_stdout(sys.stderr):       # stdout carries the tables
            stack.up()
        result = run_serving(config.serving(stack.api, name), prompts, tokenizer)
    finally:
        with redirect_stdout(sys.stderr):
            stack.down()
    return {"worker": WORKERS[side], "logdir": str(stack.logdir), **result}


def run_compare(config: CompareConfig, prompts: list[Prompt]) -> dict:
    """Both sides in turn (ours first); returns {"model", "saved_as_hf_folder", "workers"}
    (JSON-ready; per side: the worker module, its logs, the served name and the levels)."""
    with tempfile.TemporaryDirectory(prefix="fastchat-cllm-compare-") as tmp:
        folder = hf_folder(config.model, Path(tmp))
        tokenizer = loading.load_tokenizer(loading.resolve(folder))
        sides = {side: run_side(side, folder, config, prompts, tokenizer) for side in WORKERS}
    return {"model": config.model or loading.DEFAULT_MODEL,
            "saved_as_hf_folder": folder != str(config.model), "workers": sides}
