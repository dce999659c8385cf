"""FastChat's generate-stream contract over the Jacobi engine.

`generate_stream` has the signature of fastchat.serve.inference.generate_stream, so the worker
and FastChat's own terminal chat call it alike. Contract (what the API server and web UI rely on):
each chunk's text is the whole answer so far and never shrinks; a chunk at most every
`stream_interval` tokens; text that may be the start of a stop string is held back; a stop
string or stop token ends the answer ("stop"), max_new_tokens exactly ("length"); usage counts
exactly the prompt tokens fed and the tokens generated, up to the one that completed a stop.
A prompt given as token ids (`prompt_token_ids`: OpenAI's completions accept them) is fed as it
is, never re-tokenized from its text; the echoed prompt is always the decoded ids fed.
Differences from FastChat's loop: text is decoded without `clean_up_tokenization_spaces` (that
rewrites the model's " ." into "."), a stop token is counted but not shown, and the prompt is
cut to the last context_len - max_new_tokens tokens (FastChat's extra -1 drops the first prompt
token whenever the API server fills the context). On the worker's shared engine a prompt that,
so cut, does not fit a cache slot with its max_new_tokens is refused (40303) before it joins.
"""
from __future__ import annotations

from contextlib import closing
from typing import Iterator, Sequence

import torch
from fastchat.constants import ErrorCode

from ..core import JacobiConfig, JacobiStats
from ..core.engine import EngineLoop
from .logprobs import AnswerLogprobs
from .params import ParamError, parse_params
from .sources import decode_steps


def stop_token_ids(model, tokenizer, requested: Sequence[int]) -> tuple[int, ...]:
    """The request's stop ids plus the tokenizer's and the generation config's EOS."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    ids = list(requested)
    for token in (tokenizer.eos_token_id, *eos):
        if token is not None and token not in ids:
            ids.append(int(token))
    return tuple(ids)


def vocab_size(model) -> int:
    """How many token ids the model embeds (and scores: the output head has as many rows)."""
    return model.get_input_embeddings().num_embeddings


def prompt_ids_of(tokenizer, request) -> list[int]:
    """The ids to feed: the request's own token ids, else its text's."""
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids)
    return list(tokenizer(request.prompt).input_ids)


def truncate(prompt_ids: list[int], context_len: int, max_new_tokens: int) -> list[int]:
    """Keep the last tokens of the prompt that leave room for max_new_tokens in the context."""
    room = context_len - max_new_tokens
    if room < 1:
        raise ParamError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in "
                         f"the model's context of {context_len} tokens", ErrorCode.CONTEXT_OVERFLOW)
    return prompt_ids[-room:]


def check_slot(prompt_tokens: int, max_new_tokens: int, max_len: int) -> None:
    """Refuse a request that the engine's cache slot cannot hold, before it takes a slot."""
    if prompt_tokens + max_new_tokens > max_len:
        raise ParamError(f"the prompt ({prompt_tokens} tokens) and max_new_tokens="
                         f"{max_new_tokens} do not fit the worker's cache slot of {max_len} "
                         f"positions (--max-len)", ErrorCode.CONTEXT_OVERFLOW)


