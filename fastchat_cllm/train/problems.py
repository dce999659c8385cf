"""An offline prompt set: templated arithmetic word problems with known answers, from a seed.

Each problem is one question with an integer answer; the quality metric is answer accuracy
(the last number in the model's output equals the answer). Problems are one-step additions,
subtractions and multiplications: short, formulaic answers, the domain where CLLMs shine.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ("Sam", "Mia", "Tom", "Lily", "Ben", "Emma", "Jack", "Zoe", "Leo", "Ava", "Max", "Nora")
ITEMS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "balloons")
CONTAINERS = ("box", "bag", "jar", "basket", "shelf", "tray")
SUFFIX = " Answer with one short sentence."

# (kind, template, answer): a and b are drawn so that every answer is a positive integer.
TEMPLATES = (
    ("add", "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} "
            "have now?", lambda a, b: a + b),
    ("sub", "{name} has {a} {item} and gives away {b} of them. How many {item} does {name} have "
            "left?", lambda a, b: a - b),
    ("mul", "A {box} holds {b} {item}. How many {item} are in {a} {box}es?", lambda a, b: a * b),
    ("add", "There are {a} {item} on the table and {b} {item} on the floor. How many {item} are "
            "there in total?", lambda a, b: a + b),
)


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str   # the user message
    answer: int


def make_problem(rng: random.Random, index: int, split: str) -> Problem:
    kind, template, solve = rng.choice(TEMPLATES)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if kind == "sub" and b >= a:
        a, b = b + 1, a
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    text = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS),
                           box=rng.choice(CONTAINERS), a=a, b=b)
    return Problem(f"{split}-{index:04d}", text + SUFFIX, solve(a, b))


def make_problems(train: int, held_out: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, held_out): distinct problems; the same seed always gives the same sets."""
    if train < 0 or held_out < 0:
        raise ValueError(f"problem counts must be >= 0, got {train}, {held_out}")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < train + held_out:
        split, index = ("train", len(out)) if len(out) < train else ("test", len(out) - train)
        problem = make_problem(rng, index, split)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            out.append(problem)
    return out[:train], out[train:]


def last_number(text: str) -> int | None:
    numbers = re.findall(r"-?\d[\d,]*", text)
    return int(numbers[-1].replace(",", "")) if numbers else None


def is_correct(text: str, answer: int) -> bool:
    return last_number(text) == answer
