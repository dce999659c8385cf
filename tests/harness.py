"""What the tests share, one copy each: tiny models and the greedy reference, and for the
serving tests free loopback ports, a stack started and made ready, JSON requests, SSE streams
and worker status. Plain functions; the fixtures built on them live in conftest.py."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from unittest import mock

import requests
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
ARCHITECTURES = ("llama", "qwen2", "mistral")
MODEL = "smollm2-135m-instruct"       # the name the worker serves the default model under
START_TIMEOUT = 600                   # seconds for a stack to load SmolLM2 on a busy CPU


# --- models and references -------------------------------------------------------------------

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


def sharp_tiny_model():
    """A tiny model with confident predictions (a random init is near uniform: KL ~ 0)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def random_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts for the tiny models: BOS and 4-12 random ids."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 96) for _ in range(rng.randint(4, 12))] for _ in range(count)]


def word_tokenizer():
    """A word-level tokenizer for the tiny models: "w5 w6" is [5, 6] (0-3: pad, bos, eos, unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"w{i}": i for i in range(1, 96)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w2",
                                   unk_token="w3", pad_token="<pad>")


def tiny_folder(folder: Path) -> Path:
    """sharp_tiny_model and word_tokenizer saved as a Hugging Face folder."""
    sharp_tiny_model().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def save_adapter(folder: Path, base: str, seed: int = 1) -> Path:
    """A throwaway LoRA (rank 8, random weights) on the tiny Llama, naming `base` as its base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(
        r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = base
    lora.save_pretrained(folder)
    return folder


def save_tiny_model(folder: Path, arch: str = "llama", seed: int = 0, **config) -> Path:
    """tiny_model(arch, seed) with `config` fields changed, and char_tokenizer(), saved as a
    model folder (what --model-path takes); `folder`."""
    model = tiny_model(arch, seed=seed)
    for name, value in config.items():
        setattr(model.config, name, value)
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def ar_greedy(model, ids, max_new_tokens: int, eos=None, bias: dict | None = None) -> list[int]:
    """The reference: transformers' own greedy generate (KV cache), new tokens only; `bias`
    ({token: logit bias}) as single-token sequence_bias."""
    ids = torch.as_tensor(ids).reshape(1, -1).to(model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(eos) if eos else None, pad_token_id=0,
                         attention_mask=torch.ones_like(ids),
                         sequence_bias={(t,): b for t, b in bias.items()} if bias else None)
    return out[0, ids.shape[1]:].tolist()


def tiny_greedy(arch: str, ids, max_new_tokens: int, eos=(), dtype=torch.float32, seed: int = 0,
                bias: dict | None = None) -> list[int]:
    """ar_greedy of an untouched tiny_model(arch, dtype, seed), computed once per argument set."""
    key = tuple(torch.as_tensor(ids).flatten().tolist())
    return list(_tiny_greedy(arch, key, max_new_tokens, tuple(eos or ()), dtype, seed,
                             tuple(sorted((bias or {}).items()))))


@lru_cache(maxsize=None)
def _tiny_greedy(arch, ids, max_new_tokens, eos, dtype, seed, bias) -> tuple[int, ...]:
    model = tiny_model(arch, dtype, seed)
    return tuple(ar_greedy(model, list(ids), max_new_tokens, eos, dict(bias)))


@torch.inference_mode()
def forward_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Raw log_softmax at the positions that predict `tokens`: [n, V] (one full forward)."""
    ids = torch.tensor([prompt + tokens], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    return torch.log_softmax(logits, dim=-1)


def chat_ids(tokenizer, question: str) -> list[int]:
    from fastchat_cllm.chat_prompt import chat_prompt_ids

    return chat_prompt_ids(tokenizer, [{"role": "user", "content": question}])


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def char_tokenizer():
    """A character-level tokenizer with ids in the tiny models' vocabulary (0-2: pad, bos, eos)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = (" \n" + string.ascii_letters + string.digits + string.punctuation)
    vocab = {tok: i for i, tok in enumerate(specials + list(chars[: TINY["vocab_size"] - 4]))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- requests --------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    """`count` different ports free on 127.0.0.1 (all held open while they are picked)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def post_json(url: str, body=None, key: str | None = None, timeout: float = 120,
              **kwargs) -> requests.Response:
    return requests.post(url, json=body, headers=auth(key), timeout=timeout, **kwargs)


def sse_chunks(reply: requests.Response):
    """The JSON object of each `data: {...}` event of a streamed reply, in order."""
    for line in reply.iter_lines():
        if line.startswith(b"data: {"):
            yield json.loads(line[len(b"data: "):])


def worker_status(worker: str) -> dict:
    return requests.post(worker + "/worker_get_status", timeout=10).json()


def wait_idle(worker: str, timeout: float = 60) -> dict:
    """The worker's status once its queue is empty (or when `timeout` seconds have passed)."""
    deadline = time.monotonic() + timeout
    while (now := worker_status(worker))["queue_length"] and time.monotonic() < deadline:
        time.sleep(0.5)
    return now


def listed_models(controller: str) -> list[str]:
    return requests.post(controller + "/list_models", timeout=10).json()["models"]


def wait_for(ready, timeout: float = START_TIMEOUT, what: str = "ready", check=lambda: None):
    """ready()'s first true value, asked every 0.5 s; a request error counts as not yet, and
    check() (which raises when a watched process died) runs before each try."""
    deadline, last = time.monotonic() + timeout, None
    while True:
        check()
        try:
            if value := ready():
                return value
            last = getattr(value, "text", value)        # a refused reply: its body
        except requests.RequestException as error:
            last = error
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s (last: {last!r})"
        time.sleep(0.5)


def wait_serving(controller: str, api: str, key: str | None = None, check=lambda: None,
                 model: str = MODEL) -> None:
    """Ready means the controller lists `model` and a one-token completion through the API
    answers, not just that the ports answer."""
    wait_for(lambda: listed_models(controller) == [model], what=f"the controller lists {model}",
             check=check)
    body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    wait_for(lambda: post_json(api + "/completions", body, key),
             what="a one-token completion answers", check=check)


# --- processes and stacks -------------------------------------------------------------------

def spawn(log: Path, module: str, *flags: str) -> subprocess.Popen:
    """`python -m module FLAGS`, its stdout and stderr written to `log`."""
    with open(log, "w") as out:                  # the child keeps its own handle
        return subprocess.Popen([sys.executable, "-m", module, *flags], stdout=out,
                                stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL if the process has not exited after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


class Serve:
    """`python -m fastchat_cllm.serve FLAGS` on free loopback ports; a thread per pipe collects
    its stdout and stderr lines."""

    READY = "Ctrl-C stops everything."

    def __init__(self, folder: Path, *flags: str, web: bool = False):
        names = ("controller", "worker", "api", "web") if web else ("controller", "worker", "api")
        ports = dict(zip(names, free_ports(len(names))))
        url = {n: f"http://127.0.0.1:{port}" for n, port in ports.items()}
        self.controller, self.worker, self.web = url["controller"], url["worker"], url.get("web")
        self.api = url["api"] + "/v1"
        self.logdir = folder / "logs"
        argv = [sys.executable, "-m", "fastchat_cllm.serve", *flags, "--logdir", str(self.logdir),
                *(a for n in names for a in (f"--{n}-port", str(ports[n])))]
        argv += ["--web"] if web else []
        self.process = subprocess.Popen(argv, cwd=folder, text=True, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.lines: list[str] = []            # stdout
        self.errors: list[str] = []           # stderr
        self.readers = [threading.Thread(target=self._read, args=pipe, daemon=True) for pipe in
                        ((self.process.stdout, self.lines), (self.process.stderr, self.errors))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines + self.errors)

    def check_alive(self) -> None:
        assert self.process.poll() is None, f"serve exited with code {self.process.returncode}"

    @contextmanager
    def explained(self):
        """An assertion failing inside shows serve's output."""
        try:
            yield
        except AssertionError as error:
            raise AssertionError(f"{error}\nserve's output:\n{self.output()}") from None

    def wait_ready(self) -> None:
        with self.explained():
            wait_for(lambda: self.READY in self.lines, what="serve says it is ready",
                     check=self.check_alive)
            wait_serving(self.controller, self.api, check=self.check_alive)

    def wait(self, timeout: float = 60) -> int:
        """The exit code, once serve has exited and both pipes are read to the end."""
        code = self.process.wait(timeout)
        for reader in self.readers:
            reader.join(10)
        return code

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def close(self) -> None:
        """Stop serve if it still runs (SIGTERM, then SIGKILL after a minute)."""
        stop(self.process)
        self.wait()

    def log(self, name: str) -> str:
        """What the child `name` (controller, worker, api, web) wrote to its log."""
        return (self.logdir / f"{name}.log").read_text(errors="replace")


def start_stack(logdir: Path, *flags: str, key: str | None = None, env: dict | None = None,
                model: str = MODEL):
    """The launcher's Stack in this process (controller, worker, API server) on free ports,
    started with `env` added to the environment and ready as wait_serving says (serving
    `model`: the name of the --model-path in `flags`, SmolLM2's by default)."""
    from fastchat_cllm.serving.stack import Stack, parse

    controller, worker, api = free_ports(3)
    keys = ("--api-keys", key) if key else ()
    args, worker_args = parse(["--controller-port", str(controller), "--worker-port", str(worker),
                               "--api-port", str(api), "--logdir", str(logdir), *keys, *flags])
    stack = Stack(args, worker_args)
    try:
        with mock.patch.dict(os.environ, env or {}):
            stack.up()
        wait_serving(stack.controller, stack.api, key, check=stack.check_alive, model=model)
    except BaseException:
        stack.down()
        raise
    return stack


# --- sampling laws ---------------------------------------------------------------------------
# The exact autoregressive law of a tiny model's first tokens, and seeded Jacobi samples to fit
# against it (test_sampling_distribution.py, test_logit_bias.py).

SETTINGS = dict(temperature=0.7, top_p=0.5, top_k=3, repetition_penalty=1.2)
NEW_TOKENS, SAMPLES = 4, 3000
PROMPT = [3, 7, 4, 9, 3, 7, 4]


def hf_processors(s: dict):
    """transformers' own processors in FastChat's order."""
    from transformers.generation.logits_process import (LogitsProcessorList,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    return LogitsProcessorList([TemperatureLogitsWarper(s["temperature"]),
                                RepetitionPenaltyLogitsProcessor(s["repetition_penalty"]),
                                TopPLogitsWarper(s["top_p"]), TopKLogitsWarper(s["top_k"])])


@torch.inference_mode()
def ar_distribution(model, prompt: list[int], steps: int, processors) -> dict[tuple, float]:
    """Exact law of the first `steps` tokens under autoregressive sampling (full forwards)."""
    law = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for seq, prob in law.items():
            ids = torch.tensor([prompt + list(seq)])
            scores = processors(ids, model(input_ids=ids).logits[:, -1, :].float())
            probs = scores.softmax(-1)[0].double()
            for tok in probs.nonzero()[:, 0].tolist():
                grown[seq + (tok,)] = prob * float(probs[tok])
        law = grown
    return law


def chi_square_p(counts: dict[tuple, int], law: dict[tuple, float], total: int) -> float:
    """Goodness-of-fit p-value; outcomes expected fewer than 5 times are pooled into one cell."""
    observed, expected, pooled_o, pooled_e = [], [], 0, 0.0
    for seq, prob in law.items():
        if prob * total >= 5:
            observed.append(counts.get(seq, 0))
            expected.append(prob * total)
        else:
            pooled_o, pooled_e = pooled_o + counts.get(seq, 0), pooled_e + prob * total
    pooled_o += sum(n for seq, n in counts.items() if seq not in law)   # impossible outcomes
    if pooled_e > 0 or pooled_o:
        observed.append(pooled_o)
        expected.append(max(pooled_e, 1e-9))
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    statistic = float(((o - e) ** 2 / e).sum())
    df = torch.tensor((len(observed) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, torch.tensor(statistic / 2, dtype=torch.float64)))


def jacobi_samples(model, acceptance: str, settings: dict = SETTINGS, samples: int = SAMPLES,
                   new_tokens: int = NEW_TOKENS) -> tuple[dict[tuple, int], int, int]:
    """Outcome counts of `samples` seeded runs; also guesses accepted and rejected in all."""
    from fastchat_cllm import jacobi_stream

    counts: dict[tuple, int] = {}
    accepted = rejected = 0
    for seed in range(samples):
        tokens = []
        for step in jacobi_stream(model, PROMPT, max_new_tokens=new_tokens, window_size=4,
                                  adaptive=False, seed=seed, acceptance=acceptance, **settings):
            tokens += step.tokens
            if step.window:
                accepted += step.accepted - 1
                rejected += step.accepted < len(step.window)
        counts[tuple(tokens)] = counts.get(tuple(tokens), 0) + 1
    return counts, accepted, rejected


def peaked_model():
    """A tiny Llama with a 12-token vocabulary and a scaled-up output head (peaked
    distributions, so top-p bites)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": 12}, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model
