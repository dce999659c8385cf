"""The engine on a CUDA GPU (skipped where none is present)."""
from __future__ import annotations

import pytest
import torch

from conftest import ar_greedy, tiny_model
from fastchat_cllm import jacobi_generate
from fastchat_cllm.loading import attention_implementation

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_cuda_fp32_equals_ar_greedy(arch, block_size):
    model = tiny_model(arch).to("cuda")
    ids = torch.arange(3, 30, device="cuda").reshape(1, -1)
    expected = ar_greedy(model, ids, 48)
    out = jacobi_generate(model, ids, max_new_tokens=48, block_size=block_size)
    assert out.tokens == expected and out.stats.tokens == 48


def test_cuda_half_precision_runs_with_the_chosen_attention():
    implementation = attention_implementation("cuda", torch.bfloat16)
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    model.set_attn_implementation(implementation)
    out = jacobi_generate(model, list(range(3, 20)), max_new_tokens=32, block_size=16)
    assert len(out.tokens) == 32 and out.stats.forwards >= 1
