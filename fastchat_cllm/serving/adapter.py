"""The FastChat model adapter for CLLMs and for whatever --model-path the Jacobi worker serves.

FastChat appends adapters after its catch-all and picks the first that matches (basename
first, then the full path), so `install` puts this one at the front and clears the lookup cache.
"""
from __future__ import annotations

import logging
import os

from fastchat.model import model_adapter as fc
from fastchat.model.model_adapter import BaseModelAdapter

from .. import loading
from .templates import chat_format_template, cllm_template, is_cllm

log = logging.getLogger(__name__)

# from_pretrained kwargs FastChat's load_model sends for modes the Jacobi engine cannot run.
QUANTIZED = ("load_in_8bit", "quantization_config")


class CllmAdapter(BaseModelAdapter):
    """Loads HF folders or hub ids, .gguf files (or folders holding one), LoRA adapter folders
    and the default SmolLM2 alias; prompt format per checkpoint or from the tokenizer."""

    claimed: set[str] = set()                # --model-path values the Jacobi worker serves
    tokenizers: dict[str, object] = {}       # model_path -> tokenizer loaded with the model

    @classmethod
    def claim(cls, model_path: str) -> None:
        """Match `model_path` (and its basename) from now on, whatever it is called."""
        cls.claimed |= {model_path, os.path.basename(os.path.normpath(model_path))}
        fc.get_model_adapter.cache_clear()

    def match(self, model_path: str) -> bool:
        lower = model_path.lower()
        return (is_cllm(lower) or lower == loading.DEFAULT_MODEL or lower.endswith(".gguf")
                or model_path in self.claimed)

    def load_model(self, model_path: str, from_pretrained_kwargs: dict):
        kwargs = dict(from_pretrained_kwargs)
        refused = [key for key in QUANTIZED if kwargs.get(key)]
        if refused:
            raise ValueError(f"fastchat-cllm cannot load {model_path} with {refused}: the Jacobi "
                             f"engine runs full-precision transformers weights (drop --load-8bit)")
        dtype = kwargs.pop("torch_dtype", None)
        source = loading.resolve(model_path)
        model = loading.load_model(source, dtype, "cpu", **kwargs)   # FastChat moves it after
        tokenizer = loading.load_tokenizer(source, **_hub_kwargs(kwargs))
        self.tokenizers[model_path] = tokenizer
        return model, tokenizer

    def get_default_conv_template(self, model_path: str):
        conv = cllm_template(model_path)
        if conv is None:
            tokenizer = self._tokenizer(model_path)
            conv = chat_format_template(tokenizer) if tokenizer is not None else None
        return conv if conv is not None else stock_template(model_path)

    def _tokenizer(self, model_path: str):
        if model_path in self.tokenizers:
            return self.tokenizers[model_path]
        try:
            tokenizer = loading.load_tokenizer(loading.resolve(model_path))
        except (OSError, ValueError) as e:
            log.warning("no tokenizer for %s (%s): using FastChat's template for it", model_path, e)
            return None
        self.tokenizers[model_path] = tokenizer
        return tokenizer


def _hub_kwargs(kwargs: dict) -> dict:
    return {"revision": kwargs["revision"]} if kwargs.get("revision") not in (None, "main") else {}


def stock_template(model_path: str):
    """The template FastChat itself would pick for `model_path` (our adapter left out)."""
    basename = os.path.basename(os.path.normpath(model_path))
    for name in (basename, model_path):
        for adapter in fc.model_adapters:
            if isinstance(adapter, CllmAdapter) or type(adapter) is BaseModelAdapter:
                continue
            if adapter.match(name):
                return adapter.get_default_conv_template(model_path)
    return BaseModelAdapter().get_default_conv_template(model_path)


def install() -> None:
    """Put the adapter first in FastChat's list (once) and forget cached lookups."""
    if not any(isinstance(a, CllmAdapter) for a in fc.model_adapters):
        fc.model_adapters.insert(0, CllmAdapter())
    fc.get_model_adapter.cache_clear()