def first_stop(text: str, start: int, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in text[start:], or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def ends_in_partial_stop(text: str, start: int, stops: Sequence[str]) -> bool:
    tail = text[start:]
    return any(tail.endswith(s[:k]) for s in stops for k in range(1, len(s)))


class Answer:
    """The generated tokens and their text (after the echoed prompt, when echoing)."""

    def __init__(self, tokenizer, prompt_ids: list[int], echo: bool, stops: Sequence[str],
                 stop_ids: Sequence[int]):
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, set(stop_ids)
        self.prefix = list(prompt_ids) if echo else []
        self.tokens: list[int] = []
        self.text = self._decode([])
        self.start = len(self.text)           # the answer's own text starts here

    def _decode(self, tokens: list[int]) -> str:
        if tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]              # a stop token ends the text; it is not part of it
        return self.tokenizer.decode(self.prefix + tokens, skip_special_tokens=True,
                                     spaces_between_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def add(self, new: list[int]) -> bool:
        """Append tokens; True when a stop string ended the answer (the tokens after the one
        that completed it are dropped, the text is cut before it)."""
        before = len(self.tokens)
        self.tokens += new
        self.text = self._decode(self.tokens)
        if first_stop(self.text, self.start, self.stops) is None:
            return False
        for end in range(before + 1, len(self.tokens) + 1):   # the fewest tokens that stop
            text = self._decode(self.tokens[:end])
            cut = first_stop(text, self.start, self.stops)
            if cut is not None:
                self.tokens, self.text = self.tokens[:end], text[:cut]
                return True
        raise AssertionError("a stop string vanished when fewer tokens were decoded")

    def shown(self) -> str | None:
        """The text a chunk may show now, or None while it may end in part of a stop string."""
        if ends_in_partial_stop(self.text, self.start, self.stops):
            return None
        return self.text.rstrip("\ufffd")     # a character whose bytes are not all there yet


def usage(prompt_tokens: int, answer: Answer, stats: JacobiStats | None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.tokens),
           "total_tokens": prompt_tokens + len(answer.tokens)}
    if stats is not None and stats.forwards:
        out.update(jacobi_forwards=stats.forwards, jacobi_tokens=sum(stats.accepted_per_forward),
                   jacobi_tokens_per_forward=round(stats.tokens_per_forward, 4))
    return out


@torch.inference_mode()
def generate_stream(model, tokenizer, params: dict, device=None, context_len: int = 2048,
                    stream_interval: int = 2, judge_sent_end: bool = False,
                    jacobi: JacobiConfig | None = None,
                    engine: EngineLoop | None = None) -> Iterator[dict]:
    """FastChat chunks {text, usage, finish_reason, logprobs} for one request (see module doc).
    `device` and `judge_sent_end` are FastChat's; the model's own device is used. With
    `engine` (the worker's) the request joins the shared batch, else it decodes alone."""
    request = parse_params(params, vocab_size(model))
    prompt_ids = truncate(prompt_ids_of(tokenizer, request), context_len, request.max_new_tokens)
    if engine is not None:
        check_slot(len(prompt_ids), request.max_new_tokens, engine.max_len)
    stop_ids = stop_token_ids(model, tokenizer, request.stop_token_ids)
    answer = Answer(tokenizer, prompt_ids, request.echo, request.stop, stop_ids)
    logprobs = AnswerLogprobs(tokenizer, stop_ids) if request.logprobs is not None else None
    sent, sent_at, reason, stats = "", None, None, None
    steps = decode_steps(model, prompt_ids, request, jacobi or JacobiConfig(), stop_ids,
                         engine)
    with closing(steps):
        for step in steps:
            stats = step.stats
            if logprobs is not None:
                if step.prompt_logprobs is not None:
                    logprobs.add_prompt(prompt_ids[0], step.prompt_logprobs)
                logprobs.add(step.logprobs)
            reason = "stop" if answer.add(step.tokens) else step.finish_reason
            if reason:
                break
            text = answer.shown()
            due = sent_at is None or len(answer.tokens) - sent_at >= stream_interval
            if due and text is not None and len(text) > len(sent) and text.startswith(sent):
                sent, sent_at = text, len(answer.tokens)
                yield {"text": text, "usage": usage(len(prompt_ids), answer, stats),
                       "finish_reason": None,
                       "logprobs": None if logprobs is None else logprobs.chunk(answer.tokens)}
    yield {"text": answer.text, "usage": usage(len(prompt_ids), answer, stats),
           "finish_reason": reason or "length",
           "logprobs": None if logprobs is None else logprobs.chunk(answer.tokens)}
