"""The API server's /v1/chat/completions and /v1/completions, in place of fschat 0.2.36's.

FastChat's own endpoints drop parameters its request models lack: chat `logprobs` and
`top_logprobs`, and `seed` on both, never reach the worker. Its streamed completions repeat every
logprob so far in each chunk and number choices by n alone. These endpoints build the worker
request with FastChat's own helpers (conversation template, stop strings, model and length
checks) and add:
- chat logprobs in OpenAI's format: `choice.logprobs.content` is a list of
  {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}; streamed, each chunk carries
  the entries of its own tokens;
- `seed`: choice i of a request samples with seed + i, so the same request gets the same answers;
- streamed completions: each chunk carries its own tokens' logprobs; choices are numbered across
  prompts x n, as in the non-streamed answer;
- `stream_options: {"include_usage": true}`: a last chunk carries the usage (with the Jacobi
  forwards and tokens per forward), as OpenAI's API does;
- a streamed answer waits for its worker's first chunk as long as a non-streamed one (3 h; a
  request queued behind `--limit-worker-concurrency` gets no byte until a slot frees), not
  FastChat's FASTCHAT_WORKER_API_TIMEOUT (100 s), which bounds each wait for the next chunk;
  a worker that falls silent that long or drops the connection mid-answer ends the stream
  with an error chunk (50006 / 50005) and [DONE], not a broken stream; a client that hangs up
  closes the connection to the worker at once (which cancels its decoding there);
- a non-streamed answer is read from the worker's stream as well (FastChat calls
  /worker_generate, which decodes to the end whether its client waits or not): a client that
  hangs up is noticed within 0.5 s and its decoding cancelled; a worker that cannot be reached
  or falls silent is answered 503 (50005 / 50006).
Responses are written as plain JSON with FastChat's ids, objects and (Jacobi) usage.
"""
import json
import time
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Optional, TypeVar

import anyio
import httpx
import shortuuid
from fastapi import Depends, Request
from fastchat.constants import ErrorCode
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from . import api_models
from .compat import error_response
from .responses import ClosingStream
from .stock import StockMismatch

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
DONE = "data: [DONE]\n\n"
T = TypeVar("T")
UNREACHABLE = (ErrorCode.CONTROLLER_NO_WORKER, ErrorCode.CONTROLLER_WORKER_TIMEOUT)  # 503
START_SECONDS = 3 * 3600   # a streamed answer's wait for its worker to start: FastChat's bound
#                            on a whole non-streamed call (fetch_remote)


def install(app, server) -> None:
    """Replace the stock endpoints on `app` with these; `server` is FastChat's API server module
    (its helpers; stock.load checked that it has them)."""
    from fastchat.protocol import openai_api_protocol as protocol

    routes = Routes(server)

    async def chat(request: protocol.ChatCompletionRequest, client: Request):
        return await routes.chat(request, client)

    async def completions(request: protocol.CompletionRequest, client: Request):
        return await routes.completions(request, client)

    replaced = [r for r in app.router.routes
                if isinstance(r, APIRoute) and r.path in (CHAT, COMPLETIONS)]
    if len(replaced) != 2:
        raise StockMismatch(f"the stock API server has no {CHAT} and {COMPLETIONS} to replace")
    app.router.routes = [r for r in app.router.routes if r not in replaced]
    guard = [Depends(server.check_api_key)]
    app.add_api_route(CHAT, chat, methods=["POST"], dependencies=guard)
    app.add_api_route(COMPLETIONS, completions, methods=["POST"], dependencies=guard)


