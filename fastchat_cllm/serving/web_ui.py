"""What the stock web UI needs to show a Jacobi worker's models well, without forking it:
- each model's conversation template from the worker that serves it (FastChat's UI guesses it
  from the name in its own process; the API server already asks the worker);
- under each answer, a line with its tokens per forward and tokens/s (from the usage the worker
  sends with every chunk);
- a real description in the model list instead of FastChat's "Register the description" note.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import requests
from fastchat.conversation import Conversation, SeparatorStyle
from fastchat.model.model_registry import get_model_info, register_model_info

from ..core.stats import tokens_per_forward

log = logging.getLogger(__name__)

LINK = "https://github.com/hao-ai-lab/Consistency_LLM"
DESCRIPTION = ("decoded by fastchat-cllm with Jacobi iterations: greedy answers equal the "
               "model's own, tokens per forward shown under each answer")
PLACEHOLDER = get_model_info("\0").description        # FastChat's text for unregistered names


@dataclass
class AnswerConversation(Conversation):
    """A conversation whose chat view shows each answer's statistics line below it (kept out of
    the prompt: get_prompt reads `messages`, which never holds it)."""

    stats: dict[int, str] = field(default_factory=dict)     # message index -> line

    def to_gradio_chatbot(self):
        pairs = super().to_gradio_chatbot()
        for j, pair in enumerate(pairs):
            line = self.stats.get(self.offset + 2 * j + 1)
            if line and pair[1]:
                pair[1] = f"{pair[1]}\n\n{line}"
        return pairs


def stats_line(usage: dict, seconds: float) -> str:
    """'*2.31 tokens per forward · 14.2 tokens/s*' from a worker's usage and the answer's time."""
    parts = []
    if usage.get("jacobi_forwards"):
        rate = tokens_per_forward(usage["jacobi_tokens"], usage["jacobi_forwards"])
        parts.append(f"{rate:.2f} tokens per forward")
    if usage.get("completion_tokens") and seconds > 0:
        parts.append(f"{usage['completion_tokens'] / seconds:.1f} tokens/s")
    return f"*{' · '.join(parts)}*" if parts else ""


def with_answer_stats(stream_iter):
    """Wrap the web UI's worker stream: when an answer ends, record its statistics line."""
    def model_worker_stream_iter(conv, *args, **kwargs):
        start, last = time.monotonic(), None
        if isinstance(conv, AnswerConversation):          # a regenerated answer: not the old line
            conv.stats.pop(len(conv.messages) - 1, None)
        for data in stream_iter(conv, *args, **kwargs):
            last = data
            yield data
        if isinstance(conv, AnswerConversation) and last and last.get("error_code") == 0:
            line = stats_line(last.get("usage") or {}, time.monotonic() - start)
            conv.stats[len(conv.messages) - 1] = line
    return model_worker_stream_iter


def worker_conversation(controller_url: str, model_name: str) -> AnswerConversation:
    """The conversation template of the worker serving `model_name` (as the API server builds
    it from /worker_get_conv_template)."""
    address = requests.post(controller_url + "/get_worker_address", json={"model": model_name},
                            timeout=10).json()["address"]
    if not address:
        raise LookupError(f"no worker serves {model_name}")
    conv = requests.post(address + "/worker_get_conv_template", json={"model": model_name},
                         timeout=10).json()["conv"]
    return AnswerConversation(
        name=conv["name"], system_template=conv["system_template"],
        system_message=conv["system_message"], roles=tuple(conv["roles"]),
        messages=[list(m) for m in conv["messages"]], offset=conv["offset"],
        sep_style=SeparatorStyle(conv["sep_style"]), sep=conv["sep"], sep2=conv["sep2"],
        stop_str=conv["stop_str"], stop_token_ids=conv["stop_token_ids"])


def asking_worker(controller_url: str, guess):
    """get_conversation_template that asks the model's worker; FastChat's `guess` from the
    name stays the fallback (e.g. for API-provider models)."""
    def get_conversation_template(model_name: str):
        try:
            return worker_conversation(controller_url, model_name)
        except (requests.RequestException, LookupError, KeyError, ValueError) as e:
            log.warning("template of %s from its worker failed (%s); guessing", model_name, e)
            return guess(model_name)
    return get_conversation_template


def describing(get_model_list):
    """Wrap the web UI's model listing: models FastChat has no description for get ours."""
    def listed(*args, **kwargs):
        visible, models = get_model_list(*args, **kwargs)
        for name in models:
            if get_model_info(name).description == PLACEHOLDER:
                register_model_info([name], name, LINK, DESCRIPTION)
        return visible, models
    return listed
