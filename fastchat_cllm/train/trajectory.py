"""Jacobi trajectories: every intermediate state of every block, up to its fixed point.

Built on the engine's reference block semantics (fixed blocks, random initial guesses): a Step
with `block_start` opens a block; the block's state after the forwards so far is the tokens it
has accepted plus the Step's window; its fixed point is the block once every token is final
(= the greedy output at the block's positions). A block cut by EOS keeps its final prefix.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

from ..core import jacobi_stream

# The reference CLLM's Jacobi blocks: fixed windows iterated to their fixed point from random
# guesses. Trajectories are collected with them, and evaluation reports their tokens per forward.
REFERENCE_BLOCKS = dict(adaptive=False, fixed_blocks=True, fill="random")


@dataclass(frozen=True)
class CollectConfig:
    """Options of trajectory collection.

    augment: extra states made from each recorded one by setting a random subset of its wrong
        tokens to their fixed-point values (the reference's data augmentation); 0 = none.
    max_repeat: drop a prompt whose output repeats one token this many times in a row
        (degenerate samples make the model collapse); 0 keeps everything.
    """

    block_size: int = 16
    max_new_tokens: int = 256
    eos_token_id: tuple[int, ...] = ()
    augment: int = 0
    max_repeat: int = 10
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "eos_token_id", tuple(int(t) for t in self.eos_token_id))
        for name in ("block_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("augment", "max_repeat"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Block:
    start: int                      # index in the output of the block's first token
    fixed_point: list[int]          # the block's final tokens (output[start:start + n])
    states: list[list[int]]         # the block before each forward, in order; same length
    augmented: list[list[int]] = field(default_factory=list)


@dataclass
class Trajectory:
    id: str
    prompt_ids: list[int]
    output_ids: list[int]           # the greedy output (EOS included when hit)
    finish_reason: str
    blocks: list[Block]
    tokenizer: dict | None = None   # tokenizer_identity of the tokenizer collect used

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "Trajectory":
        """The trajectory of a collect record; ValueError when its blocks do not fit its output
        (a state of another length than its block, a fixed point that is not the output)."""
        blocks = [Block(**b) for b in record["blocks"]]
        traj = cls(record["id"], record["prompt_ids"], record["output_ids"],
                   record["finish_reason"], blocks, record.get("tokenizer"))
        for i, b in enumerate(blocks):
            n = len(b.fixed_point)
            if b.fixed_point != traj.output_ids[b.start: b.start + n]:
                raise ValueError(f"block {i}'s fixed point is not the output at {b.start}")
            if any(len(s) != n for s in b.states + b.augmented):
                raise ValueError(f"block {i} holds a state whose length is not its {n} tokens")
        return traj

    def largest_id(self) -> int:
        """The largest token id anywhere in the trajectory."""
        states = (t for b in self.blocks for s in b.states + b.augmented for t in s)
        return max((*self.prompt_ids, *self.output_ids, *states), default=0)


def tokenizer_identity(tokenizer) -> dict:
    """What tells two tokenizers apart: vocabulary size and a digest of the vocabulary and the
    EOS token (written into each trajectory; distill refuses a mismatch)."""
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps([vocab, tokenizer.eos_token_id], ensure_ascii=False)
    return {"vocab_size": len(vocab), "digest": hashlib.sha256(text.encode()).hexdigest()[:16]}


def describe(identity: dict) -> str:
    return f"vocabulary {identity.get('vocab_size')}, digest {identity.get('digest')}"


def longest_run(tokens: list[int]) -> int:
    """Length of the longest run of one repeated token."""
    best = run = 0
    for i, tok in enumerate(tokens):
        run = run + 1 if i and tok == tokens[i - 1] else 1
        best = max(best, run)
    return best


def record_blocks(model, prompt_ids: list[int], config: CollectConfig):
    """(output, blocks, finish_reason) of one fixed-block Jacobi run from random guesses."""
    output: list[int] = []
    blocks: list[Block] = []
    accepted: list[int] = []        # tokens the current block has made final so far
    step = None
    for step in jacobi_stream(model, prompt_ids, max_new_tokens=config.max_new_tokens,
                              window_size=config.block_size, eos_token_id=config.eos_token_id,
                              seed=config.seed, **REFERENCE_BLOCKS):
        if step.window and step.block_start:
            # window[0] is the newest final token, already the last of `output`
            blocks.append(Block(len(output) - 1, [], []))
            accepted = []
        if step.window:
            blocks[-1].states.append(accepted + step.window)
            accepted = accepted + step.window[: step.accepted]
        output.extend(step.tokens)
    for block in blocks:
        size = len(block.states[0])
        block.fixed_point = output[block.start: block.start + size]
        block.states = [state[: len(block.fixed_point)] for state in block.states]
    return output, blocks, step.finish_reason


def augment_states(block: Block, count: int, rng: random.Random) -> list[list[int]]:
    """`count` variants of each state with some of its wrong tokens set to the fixed point."""
    out = []
    for state in block.states:
        wrong = [i for i, (s, f) in enumerate(zip(state, block.fixed_point)) if s != f]
        if len(wrong) < 2:
            continue  # fixing any wrong token would give the fixed point itself
        for _ in range(count):
            fixed = rng.sample(wrong, rng.randint(1, len(wrong) - 1))
            variant = list(state)
            for i in fixed:
                variant[i] = block.fixed_point[i]
            out.append(variant)
    return out


def collect_trajectory(model, prompt_id: str, prompt_ids: list[int],
                       config: CollectConfig) -> Trajectory | None:
    """The trajectory of one prompt, or None when its output is degenerate (a long run)."""
    output, blocks, reason = record_blocks(model, prompt_ids, config)
    if config.max_repeat and longest_run(output) >= config.max_repeat:
        return None
    rng = random.Random(f"{config.seed}:{prompt_id}")
    for block in blocks:
        block.augmented = augment_states(block, config.augment, rng) if config.augment else []
    return Trajectory(prompt_id, list(prompt_ids), output, reason, blocks)