async def worker_stream(params: dict, worker: str) -> AsyncIterator[dict]:
    """The worker's answer chunks for `params` (/worker_generate_stream). The wait for the
    worker's first chunk (a queue for a slot, the prefill) is bounded by START_SECONDS, each
    wait for a next chunk by FastChat's WORKER_API_TIMEOUT (FASTCHAT_WORKER_API_TIMEOUT); a wait
    that runs out, a connection that fails or a reply that is not 200 ends the answer with an
    error chunk, FastChat's {"text", "error_code"}. (Bounded with anyio, not asyncio.wait_for,
    which in Python 3.11 drops a cancellation that lands as its chunk arrives.)"""
    from fastchat.constants import WORKER_API_TIMEOUT

    url, started_by = worker + "/worker_generate_stream", anyio.current_time() + START_SECONDS
    timeout = httpx.Timeout(WORKER_API_TIMEOUT, read=None)     # reads: bounded by answer_chunks
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            request = client.build_request("POST", url, json=params,
                                           headers={"User-Agent": "FastChat API Server"})
            with anyio.fail_after(START_SECONDS):
                response = await client.send(request, stream=True)
            try:
                async with aclosing(answer_chunks(response, started_by,
                                                  WORKER_API_TIMEOUT)) as contents:
                    async for content in contents:
                        yield content
            finally:        # an error here would be yielded into a generator being closed
                with suppress(httpx.HTTPError):
                    await response.aclose()
    except TimeoutError as error:       # no message: the answer had not started by started_by
        waited = str(error) or f"the worker did not start its answer within {START_SECONDS} s"
        yield {"error_code": ErrorCode.CONTROLLER_WORKER_TIMEOUT, "text": f"{waited} ({url})"}
    except httpx.TimeoutException as error:      # connecting, sending the request
        yield {"error_code": ErrorCode.CONTROLLER_WORKER_TIMEOUT,
               "text": f"the worker did not take the request within {WORKER_API_TIMEOUT} s "
                       f"({type(error).__name__}, {url})"}
    except httpx.HTTPError as error:
        yield {"error_code": ErrorCode.CONTROLLER_NO_WORKER,
               "text": f"the worker's answer broke off ({type(error).__name__}"
                       f"{f': {error}' if str(error) else ''})"}


async def answer_chunks(response: httpx.Response, started_by: float,
                        within: float) -> AsyncIterator[dict]:
    """The chunks of a worker's streamed answer: JSON objects split at b"\\0", empty ones
    skipped (a queued request's keep-alives, which do not count as a start). The first must
    come by `started_by` (anyio.current_time()), else TimeoutError(); once it has, each read
    of the connection must bring bytes within `within` s, else TimeoutError saying so. A reply
    that is not 200 is one error chunk, with what came of its body within `within` s."""
    if response.status_code != 200:
        body = b""
        with anyio.move_on_after(within):
            async for part in response.aiter_bytes():
                body += part
        yield {"error_code": ErrorCode.INTERNAL_ERROR,
               "text": f"the worker answered {response.status_code}: "
                       f"{body.decode(errors='replace')[:200]}"}
        return
    raw, buffer, started = response.aiter_raw(), b"", False
    while True:
        try:
            with anyio.fail_after(within if started else started_by - anyio.current_time()):
                buffer += await anext(raw)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if not started:
                raise
            raise TimeoutError(f"the worker sent nothing for {within} s") from None
        *chunks, buffer = buffer.split(b"\0")
        for chunk in chunks:
            if chunk:
                started = True
                yield parsed(chunk)


def parsed(chunk: bytes) -> dict:
    """A worker's chunk as FastChat's {"text", "error_code", ...}; one that is not such a JSON
    object becomes an error chunk (which ends the answer), not an exception."""
    try:
        content = json.loads(chunk.decode())
    except ValueError:                  # (a UnicodeDecodeError is one too)
        content = None
    if not isinstance(content, dict) or "error_code" not in content:
        return {"error_code": ErrorCode.INTERNAL_ERROR,
                "text": f"the worker sent a chunk that is not FastChat's: {chunk[:100]!r}"}
    return content


async def final_answer(params: dict, worker: str) -> dict:
    """The worker's last chunk for `params` (what /worker_generate answers), or its error."""
    content = {"error_code": ErrorCode.INTERNAL_ERROR, "text": "the worker sent no answer"}
    async with aclosing(worker_stream(params, worker)) as contents:
        async for content in contents:
            if content["error_code"] != 0:
                break
    return content


