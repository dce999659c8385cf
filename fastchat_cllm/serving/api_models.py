"""The API server's request models: FastChat's, taking what today's OpenAI clients send.

FastChat's models ignore fields they lack (chat logprobs, seed, max_completion_tokens,
logit_bias, tools ...), answer 500 for content-part lists and token-id prompts, and let through
n without bound, empty messages, unknown roles and empty stop strings. These subclasses:
- take chat `content` as a string or a list of text parts (joined by newlines); other parts
  (images, audio) are refused naming the part; role "developer" is a system message;
- take `max_completion_tokens` as `max_tokens` (both, if different: refused);
- take `logit_bias` ({token id: bias in [-100, 100]}), `logprobs`/`top_logprobs`, `seed`,
  `stream_options`;
- take completions prompts as text, token ids, or lists of either (one choice each);
- declare the options this server cannot honour (tools, response formats other than text,
  suffix, audio) so that they are refused (`unsupported`) instead of silently dropped.
Validation errors read "param: problem" (400).
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator

from . import params

MAX_CHOICES = 16               # n
MAX_PROMPT_CHOICES = 64        # completions: prompts x n
MAX_SEED = 1 << 62              # choice i samples with seed + i
ROLES = ("system", "user", "assistant")
ALIASES = {"developer": "system"}


class StreamOptions(BaseModel):
    include_usage: bool = False


def _part_text(part, where: str) -> str:
    if not isinstance(part, dict) or "type" not in part:
        raise ValueError(f"{where} must be a content part {{'type': ..., ...}}")
    if part["type"] != "text":
        raise ValueError(f"{where} is a part of type {part['type']!r}: this server takes text "
                         f"only")
    if not isinstance(part.get("text"), str):
        raise ValueError(f"{where}.text must be a string")
    return part["text"]


def check_messages(messages):
    """A prompt string, or messages with a known role and text content (parts joined)."""
    if isinstance(messages, str):
        return messages
    if not messages:
        raise ValueError("'messages' must not be empty")
    checked = []
    for i, message in enumerate(messages):
        role = ALIASES.get(message.get("role"), message.get("role"))
        if role not in ROLES:
            raise ValueError(f"'messages[{i}].role' must be one of system, developer, user, "
                             f"assistant, got {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(_part_text(p, f"'messages[{i}].content[{j}]'")
                                for j, p in enumerate(content))
        if not isinstance(content, str):
            raise ValueError(f"'messages[{i}].content' must be a string or a list of text parts")
        checked.append({**message, "role": role, "content": content})
    return checked


def check_stop(stop):
    """FastChat drops an empty stop string silently; refuse it instead."""
    if stop == "" or (isinstance(stop, list) and not all(stop)):
        raise ValueError("'stop' strings must not be empty")
    return stop


def check_logit_bias(bias):
    """The worker's own check (params.logit_bias), here so a bad map never reaches it."""
    if bias is None:
        return None
    try:
        return {str(token): value for token, value in params.logit_bias(bias)}
    except params.ParamError as e:
        raise ValueError(str(e)) from None


def check_prompt(prompt):
    """Completions prompt: text, token ids, or a non-empty list of either."""
    def ids(item) -> bool:
        return isinstance(item, list) and bool(item) and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item)

    if isinstance(prompt, str):
        return prompt
    if ids(prompt):
        return prompt
    if prompt and all(isinstance(p, str) for p in prompt) or prompt and all(map(ids, prompt)):
        return prompt
    raise ValueError("'prompt' must be a string, a list of token ids (ints >= 0), or a "
                     "non-empty list of either")


def same_max_tokens(request):
    """max_completion_tokens (the SDK's current name) is max_tokens."""
    given = request.max_completion_tokens
    if given is not None:
        if "max_tokens" in request.model_fields_set and request.max_tokens not in (None, given):
            raise ValueError(f"'max_tokens' ({request.max_tokens}) and 'max_completion_tokens' "
                             f"({given}) differ: give one")
        request.max_tokens = given
    return request


def unsupported(request) -> Optional[str]:
    """The first option given that this server cannot honour, as the refusal's message."""
    fields = request.model_fields_set
    for name in ("tools", "functions", "audio"):
        if getattr(request, name, None):
            return f"'{name}' is not supported: the Jacobi worker generates text only"
    for name in ("tool_choice", "function_call"):
        if name in fields and getattr(request, name) not in (None, "none"):
            return f"'{name}' is not supported: no tools can be called"
    form = getattr(request, "response_format", None)
    if form is not None and (not isinstance(form, dict) or form.get("type") != "text"):
        return "'response_format' other than {\"type\": \"text\"} is not supported"
    if any(m != "text" for m in getattr(request, "modalities", None) or ()):
        return "'modalities' other than [\"text\"] are not supported"
    if getattr(request, "suffix", None):
        return "'suffix' (fill in the middle) is not supported"
    return None


def _validation_message(self) -> str:
    """'param: what is wrong' per error, instead of pydantic's dump with the endpoint's file."""
    def name(loc) -> str:
        return ".".join(p for p in loc[1:2] if isinstance(p, str)) or "body"
    return "; ".join(f"{name(e['loc'])}: {e['msg']}" for e in self.errors())


def install() -> None:
    """Put the subclasses into FastChat's protocol module (before the API server imports it)."""
    from fastapi.exceptions import RequestValidationError
    from fastchat.protocol import openai_api_protocol as protocol

    if getattr(protocol.ChatCompletionRequest, "checked", False):
        return
    RequestValidationError.__str__ = _validation_message

    class Common(BaseModel):
        n: Optional[int] = Field(1, ge=1, le=MAX_CHOICES)
        seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
        stream_options: Optional[StreamOptions] = None
        max_completion_tokens: Optional[int] = Field(None, ge=1)
        logit_bias: Optional[dict[str, Any]] = None

        @field_validator("stop", check_fields=False)
        @classmethod
        def no_empty_stop(cls, stop):
            return check_stop(stop)

        @field_validator("logit_bias")
        @classmethod
        def token_biases(cls, bias):
            return check_logit_bias(bias)

        @model_validator(mode="after")
        def one_max_tokens(self):
            return same_max_tokens(self)

    class ChatCompletionRequest(Common, protocol.ChatCompletionRequest):
        checked: ClassVar[bool] = True
        messages: Union[str, list[dict[str, Any]]]
        logprobs: Optional[bool] = False
        top_logprobs: Optional[int] = Field(None, ge=0, le=params.MAX_LOGPROBS)
        tools: Optional[list[Any]] = None
        tool_choice: Optional[Any] = None
        functions: Optional[list[Any]] = None
        function_call: Optional[Any] = None
        response_format: Optional[Any] = None
        modalities: Optional[list[str]] = None
        audio: Optional[Any] = None

        @model_validator(mode="after")
        def top_logprobs_needs_logprobs(self):
            if self.top_logprobs and not self.logprobs:
                raise ValueError("'top_logprobs' needs 'logprobs': true")
            return self

        @field_validator("messages")
        @classmethod
        def known_roles(cls, messages):
            return check_messages(messages)

    class CompletionRequest(Common, protocol.CompletionRequest):
        prompt: Union[str, list[Any]]
        logprobs: Optional[int] = Field(None, ge=0, le=params.MAX_LOGPROBS)

        @field_validator("prompt")
        @classmethod
        def text_or_ids(cls, prompt):
            return check_prompt(prompt)

    protocol.ChatCompletionRequest = ChatCompletionRequest
    protocol.CompletionRequest = CompletionRequest
