"""Prompt-lookup guesses: what the context lookup proposes, that decoding stays exact with them
(greedy and sampled, alone and batched), that fixed blocks ignore them, and what they gain on a
real model's copying."""
from __future__ import annotations

import pytest
import torch

from harness import ARCHITECTURES, chat_ids, tiny_greedy, tiny_model
from fastchat_cllm import JacobiConfig, jacobi_generate
from fastchat_cllm.core.engine import Engine
from fastchat_cllm.core.engine.engine import widest
from fastchat_cllm.core.guesses import Context, window_guesses


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence_of_the_suffix():
    context = Context([1, 2, 3, 4, 1, 2, 3], seed=0, lookup=3)
    assert context.lookup(3) == [4, 1, 2]              # (1, 2, 3) at 0..2 -> from position 3
    assert context.lookup(10) == [4, 1, 2, 3]          # up to the end of the context
    context.extend([9])
    assert context.lookup(3) == []                     # (2, 3, 9), (3, 9) never occurred before
    context.extend([1, 2])                             # (9, 1, 2)? no; (1, 2): latest at 4..5
    assert context.lookup(2) == [3, 9]
    latest = Context([7, 8, 5, 7, 8, 6, 7, 8], seed=0, lookup=2)
    assert latest.lookup(1) == [6]                     # the latest earlier occurrence wins
    longest = Context([3, 4, 5, 0, 4, 5, 1, 3, 4, 5], seed=0, lookup=3)
    assert longest.lookup(1) == [0]                    # (3, 4, 5) before (4, 5)
    assert Context([1, 2, 1, 2], seed=0).lookup(3) == []    # lookup 0: off
    assert Context([1, 2, 1, 2], seed=0, lookup=3).lookup(0) == []


def test_a_lookup_replaces_the_carried_guesses_and_fills_the_rest():
    context = Context([5, 6, 7, 8, 5, 6], seed=0, lookup=3)
    assert window_guesses("lookup", context, 6, [1, 1, 1], 3) == [7, 8, 5]
    assert window_guesses("lookup", context, 6, [1], 5) == [7, 8, 5, 6, 7]   # then bigrams
    fresh = Context([5, 6, 7, 8], seed=0, lookup=3)
    assert window_guesses("lookup", fresh, 8, [2, 3], 2) == [2, 3]           # no match: Jacobi's


def test_bad_lookup_settings_are_refused():
    for bad in (dict(prompt_lookup=1), dict(prompt_lookup=-1), dict(prompt_lookup=17),
                dict(lookup_window=0)):
        with pytest.raises(ValueError):
            JacobiConfig(**bad)
    assert JacobiConfig(prompt_lookup=0).prompt_lookup == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("options", [dict(), dict(window_size=4, adaptive=False),
                                     dict(lookup_window=1), dict(prompt_lookup=2, window_size=8),
                                     dict(prompt_lookup=5, lookup_window=6)])
def test_greedy_output_stays_exact_with_lookup_guesses(arch, options, one_thread):
    """A repetitive prompt makes the lookup propose often (right and wrong)."""
    model = tiny_model(arch)
    ids = (torch.arange(3, 40) % 7 + 3).reshape(1, -1)
    expected = tiny_greedy(arch, ids, 64)
    out = jacobi_generate(model, ids, max_new_tokens=64, **options)
    assert out.tokens == expected
    alone = jacobi_generate(model, ids, max_new_tokens=64, **{**options, "prompt_lookup": 0})
    assert alone.tokens == expected
    assert out.stats.forwards < alone.stats.forwards   # the model repeats; the lookup follows


def test_sampled_text_is_the_seeds_with_or_without_lookup(one_thread):
    """Gumbel acceptance fixes each position's noise: the guesses change only the speed."""
    model = tiny_model("llama")
    ids = [1] + [3, 4, 5, 6] * 5
    texts = [jacobi_generate(model, ids, max_new_tokens=48, temperature=0.8, top_p=0.9, seed=4,
                             prompt_lookup=lookup).tokens for lookup in (0, 2, 3)]
    assert texts[0] == texts[1] == texts[2]


def test_fixed_blocks_ignore_the_lookup(one_thread):
    model = tiny_model("qwen2")
    ids = [1] + [3, 4, 5, 6] * 5
    runs = [jacobi_generate(model, ids, max_new_tokens=32, window_size=8, adaptive=False,
                            fixed_blocks=True, fill="random", prompt_lookup=lookup)
            for lookup in (0, 3)]
    assert runs[0].tokens == runs[1].tokens
    assert runs[0].stats.accepted_per_forward == runs[1].stats.accepted_per_forward


