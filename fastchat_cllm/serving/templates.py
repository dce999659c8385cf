"""Prompt formats: the four published CLLM checkpoints, and any other model's own chat format
mapped to a FastChat template.

Templates use FastChat's existing separator styles only: the API server rebuilds a plain
`Conversation` from the worker's JSON, so a subclass's get_prompt would be lost.
"""
from __future__ import annotations

import os
import re

from fastchat.conversation import (Conversation, SeparatorStyle, conv_templates, get_conv_template,
                                   register_conv_template)

# The formats the checkpoints were trained with (the reference chat CLI gives all of them the
# instruction format). Key: a word in the checkpoint's name.
CLLM_TEMPLATES = {
    "sharegpt": "vicuna_v1.1",                       # "{system} USER: {q} ASSISTANT:"
    "math": "cllm-math",                             # Abel: "Question:\n{q}\nAnswer:\nLet's ..."
    "spider": "cllm-deepseek-instruct",              # "### Instruction:\n{q}\n### Response:\n"
    "codesearchnet": "cllm-deepseek-instruct",
}
# FastChat templates a tokenizer's chat format is compared against, most common first.
CHAT_FORMATS = ("chatml", "llama-2", "mistral", "zephyr", "vicuna_v1.1")
PROBE = (("user", "Hello there?"), ("assistant", "Hi."), ("user", "Say more."))
MARK = "\x00SYSTEM\x00"

NEW_TEMPLATES = (
    Conversation(name="cllm-math", roles=("Question:", "Answer:\nLet's think step by step."),
                 sep_style=SeparatorStyle.ADD_NEW_LINE_SINGLE, sep="\n"),
    Conversation(name="cllm-deepseek-instruct", roles=("### Instruction:", "### Response:"),
                 sep_style=SeparatorStyle.ADD_NEW_LINE_SINGLE, sep="\n", stop_str="<|EOT|>"),
    Conversation(name="chatml", system_template="<|im_start|>system\n{system_message}",
                 roles=("<|im_start|>user", "<|im_start|>assistant"),
                 sep_style=SeparatorStyle.CHATML, sep="<|im_end|>", stop_str="<|im_end|>"),
)


def register_templates() -> None:
    for template in NEW_TEMPLATES:
        if template.name not in conv_templates:
            register_conv_template(template)


def is_cllm(model_path: str) -> bool:
    lower = model_path.lower()
    return "consistency-llm" in lower or "cllm" in lower


def cllm_template(model_path: str) -> Conversation | None:
    """The training format of a published CLLM checkpoint, recognised by its name."""
    if not is_cllm(model_path):
        return None
    name = os.path.basename(os.path.normpath(model_path)).lower()
    for word, template in CLLM_TEMPLATES.items():
        if word in name:
            return get_conv_template(template)
    return None


def _tokenizer_prompt(tokenizer) -> str | None:
    messages = [{"role": role, "content": text} for role, text in PROBE]
    try:
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (ValueError, TypeError, AttributeError):   # no chat template (or a broken one)
        return None
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos_id is not None and tokenizer("a").input_ids[:1] == [bos_id]
    if adds_bos and bos and prompt.startswith(bos):   # encoding the prompt adds it again
        prompt = prompt[len(bos):]
    return prompt


def _conv_prompt(conv: Conversation, system: str) -> str:
    conv.set_system_message(system)
    conv.messages = []
    for role, text in PROBE:
        conv.append_message(conv.roles[0 if role == "user" else 1], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def _fit(name: str, target: str) -> Conversation | None:
    """Template `name` with the system message that makes it render `target`, if one does."""
    conv = get_conv_template(name)
    before, _, after = _conv_prompt(conv, MARK).partition(MARK)
    found = re.fullmatch(re.escape(before) + "(.*?)" + re.escape(after), target, re.DOTALL)
    for system in ([found.group(1)] if found else []) + [""]:
        if _conv_prompt(conv, system) == target:
            conv.set_system_message(system)
            conv.messages = []
            return conv
    return None


def chat_format_template(tokenizer) -> Conversation | None:
    """The FastChat template (with the default system message) that renders prompts exactly
    as the tokenizer's own chat template does; None when none does."""
    target = _tokenizer_prompt(tokenizer)
    if target is None:
        return None
    for name in CHAT_FORMATS:
        conv = _fit(name, target)
        if conv is not None:
            return conv
    return None