async def unless_hung_up(client: Request, works: list[Awaitable[T]],
                         every: float = 0.5) -> Optional[list[T]]:
    """The works' results, run together, or None when the client hangs up first (asked every
    `every` s): the works left are cancelled then (the worker streams they read are closed,
    which cancels their decoding). One that raises cancels the others."""
    results: list = [None] * len(works)

    async def run(i: int, work: Awaitable[T]) -> None:
        results[i] = await work

    async with anyio.create_task_group() as watching:
        async def watch() -> None:
            while not await client.is_disconnected():
                await anyio.sleep(every)
            watching.cancel_scope.cancel()

        watching.start_soon(watch)
        async with anyio.create_task_group() as group:
            for i, work in enumerate(works):
                group.start_soon(run, i, work)
        watching.cancel_scope.cancel()          # all answered: stop watching
        return results
    return None                                 # hung up


def per_choice(params: dict, n: int, seed: Optional[int], first: int = 0) -> list[dict]:
    """The worker request of each of n choices: with a seed, choice i samples with seed + i."""
    if seed is None:
        return [params] * n
    return [dict(params, seed=seed + first + i) for i in range(n)]


def chat_logprobs(logprobs: Optional[dict], start: int = 0) -> list[dict]:
    """OpenAI chat `logprobs.content` entries for the worker's tokens from `start` on (bytes
    from the worker's "detail" when it sends them, else the text's UTF-8)."""
    if not logprobs:
        return []

    def entry(token: str, value: float, raw: Optional[list[int]]) -> dict:
        return {"token": token, "logprob": value,
                "bytes": raw if raw is not None else list(token.encode("utf-8"))}

    details = logprobs.get("detail") or [None] * len(logprobs["tokens"])
    rows = zip(logprobs["tokens"][start:], logprobs["token_logprobs"][start:],
               logprobs["top_logprobs"][start:], details[start:])
    out = []
    for token, value, top, detail in rows:
        if detail is not None:
            alternatives = [entry(*alt) for alt in detail["top"] or ()]
        else:
            alternatives = [entry(alt, v, None) for alt, v in (top or {}).items()]
        out.append(dict(entry(token, value, detail and detail["bytes"]),
                        top_logprobs=alternatives))
    return out


def completion_logprobs(logprobs: Optional[dict], start: int = 0) -> Optional[dict]:
    """OpenAI completions `logprobs` of the worker's tokens from `start` on."""
    if logprobs is None:
        return None
    return {key: logprobs[key][start:]
            for key in ("text_offset", "tokens", "token_logprobs", "top_logprobs")}


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Sent:
    """What a choice's stream has sent: the answer's text and how many of its tokens."""

    def __init__(self):
        self.text, self.tokens = "", 0

    @staticmethod
    def _text(content: dict) -> str:
        return content["text"].replace("\ufffd", "")   # bytes of a character still to come

    def delta(self, content: dict) -> tuple[str, int]:
        """The text `content` adds, and the index of its first unsent token."""
        return self._text(content)[len(self.text):], self.tokens

    def advance(self, content: dict) -> None:
        text = self._text(content)
        self.text = text if len(text) > len(self.text) else self.text
        self.tokens = len((content.get("logprobs") or {}).get("tokens", ()))


@dataclass(frozen=True)
class Prompt:
    """One completions prompt: text, or token ids (fed to the worker as they are)."""
    text: str
    ids: Optional[list[int]] = None

    @staticmethod
    def all(prompt) -> list["Prompt"]:
        """The request's prompts (checked by api_models.check_prompt): one choice each."""
        if isinstance(prompt, str):
            return [Prompt(prompt)]
        if isinstance(prompt[0], int):
            return [Prompt("", prompt)]
        return [Prompt(p) if isinstance(p, str) else Prompt("", p) for p in prompt]


