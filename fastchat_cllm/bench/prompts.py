"""Benchmark prompts, as chat messages: the built-in mix, HumanEval or a JSONL file."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..chat_prompt import chat_prompt_ids
from ..jsonl import numbered_jsonl
from .extras import need

HUMAN_EVAL_SET = "humaneval"     # the --prompts value that selects every HumanEval problem

CHAT = (
    "What are three good habits for staying healthy while working from home?",
    "Explain the difference between a list and a tuple in Python.",
    "Write a short story about a robot who learns to paint.",
    "Why is the sky blue? Answer in a few sentences.",
)
# HumanEval (github.com/openai/human-eval, MIT licence): four task prompts verbatim, so the
# built-in mix needs no extra; `--prompts humaneval` takes all 164 from the package.
HUMAN_EVAL = {
    "HumanEval/0": '''from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """ Check if in given list of numbers, are any two numbers closer to each other than
    given threshold.
    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)
    False
    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)
    True
    """
''',
    "HumanEval/12": '''from typing import List, Optional


def longest(strings: List[str]) -> Optional[str]:
    """ Out of list of strings, return the longest one. Return the first one in case of multiple
    strings of the same length. Return None in case the input list is empty.
    >>> longest([])

    >>> longest(['a', 'b', 'c'])
    'a'
    >>> longest(['a', 'bb', 'ccc'])
    'ccc'
    """
''',
    "HumanEval/35": '''

def max_element(l: list):
    """Return maximum element in the list.
    >>> max_element([1, 2, 3])
    3
    >>> max_element([5, 3, -5, 2, -3, 3, 9, 0, 123, 1, -10])
    123
    """
''',
    "HumanEval/53": '''

def add(x: int, y: int):
    """Add two numbers x and y
    >>> add(2, 3)
    5
    >>> add(5, 7)
    12
    """
''',
}
REPEAT_LIST = ("apple, banana, cherry, dates, elderberry, fig, grape, honeydew, kiwi, lemon, "
               "mango, nectarine, orange, papaya, quince, raspberry, strawberry, tangerine")
MEETING_NOTES = (
    "Meeting notes, 14 March. Present: Alice Martin (product), Bob Chen (engineering), Carla "
    "Diaz (design). Alice said the beta ships on 2 April. Bob said the login bug is fixed and the "
    "export feature needs two more weeks. Carla showed the new onboarding screens; the team "
    "agreed to test them with five users before 28 March. Next meeting: 21 March at 10:00.")
EXTRACTIVE = (
    f"Repeat this list exactly, one item per line, numbered: {REPEAT_LIST}.",
    f"{MEETING_NOTES}\n\nList every person with their role, then every date with what happens "
    "on it, quoting the notes.",
    "Rewrite this function with the variable `total` renamed to `acc`, changing nothing else:\n"
    "```python\ndef summarize(values):\n    total = 0\n    for v in values:\n        total += v\n"
    "    count = len(values)\n    mean = total / count if count else 0.0\n"
    "    return {'total': total, 'count': count, 'mean': mean}\n```",
    f"{MEETING_NOTES}\n\nCopy the notes above word for word, then summarize them in one sentence.",
)


@dataclass(frozen=True)
class Prompt:
    name: str
    category: str            # "chat", "code", "extractive" or what a JSONL file says
    messages: tuple          # chat messages: ({"role": ..., "content": ...}, ...)


def _user(text: str) -> tuple:
    return ({"role": "user", "content": text},)


def _code_prompt(task: str, code: str) -> Prompt:
    return Prompt(task, "code", _user("Complete this Python function. Reply with code only.\n"
                                      f"```python\n{code}```"))


def human_eval_prompts() -> list[Prompt]:
    """All HumanEval problems (`--prompts humaneval`); MissingExtra without the bench extra."""
    problems = need("human_eval.data", f"--prompts {HUMAN_EVAL_SET}").read_problems()
    return [_code_prompt(task, problem["prompt"]) for task, problem in problems.items()]


def builtin_prompts() -> list[Prompt]:
    """The built-in mix, categories interleaved so that any first N covers all of them."""
    chat = [Prompt(f"chat-{i}", "chat", _user(t)) for i, t in enumerate(CHAT)]
    extractive = [Prompt(f"extractive-{i}", "extractive", _user(t))
                  for i, t in enumerate(EXTRACTIVE)]
    code = [_code_prompt(task, text) for task, text in HUMAN_EVAL.items()]
    groups = (chat, code, extractive)
    return [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)]


def _messages(record) -> tuple:
    if isinstance(record, dict) and "messages" in record:
        return tuple(record["messages"])
    for key in ("prompt", "question", "text"):
        if isinstance(record, dict) and isinstance(record.get(key), str):
            return _user(record[key])
    raise ValueError("needs 'messages' or 'prompt'")


def read_prompts(path: str | Path) -> list[Prompt]:
    """One JSON object a line: {"prompt": str} or {"messages": [...]}, optional name/category."""
    prompts = []
    for number, record in numbered_jsonl(path):
        try:
            messages = _messages(record)
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        prompts.append(Prompt(str(record.get("name", f"prompt-{number - 1}")),
                              str(record.get("category", "custom")), messages))
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def select_prompts(source: str | None, count: int | None) -> list[Prompt]:
    """The first `count` of: the built-in mix (None), HumanEval (HUMAN_EVAL_SET) or a JSONL file."""
    if source == HUMAN_EVAL_SET:
        prompts = human_eval_prompts()
    else:
        prompts = read_prompts(source) if source else builtin_prompts()
    return prompts[:count] if count else prompts


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Prompt token ids through the tokenizer's chat template (plain text when it has none)."""
    return chat_prompt_ids(tokenizer, prompt.messages)