def test_a_batch_with_lookup_gives_each_request_its_greedy_output(one_thread):
    """In a batch the lookup's guesses fill a request's window (the accepted counts differ from
    Jacobi's own guesses'), and a window grows past the batch's width to take a longer
    proposal (lookup_window 1: never, every row the batch's width), each output still its
    greedy one."""
    model = tiny_model("mistral")
    prompts = [[1] + [3 + i, 4, 5, 6] * 4 for i in range(3)] + [[1, 9, 8, 7]]
    expected = [tiny_greedy("mistral", p, 40) for p in prompts]
    accepted, uneven = {}, {}
    for lookup, window in ((3, 16), (3, 1), (0, 16)):
        engine = Engine(model, slots=4, max_len=128)
        ids = [engine.add(p, JacobiConfig(max_new_tokens=40, prompt_lookup=lookup,
                                          lookup_window=window)) for p in prompts]
        outputs = {i: [] for i in ids}
        uneven[lookup, window] = 0       # steps whose windows (of rows not near their budget)
        while engine.has_work:           # differ in width
            steps = engine.step()
            widths = {len(step.window) for request_id, step in steps
                      if step.window and len(outputs[request_id]) + 16 < 40}
            uneven[lookup, window] += len(widths) > 1
            for request_id, step in steps:
                outputs[request_id] += step.tokens
                accepted[lookup, window, request_id] = step.stats.accepted_per_forward
        assert [outputs[i] for i in ids] == expected
    assert any(accepted[3, 1, i] != accepted[0, 16, i] for i in ids)
    assert uneven[3, 1] == uneven[0, 16] == 0 < uneven[3, 16]


def test_a_forward_with_a_grown_window_does_not_price_the_batchs_width(one_thread):
    """The engine prices forwards by rows and widest window; a row a lookup widened past every
    other row is not what every row that wide costs, so such a forward leaves the batch's cost
    as it was, while the batch's other forwards of two rows or more move it."""
    model = tiny_model("mistral")
    engine = Engine(model, slots=4, max_len=128)
    for p in [[1] + [3 + i, 4, 5, 6] * 4 for i in range(3)] + [[1, 9, 8, 7]]:
        engine.add(p, JacobiConfig(max_new_tokens=40))
    engine.step()                                       # all prefilled: windows next
    priced = {True: 0, False: 0}
    while engine.has_work:
        _, windows = engine.scheduler.schedule()
        grown = widest(windows, grown=True) > widest(windows, grown=False)
        before = dict(engine.cost.narrow.seconds), dict(engine.cost.factor.seconds)
        engine.run(windows, priced=True)
        after = dict(engine.cost.narrow.seconds), dict(engine.cost.factor.seconds)
        if len(windows) > 1:
            assert (after == before) is grown
            priced[grown] += 1
        engine.scheduler.release_finished()
    assert priced[True] and priced[False]


def test_smollm2_copies_faster_with_lookup_and_stays_exact(smollm2):
    """A real model asked to fix a typo copies the code: lookup guesses make far more tokens
    final per forward than Jacobi's own guesses, and adaptive windows grow to take them."""
    from harness import ar_greedy

    model, tokenizer = smollm2
    code = ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
            "def mul(a, b):\n    retrun a * b\n")
    ids = chat_ids(tokenizer, "Fix the typo in this code and reply with the whole corrected "
                              f"code:\n\n```python\n{code}```")
    eos = [tokenizer.eos_token_id]
    expected = ar_greedy(model, ids, 80, eos=eos)
    runs = {name: jacobi_generate(model, ids, max_new_tokens=80, eos_token_id=eos, **options)
            for name, options in {"off": dict(prompt_lookup=0), "on": dict(),
                                  "narrow": dict(lookup_window=1)}.items()}
    assert all(run.tokens == expected for run in runs.values())
    tpf = {name: run.stats.tokens_per_forward for name, run in runs.items()}
    assert tpf["on"] > 3 * tpf["off"] and tpf["on"] > 1.3 * tpf["narrow"]   # 4.7, 1.1, 2.8
    assert max(runs["on"].stats.window_sizes) > max(runs["narrow"].stats.window_sizes)


def test_worker_flags_set_the_lookup_and_refuse_bad_sizes(capsys):
    from fastchat_cllm.serving.options import jacobi_config
    from fastchat_cllm.serving.worker import build_parser

    parser = build_parser()
    default = jacobi_config(parser, parser.parse_args([]))
    assert (default.prompt_lookup, default.lookup_window) == (3, 16)
    config = jacobi_config(parser, parser.parse_args(["--prompt-lookup", "0",
                                                      "--lookup-window", "4"]))
    assert (config.prompt_lookup, config.lookup_window) == (0, 4)
    with pytest.raises(SystemExit):
        jacobi_config(parser, parser.parse_args(["--prompt-lookup", "1"]))
    assert "prompt_lookup must be in" in capsys.readouterr().err