class Routes:
    def __init__(self, server):
        self.server = server          # FastChat's API server module: its helpers

    def error(self, code: int, message: str) -> JSONResponse:
        return self.server.create_error_response(code, message)

    async def checked(self, request) -> tuple[Optional[str], Optional[JSONResponse]]:
        """Options we cannot honour, FastChat's model and parameter checks; the address of the
        model's worker."""
        refused = api_models.unsupported(request)
        if refused is not None:
            return None, self.error(ErrorCode.PARAM_OUT_OF_RANGE, refused)
        error = await self.server.check_model(request) or self.server.check_requests(request)
        if error is not None:
            return None, error
        return await self.server.get_worker_address(request.model), None

    async def gen_params(self, request, worker: str, messages, **options) -> dict:
        params = await self.server.get_gen_params(
            request.model, worker, messages, temperature=request.temperature,
            top_p=request.top_p, top_k=request.top_k, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, stop=request.stop, **options)
        if request.logit_bias:
            params["logit_bias"] = request.logit_bias
        return params

    async def room(self, request, prompt: Prompt, max_tokens: Optional[int], worker: str):
        """FastChat's min(max_tokens, what the context leaves), counting a token-id prompt
        itself; or the context-overflow error."""
        if prompt.ids is None:
            return await self.server.check_length(request, prompt.text, max_tokens, worker)
        context = await self.server.fetch_remote(worker + "/model_details",
                                                 {"model": request.model}, "context_length")
        room = min(max_tokens or context, context - len(prompt.ids))
        if room <= 0:
            return None, self.error(ErrorCode.CONTEXT_OVERFLOW, (
                f"This model's maximum context length is {context} tokens. However, your "
                f"prompt has {len(prompt.ids)} tokens. Please reduce the length of the prompt."))
        return room, None

    async def generate_all(self, choices: list[dict], worker: str, client: Request):
        """Every choice's final worker answer, or the first error as a response. Each is read
        from the worker's stream, so that a client that hangs up first cancels their
        decoding (unless_hung_up), which FastChat's /worker_generate would finish."""
        contents = await unless_hung_up(client, [final_answer(params, worker)
                                                 for params in choices])
        if contents is None:            # nobody reads this answer: nginx's "client closed"
            return None, error_response(ErrorCode.INTERNAL_ERROR, "the client hung up", 499)
        for content in contents:
            code = content["error_code"]
            if code in UNREACHABLE:     # as compat's answer to a worker that cannot be reached
                return None, error_response(code, content["text"], 503)
            if code != 0:
                return None, self.error(code, content["text"])
        return contents, None

    def usage(self, contents: list[dict]) -> dict:
        """FastChat's usage summed over the choices (Jacobi counts included)."""
        usage_model = self.server.UsageInfo      # compat.fix_protocol's (Jacobi counts)
        total = usage_model()
        for content in contents:
            for key, value in usage_model.model_validate(content["usage"]):
                setattr(total, key, getattr(total, key) + value)
        return total.model_dump()

    def stream(self, request, kind: str, choices: list[dict], worker: str,
               chunk_choice) -> ClosingStream:
        """SSE chunks of every choice in turn; chunk_choice(index, content, delta) -> the
        chunk's choice, or None when the chunk adds nothing. With stream_options.include_usage,
        a last chunk with no choices carries the usage of all (Jacobi counts included)."""
        with_usage = bool(request.stream_options and request.stream_options.include_usage)
        finals: list[dict] = []                 # each choice's last chunk (its usage)
        header = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{shortuuid.random()}",
                  "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                  "created": int(time.time()), "model": request.model}

        async def events() -> AsyncIterator[str]:
            for index, params in enumerate(choices):
                first = chunk_choice(index, None, None)
                if first is not None:
                    yield sse(dict(header, choices=[first]))
                sent, content = Sent(), None
                async with aclosing(worker_stream(params, worker)) as contents:
                    async for content in contents:
                        if content["error_code"] != 0:
                            yield sse(content)
                            yield DONE
                            return
                        choice = chunk_choice(index, content, sent.delta(content))
                        if choice is not None:
                            sent.advance(content)
                            yield sse(dict(header, choices=[choice]))
                if content is not None:
                    finals.append(content)
            if with_usage:
                yield sse(dict(header, choices=[], usage=self.usage(finals)))
            yield DONE

        return ClosingStream(events(), media_type="text/event-stream")   # hung up: closed now

    async def chat(self, request, client: Request) -> Any:
        worker, error = await self.checked(request)
        if error is not None:
            return error
        top = (request.top_logprobs or 0) if request.logprobs else None
        params = await self.gen_params(request, worker, request.messages,
                                       max_tokens=request.max_tokens, echo=False, logprobs=top)
        max_new_tokens, error = await self.server.check_length(
            request, params["prompt"], params["max_new_tokens"], worker)
        if error is not None:
            return error
        params["max_new_tokens"] = max_new_tokens
        choices = per_choice(params, request.n or 1, request.seed)
        if request.stream:
            return self.stream(request, "chat", choices, worker,
                               lambda i, content, delta: chat_chunk(i, content, delta, top))
        contents, error = await self.generate_all(choices, worker, client)
        if error is not None:
            return error
        return {"id": f"chatcmpl-{shortuuid.random()}", "object": "chat.completion",
                "created": int(time.time()), "model": request.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                             "logprobs": None if top is None else
                             {"content": chat_logprobs(c.get("logprobs"))},
                             "finish_reason": c.get("finish_reason", "stop")}
                            for i, c in enumerate(contents)],
                "usage": self.usage(contents)}

    async def completions(self, request, client: Request) -> Any:
        worker, error = await self.checked(request)
        if error is not None:
            return error
        prompts = Prompt.all(request.prompt)
        if len(prompts) * (request.n or 1) > api_models.MAX_PROMPT_CHOICES:
            return self.error(ErrorCode.PARAM_OUT_OF_RANGE, (
                f"{len(prompts)} prompts x n={request.n or 1} make more than "
                f"{api_models.MAX_PROMPT_CHOICES} choices: send fewer prompts per request"))
        max_tokens = request.max_tokens
        for prompt in prompts:
            max_tokens, error = await self.room(request, prompt, max_tokens, worker)
            if error is not None:
                return error
        choices: list[dict] = []
        for prompt in prompts:
            params = await self.gen_params(
                request, worker, prompt.text, max_tokens=max_tokens, logprobs=request.logprobs,
                echo=request.echo, best_of=request.best_of,
                use_beam_search=request.use_beam_search)
            if prompt.ids is not None:
                params["prompt_token_ids"] = prompt.ids
            choices += per_choice(params, request.n or 1, request.seed, len(choices))
        if request.stream:
            return self.stream(request, "completion", choices, worker, completion_chunk)
        contents, error = await self.generate_all(choices, worker, client)
        if error is not None:
            return error
        return {"id": f"cmpl-{shortuuid.random()}", "object": "text_completion",
                "created": int(time.time()), "model": request.model,
                "choices": [{"index": i, "text": c["text"],
                             "logprobs": completion_logprobs(c.get("logprobs")),
                             "finish_reason": c.get("finish_reason", "stop")}
                            for i, c in enumerate(contents)],
                "usage": self.usage(contents)}


def chat_chunk(index: int, content: Optional[dict], delta, top: Optional[int]) -> Optional[dict]:
    """A streamed chat choice: the role first, then new text with its tokens' logprobs."""
    if content is None:
        return {"index": index, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}
    text, start = delta
    entries = chat_logprobs(content.get("logprobs"), start)
    reason = content.get("finish_reason")
    if not (text or entries or reason):
        return None
    return {"index": index, "delta": {"content": text} if text else {},
            "logprobs": None if top is None else {"content": entries}, "finish_reason": reason}


def completion_chunk(index: int, content: Optional[dict], delta) -> Optional[dict]:
    """A streamed completion choice: new text with its tokens' logprobs."""
    if content is None:
        return None
    text, start = delta
    reason = content.get("finish_reason")
    if not (text or reason):
        return None
    return {"index": index, "text": text,
            "logprobs": completion_logprobs(content.get("logprobs"), start),
            "finish_reason": reason}
