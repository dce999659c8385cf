"""Trajectory collection, packing and the CLLM losses, on tiny random models."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from harness import ar_greedy, tiny_model
from fastchat_cllm.train.losses import ar_loss, consistency_loss
from fastchat_cllm.train.packing import Segment, pack, packed_logits
from fastchat_cllm.train.problems import is_correct, last_number, make_problems
from fastchat_cllm.train.trajectory import (Block, CollectConfig, augment_states,
                                            collect_trajectory, longest_run)

EOS = (2,)


pytestmark = pytest.mark.usefixtures("one_thread")


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 96) for _ in range(rng.randint(3, 12))] for _ in range(count)]


@pytest.mark.parametrize("arch,block", [("llama", 4), ("llama", 8), ("qwen2", 16)])
def test_collection_reproduces_the_ar_greedy_fixed_points(arch, block):
    model = tiny_model(arch)
    config = CollectConfig(block_size=block, max_new_tokens=30, eos_token_id=EOS, max_repeat=0)
    for i, ids in enumerate(prompts(4, seed=block)):
        traj = collect_trajectory(model, str(i), ids, config)
        assert traj.output_ids == ar_greedy(model, ids, 30, EOS)
        assert traj.blocks[0].start == 0
        for block_ in traj.blocks:
            fixed = block_.fixed_point
            assert fixed == traj.output_ids[block_.start: block_.start + len(fixed)]
            assert all(len(s) == len(fixed) and s[0] == fixed[0] for s in block_.states)
            complete = block_ is not traj.blocks[-1] or traj.finish_reason == "length"
            if complete:  # the last forward of a complete block runs its fixed point
                assert block_.states[-1] == fixed
        starts = [b.start for b in traj.blocks]
        assert starts == sorted(starts) and starts[-1] + len(traj.blocks[-1].fixed_point) in (
            len(traj.output_ids), len(traj.output_ids) - 1)


def test_states_are_the_jacobi_iterates():
    """Each state's right prefix only grows, and a state differs from the previous one only
    where the previous forward predicted something new (Jacobi update, shift by one)."""
    model = tiny_model("llama", seed=1)
    config = CollectConfig(block_size=8, max_new_tokens=24, eos_token_id=EOS, max_repeat=0)
    traj = collect_trajectory(model, "x", prompts(1, seed=3)[0], config)
    for block in traj.blocks:
        right = [next((i for i, (a, b) in enumerate(zip(s, block.fixed_point)) if a != b),
                      len(s)) for s in block.states]
        assert right == sorted(right) and right[0] >= 1


def test_augmentation_fixes_some_wrong_tokens_and_keeps_right_ones():
    fixed = [1, 2, 3, 4, 5]
    states = [[1, 9, 9, 9, 9], [1, 2, 9, 3, 9], [1, 2, 3, 4, 5]]
    variants = augment_states(Block(0, fixed, states), 3, random.Random(0))
    assert len(variants) == 6      # 3 per state with >= 2 wrong tokens; none from the fixed point
    for variant, source in zip(variants, [states[0]] * 3 + [states[1]] * 3):
        assert variant not in (source, fixed)
        assert all(v in (s, f) for v, s, f in zip(variant, source, fixed))


def test_degenerate_outputs_are_dropped():
    model = tiny_model("llama")
    ids = prompts(1)[0]
    keep = CollectConfig(block_size=8, max_new_tokens=40, eos_token_id=(), max_repeat=0)
    run = longest_run(collect_trajectory(model, "a", ids, keep).output_ids)
    assert longest_run([5, 5, 7, 7, 7, 5]) == 3
    assert collect_trajectory(model, "a", ids, keep.__class__(8, 40, (), 0, run)) is None
    assert collect_trajectory(model, "a", ids, keep.__class__(8, 40, (), 0, run + 1)) is not None


def test_bad_collect_config_raises():
    with pytest.raises(ValueError):
        CollectConfig(block_size=0)
    with pytest.raises(ValueError):
        CollectConfig(augment=-1)


def separate_logits(model, prefix: list[int], tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prefix + tokens])).logits[0, len(prefix):]


def test_packed_states_see_exactly_their_own_prefix():
    model = tiny_model("llama")
    config = CollectConfig(block_size=6, max_new_tokens=24, eos_token_id=(), max_repeat=0)
    traj = collect_trajectory(model, "p", prompts(1, seed=5)[0], config)
    b1, b2 = traj.blocks[1], traj.blocks[2]
    segments = [Segment(b1.start, b1.states[0]), Segment(b2.start, b2.states[1], student=False),
                Segment(b2.start, b2.states[0], target=1)]
    packed = pack(traj.prompt_ids, traj.output_ids, segments)
    with torch.no_grad():
        logits = packed_logits(model, packed)
    clean = separate_logits(model, [], traj.prompt_ids + traj.output_ids)
    torch.testing.assert_close(logits[: packed.clean_len], clean, atol=1e-5, rtol=0)
    at = packed.clean_len
    for seg in segments:
        prefix = traj.prompt_ids + traj.output_ids[: seg.start]
        n = len(seg.tokens)
        torch.testing.assert_close(logits[at: at + n], separate_logits(model, prefix, seg.tokens),
                                   atol=1e-5, rtol=0)
        at += n
    p = len(traj.prompt_ids)
    n1, n2 = len(b1.states[0]), len(b2.states[0])
    c = packed.clean_len
    # global: the fixed point's positions; local: the next state's positions
    assert packed.student.tolist() == list(range(c, c + n1)) + list(range(c + n1 + n2, c + n1 + 2 * n2))
    assert packed.teacher.tolist() == list(range(p + b1.start, p + b1.start + n1)) + list(
        range(c + n1, c + n1 + n2))


def kl(target_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    t, s = F.log_softmax(target_logits, -1), F.log_softmax(student_logits, -1)
    return (t.exp() * (t - s)).sum(-1)


def test_losses_on_a_hand_built_case():
    """Prompt [1, 10, 11], output [20..27]; block at offset 2 = [22, 23, 24, 25]; the state is
    the fixed point with position 2 wrong, so only block positions >= 2 may differ."""
    model = tiny_model("llama")
    prompt, output = [1, 10, 11], list(range(20, 28))
    state = [22, 23, 90, 25]
    packed = pack(prompt, output, [Segment(2, state)])
    logits = packed_logits(model, packed)
    assert packed.student.tolist() == [11, 12, 13, 14] and packed.teacher.tolist() == [5, 6, 7, 8]
    fixed = separate_logits(model, prompt + output[:2], output[2:6])
    noisy = separate_logits(model, prompt + output[:2], state)
    per_position = kl(fixed, noisy)
    assert per_position[:2].abs().max() < 1e-6 and per_position[2:].min() > 0
    torch.testing.assert_close(consistency_loss(logits, packed), per_position.mean(),
                               atol=1e-6, rtol=1e-5)
    full = separate_logits(model, [], prompt + output)
    expected_ar = F.cross_entropy(full[2:10], torch.tensor(output), label_smoothing=0.1)
    torch.testing.assert_close(ar_loss(logits, packed, 0.1), expected_ar, atol=1e-6, rtol=1e-5)
    # the fixed point itself teaches nothing; gradients reach only the student side
    at_fixed = pack(prompt, output, [Segment(2, output[2:6])])
    assert consistency_loss(packed_logits(model, at_fixed), at_fixed).abs() < 1e-6
    consistency_loss(logits, packed).backward()
    assert model.model.embed_tokens.weight.grad[90].abs().sum() > 0


def test_pack_rejects_a_state_outside_the_output():
    with pytest.raises(ValueError):
        pack([1, 2], [3, 4, 5], [Segment(2, [5, 6])])


def test_problems_are_seeded_distinct_and_scored():
    train, held = make_problems(30, 10, seed=7)
    assert (train, held) == make_problems(30, 10, seed=7)
    assert train != make_problems(30, 10, seed=8)[0]
    texts = [p.prompt for p in train + held]
    assert len(set(texts)) == 40 and all(p.answer > 0 for p in train + held)
    assert last_number("3 + 4 = 7 apples, so 1,200") == 1200 and last_number("none") is None
    assert is_correct("Sam has 12 apples now.", 12) and not is_correct("Sam has 12 + 1.", 12)


def test_code_prompts_are_stdlib_functions_then_methods_and_parse_as_python():
    """The training stubs: every function and method stub is valid Python (a signature and a
    docstring, a method inside its class header); the functions come first in the same order
    whether methods are added or not, so a collection of the functions resumes onto them; no id
    repeats, and HumanEval (the held-out set) is not among them."""
    import ast

    from fastchat_cllm.train.code_prompts import (INSTRUCTION, stdlib_functions, stdlib_methods,
                                                  training_prompts)

    functions, methods = stdlib_functions(), stdlib_methods()
    assert len(functions) > 500 and len(methods) > 500
    for name, stub in functions + methods:
        tree = ast.parse(stub)
        node = tree.body[0]
        if name.count(".") >= 2 and isinstance(node, ast.ClassDef):
            assert name.split(".")[-2] == node.name
            node = node.body[0]
        assert isinstance(node, ast.FunctionDef) and node.name == name.rsplit(".", 1)[1]
        assert len(ast.get_docstring(node).strip()) >= 10
    method = dict(methods)["graphlib.TopologicalSorter.prepare"]
    assert method.startswith("class TopologicalSorter:\n    def prepare(self):\n")
    for _, stub in methods:                  # bound methods only: no staticmethods
        arguments = ast.parse(stub).body[0].body[0].args
        assert (arguments.posonlyargs + arguments.args)[0].arg in ("self", "cls")
    every = training_prompts()
    alone = training_prompts(methods=False)
    assert len(every) == len(functions) + len(methods) and every[: len(alone)] == alone
    assert training_prompts(5) == every[:5] and training_prompts(seed=1) != every
    ids = [r["id"] for r in every]
    assert len(set(ids)) == len(ids) and all(i.startswith("stdlib/") for i in ids)
    assert all(r["prompt"].startswith(INSTRUCTION + "```python\n") for r in every)
    assert not any("humaneval" in i.lower() for i in ids)
