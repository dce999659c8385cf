"""The batched engine (issue 13): every request in a batch gets exactly its solo output.

Greedy requests equal transformers' greedy generate (fp64 tiny models of each architecture,
and SmolLM2 fp32 up to near-ties); requests join and leave at different forwards, outnumber
the slots, end at EOS inside a window; a long prompt is prefilled in chunks while others keep
decoding; a seeded sample does not depend on its neighbours; rollback never moves storage; a
fault in one request's verification fails it alone, a failed forward only the requests in it.
"""
from __future__ import annotations

import ast
from unittest import mock

import pytest
import torch

from harness import ROOT, ar_greedy, tiny_greedy, tiny_model
from fastchat_cllm import JacobiConfig, jacobi_generate
from fastchat_cllm.core.engine import Engine, Failure, runner
from fastchat_cllm.core.engine.request import Request
from fastchat_cllm.core.engine.runner import REFUSALS, Row
from fastchat_cllm.core.step import Step

F64 = torch.float64
WINDOWS = {"w1": dict(window_size=1, adaptive=False), "w4": dict(window_size=4, adaptive=False),
           "w16": dict(window_size=16, adaptive=False), "adaptive": dict(window_size=16)}
# (prompt length, max_new_tokens, engine step at which the request arrives)
ARRIVALS = ((1, 37, 0), (9, 50, 0), (40, 23, 2), (70, 30, 5), (5, 44, 5))


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_new_token(tokens: list[int], after: int) -> int:
    """An index i > after whose token does not occur before it (an EOS that ends there)."""
    return next(i for i, tok in enumerate(tokens) if i > after and tok not in tokens[:i])


def drain(engine: Engine, arrivals: dict[int, list[tuple[list[int], JacobiConfig]]]):
    """Run `engine`, adding arrivals[s] before step s; per request id: its Steps, and per step
    the ids that got one. Returns (ids in arrival order, steps by id, ids by engine step)."""
    order, steps, served, number = [], {}, [], 0
    while engine.has_work or number <= max(arrivals):
        for prompt_ids, config in arrivals.get(number, []):
            order.append(engine.add(prompt_ids, config))
            steps[order[-1]] = []
        made = engine.step()
        for request_id, step in made:
            steps[request_id].append(step)
        served.append({request_id for request_id, _ in made})
        number += 1
    return order, steps, served


def tokens_of(steps) -> list[int]:
    return [tok for step in steps for tok in step.tokens]


@pytest.fixture(scope="module")
def model(tiny_f64):
    return tiny_f64


@pytest.mark.parametrize("window", WINDOWS)
def test_every_request_equals_its_solo_greedy(arch, model, window):
    """Five requests, three slots: they queue, join at different forwards, prefill in chunks,
    and finish at different forwards, one at an EOS inside a window."""
    expected, arrivals = [], {}
    for seed, (length, max_new, at) in enumerate(ARRIVALS):
        ids = prompt(length, seed)
        eos = ()
        if seed == 1:            # this one stops at an EOS instead of its token budget
            free = tiny_greedy(arch, ids, max_new, dtype=F64)
            eos = (free[first_new_token(free, 6)],)
        expected.append(tiny_greedy(arch, ids, max_new, eos=eos, dtype=F64))
        config = JacobiConfig(max_new_tokens=max_new, eos_token_id=eos, **WINDOWS[window])
        arrivals.setdefault(at, []).append((ids, config))
    engine = Engine(model, slots=3, max_len=160, chunk=16)
    order, steps, _ = drain(engine, arrivals)
    for request_id, want, (_, max_new, _) in zip(order, expected, ARRIVALS):
        got = steps[request_id]
        assert tokens_of(got) == want
        assert [s.finish_reason for s in got[:-1]] == [None] * (len(got) - 1)
        assert got[-1].finish_reason == ("length" if len(want) == max_new else "stop")
        assert got[-1].stats.tokens == len(want)
    stopped = steps[order[1]][-1]
    assert stopped.finish_reason == "stop" and len(expected[1]) < ARRIVALS[1][1]
    if WINDOWS[window]["window_size"] > 1 and not WINDOWS[window].get("adaptive", True):
        assert len(stopped.window) > len(stopped.tokens)    # guesses after the EOS dropped
    assert not engine.has_work and not engine.scheduler.running


def test_long_prompt_is_prefilled_in_chunks_while_another_decodes(arch, model, one_thread):
    short, long = prompt(6, 11), prompt(100, 12)
    engine = Engine(model, slots=2, max_len=200, chunk=8)
    config = JacobiConfig(max_new_tokens=40, window_size=4, adaptive=False)
    with mock.patch.object(engine.runner, "run", wraps=engine.runner.run) as run:
        order, steps, served = drain(engine, {0: [(short, config)], 2: [(long, config)]})
    a, b = order
    first_b = next(i for i, ids in enumerate(served) if b in ids)
    assert first_b == 2 + 100 // 8 + (100 % 8 > 0) - 1      # 13 chunks, the last gives a token
    assert all(a in served[i] for i in range(2, first_b + 1))  # never stalled by the prefill
    widths = [max(len(row.tokens) for row in call.args[0]) for call in run.call_args_list]
    assert max(widths) == 8                                   # no row longer than a chunk
    assert run.call_count == len(served)                      # one forward a step: the chunk
    packed = [len(call.args[0]) for call in run.call_args_list[2: first_b + 1]]  # and a's
    assert packed == [2] * (first_b - 1)                                          # window
    assert tokens_of(steps[a]) == tiny_greedy(arch, short, 40, dtype=F64)
    assert tokens_of(steps[b]) == tiny_greedy(arch, long, 40, dtype=F64)


@pytest.mark.parametrize("acceptance", ["gumbel", "speculative"])
def test_seeded_sample_is_the_same_with_or_without_neighbours(model, acceptance, one_thread):
    sampled = JacobiConfig(max_new_tokens=30, window_size=4, adaptive=False, temperature=0.9,
                           top_p=0.95, repetition_penalty=1.1, seed=7, acceptance=acceptance,
                           logprobs=2)
    ids = prompt(12, 21)
    alone = Engine(model, slots=1, max_len=128)
    _, steps, _ = drain(alone, {0: [(ids, sampled)]})
    solo = tokens_of(next(iter(steps.values())))
    neighbours = {0: [(prompt(30, 22), JacobiConfig(max_new_tokens=9, window_size=16)),
                      (prompt(3, 23), sampled.with_(seed=8))],
                  1: [(ids, sampled)]}
    order, steps, _ = drain(Engine(model, slots=3, max_len=128, chunk=8), neighbours)
    assert tokens_of(steps[order[2]]) == solo
    assert tokens_of(steps[order[1]]) != solo                 # the other seed samples otherwise
    reference = jacobi_generate(model, ids, sampled)         # the one-request API agrees
    assert reference.tokens == solo
    got = [lp for step in steps[order[2]] for lp in step.logprobs]
    assert [lp.token for lp in got] == solo
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in reference.logprobs],
                                                       abs=1e-9)


def test_prompt_logprobs_across_chunks(model, one_thread):
    ids = prompt(21, 31)
    config = JacobiConfig(max_new_tokens=5, logprobs=1, prompt_logprobs=True)
    _, steps, _ = drain(Engine(model, slots=1, max_len=64, chunk=4), {0: [(ids, config)]})
    got = next(iter(steps.values()))[0].prompt_logprobs
    want = jacobi_generate(model, ids, config).prompt_logprobs
    assert [lp.token for lp in got] == ids[1:] == [lp.token for lp in want]
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in want], abs=1e-9)


class Prefills:
    """Records the size of every prompt chunk the engine schedules."""

    def __init__(self):
        self.sizes: list[int] = []
        original = Request.prefill_row

        def spy(request, budget):
            row = original(request, budget)
            self.sizes.append(len(row.tokens))
            return row
        self.patch = mock.patch.object(Request, "prefill_row", spy)

    def __enter__(self):
        self.patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self.patch.__exit__(*exc)


def test_a_prompt_starts_from_the_prefix_a_slot_holds(arch, model):
    """Prefix caching: a finished request's slot keeps what it holds; the next turn of its chat
    prefills only what is new, a request sharing a system prompt copies that prefix from a
    running request's slot, and every answer stays exactly its solo greedy one."""
    engine = Engine(model, slots=3, max_len=200, chunk=16)
    config = JacobiConfig(max_new_tokens=20, window_size=4, adaptive=False)
    system = prompt(30, 61)
    first = system + prompt(5, 62)
    order, steps, _ = drain(engine, {0: [(first, config)]})
    answer = tokens_of(steps[order[0]])
    assert answer == tiny_greedy(arch, first, 20, dtype=F64)
    held = len(first) + len(answer) - 1        # the last token was made, never run
    turn = first + answer + prompt(6, 63)       # the chat's next turn
    other, third = system + prompt(8, 64), system + prompt(3, 65)
    before = (engine.totals.prompt_tokens, engine.totals.cached_tokens)
    with Prefills() as chunks:
        order, steps, _ = drain(engine, {0: [(turn, config), (other, config)], 3: [(third, config)]})
    for request_id, ids in zip(order, (turn, other, third)):
        assert tokens_of(steps[request_id]) == tiny_greedy(arch, ids, 20, dtype=F64)
    # the turn finds its whole history in slot 0; `other` copies the system prompt from it;
    # `third` (arriving as both decode) copies it from a running slot
    assert chunks.sizes == [len(turn) - held, len(other) - 30, len(third) - 30]
    assert engine.totals.prompt_tokens - before[0] == len(turn) + len(other) + len(third)
    assert engine.totals.cached_tokens - before[1] == held + 30 + 30


def test_a_slot_is_cut_back_to_a_shared_prefix_and_the_least_recently_freed_is_evicted(arch,
                                                                                       model):
    engine = Engine(model, slots=2, max_len=96)
    config = JacobiConfig(max_new_tokens=8, window_size=4, adaptive=False)
    a, b, c = prompt(20, 81), prompt(12, 82), prompt(9, 83)
    cut = a[:10] + prompt(5, 84)                  # shares a's first 10 tokens, then differs
    sizes = []
    for ids in (a, b, a, c, a, cut):
        with Prefills() as chunks:
            order, steps, _ = drain(engine, {0: [(ids, config)]})
        assert tokens_of(steps[order[0]]) == tiny_greedy(arch, ids, 8, dtype=F64)
        sizes += chunks.sizes
    # a: slot 0; b: slot 1; a again: its last token only; c evicts b (freed before a), so a
    # is still held; `cut` copies their 10 shared tokens into c's slot, now the least recent
    assert sizes == [20, 12, 1, 9, 1, 5]
    assert engine.cache.ids[1] == cut + tokens_of(steps[order[0]])[:-1]
    assert engine.cache.ids[0][:20] == a
    alone = Engine(model, slots=1, max_len=96)    # one slot: cut back where it is
    for ids, size in ((a, 20), (cut, 5)):
        with Prefills() as chunks:
            order, steps, _ = drain(alone, {0: [(ids, config)]})
        assert tokens_of(steps[order[0]]) == tiny_greedy(arch, ids, 8, dtype=F64)
        assert chunks.sizes == [size]
    assert alone.cache.ids[0] == cut + tokens_of(steps[order[0]])[:-1]


def test_prefix_caching_off_and_prompt_logprobs_prefill_the_whole_prompt(arch, model):
    config = JacobiConfig(max_new_tokens=8, window_size=4, adaptive=False)
    ids = prompt(20, 71)
    for engine, asks in ((Engine(model, slots=2, max_len=96, prefix_cache=False), config),
                         (Engine(model, slots=2, max_len=96), config.with_(logprobs=1,
                                                                             prompt_logprobs=True))):
        with Prefills() as chunks:
            for _ in range(2):
                order, steps, _ = drain(engine, {0: [(ids, asks)]})
                assert tokens_of(steps[order[0]]) == tiny_greedy(arch, ids, 8, dtype=F64)
        assert chunks.sizes == [20, 20] and engine.totals.cached_tokens == 0
    engine = Engine(model, slots=2, max_len=96)     # on: the same prompt again runs its last
    with Prefills() as chunks:                      # token only
        for _ in range(2):
            order, steps, _ = drain(engine, {0: [(ids, config)]})
            assert tokens_of(steps[order[0]]) == tiny_greedy(arch, ids, 8, dtype=F64)
    assert chunks.sizes == [20, 1] and engine.totals.cached_tokens == 19


def test_rollback_moves_lengths_not_storage(arch, model):
    engine = Engine(model, slots=2, max_len=128, chunk=16)
    before = engine.cache.storage_pointers()
    config = JacobiConfig(max_new_tokens=40, window_size=16, adaptive=False)
    order, steps, _ = drain(engine, {0: [(prompt(20, 41), config), (prompt(7, 42), config)]})
    rejected = sum(len(s.window) - s.accepted for got in steps.values() for s in got if s.window)
    assert rejected > 100                                     # many guesses rolled back
    assert engine.cache.storage_pointers() == before
    for request_id, (length, seed) in zip(order, ((20, 41), (7, 42))):
        assert tokens_of(steps[request_id]) == tiny_greedy(arch, prompt(length, seed), 40,
                                                           dtype=F64)


def test_cancel_frees_a_slot_and_the_rest_stay_exact(arch, model):
    """Cancelling the middle slot leaves a gap (rows of slots 0 and 2 read gathered keys);
    a later request fills it."""
    engine = Engine(model, slots=3, max_len=96)
    config = JacobiConfig(max_new_tokens=20, window_size=4, adaptive=False)
    seeds = (51, 52, 53, 54)
    a, b, c = (engine.add(prompt(5 + s % 7, s), config) for s in seeds[:3])
    made = engine.step()
    assert [request_id for request_id, _ in made] == [a, b, c]
    assert engine.cancel(b) and not engine.cancel(b)
    assert sorted(engine.scheduler.running) == [0, 2]
    out = {a: [made[0][1]], c: [made[2][1]]}
    for request_id, step in engine.step() + engine.step():      # slots 0 and 2 only
        out[request_id].append(step)
    d = engine.add(prompt(5 + seeds[3] % 7, seeds[3]), config)
    out[d] = []
    while engine.has_work:
        for request_id, step in engine.step():
            out[request_id].append(step)
    for request_id, seed in zip((a, c, d), seeds[::2] + seeds[3:]):
        want = tiny_greedy(arch, prompt(5 + seed % 7, seed), 20, dtype=F64)
        assert tokens_of(out[request_id]) == want


def test_a_fault_in_one_requests_verification_fails_it_alone(arch, model):
    """A logit bias past the vocabulary (which the worker's edge refuses) makes the request's
    first verification raise, at the end of its chunked prefill while another decodes and a
    third joins: it alone fails and leaves its slot; the others stay exact."""
    config = JacobiConfig(max_new_tokens=30, window_size=4, adaptive=False)
    bad = config.with_(logit_bias=((96, 1.0),))
    ids = [prompt(9, 71), prompt(30, 72), prompt(4, 73)]
    engine = Engine(model, slots=3, max_len=96, chunk=8)
    order, steps, _ = drain(engine, {0: [(ids[0], config), (ids[1], bad)], 2: [(ids[2], config)]})
    assert len(steps[order[1]]) == 1 and isinstance(steps[order[1]][0], Failure)
    assert "outside the vocabulary" in str(steps[order[1]][0].error)
    for request_id, prompt_ids in zip(order[::2], ids[::2]):
        assert tokens_of(steps[request_id]) == tiny_greedy(arch, prompt_ids, 30, dtype=F64)
    assert not engine.has_work and not engine.scheduler.running
    assert engine.totals.tokens == sum(s.accepted for got in steps.values() for s in got
                                       if isinstance(s, Step) and s.window)
    with pytest.raises(ValueError, match="outside the vocabulary"):    # the one-request API
        jacobi_generate(model, ids[1], bad)


def test_a_failed_forward_fails_its_requests_and_the_engine_serves_on(arch, model):
    """A token id past the embedding makes the forward of its prompt chunk raise, with the other
    prompt's chunk packed beside it: the rows run again one by one, and only the bad one fails;
    the one waiting for a slot, and one added later, are served exactly."""
    config = JacobiConfig(max_new_tokens=20, window_size=4, adaptive=False)
    good, waiting, later = prompt(6, 81), prompt(11, 82), prompt(7, 83)
    before = model.config._attn_implementation
    engine = Engine(model, slots=2, max_len=64, chunk=32)
    order, steps, _ = drain(engine, {0: [(good, config), ([5, 10 ** 6, 7], config),
                                         (waiting, config)], 3: [(later, config)]})
    bad = order[1]
    assert [type(s) for s in steps[bad]] == [Failure]
    assert isinstance(steps[bad][0].error, IndexError)
    for request_id, prompt_ids in zip([order[0], *order[2:]], (good, waiting, later)):
        assert tokens_of(steps[request_id]) == tiny_greedy(arch, prompt_ids, 20, dtype=F64)
    assert not engine.has_work and not engine.scheduler.running
    assert model.config._attn_implementation == before      # restored after the failures


def test_packed_rows_give_each_row_its_own_logits(model):
    """Rows of mixed lengths, in shuffled order, over slots that are not consecutive: each row's
    logits equal a plain forward of its slot's ids and its own tokens."""
    engine = Engine(model, slots=5, max_len=64)
    for slot, length in ((0, 7), (1, 12), (3, 4), (4, 9)):
        engine.runner.run([Row(slot, prompt(length, 100 + slot), range(0))])
    rows = [Row(4, prompt(3, 110), range(3)), Row(0, prompt(1, 111), range(1)),
            Row(3, prompt(3, 112), range(1, 3)), Row(1, prompt(5, 113), range(0)),
            Row(2, prompt(2, 114), range(2))]                # slot 2 starts empty
    held = {row.slot: list(engine.cache.ids[row.slot]) for row in rows}
    out = engine.runner.run(rows)
    for row, logits in zip(rows, out.logits):
        ids = held[row.slot] + row.tokens
        with torch.inference_mode():
            want = model(input_ids=torch.tensor([ids])).logits[0, len(held[row.slot]):]
        assert logits.shape[0] == len(row.keep)
        assert torch.allclose(logits, want[list(row.keep)].float(), atol=1e-6)
        assert engine.cache.ids[row.slot] == ids


def test_the_compiled_step_equals_the_eager_one(arch, model):
    """compile=True (the worker's --compile): the step is compiled when the engine is built, and
    then no step compiles again or runs eagerly (one graph runs them all); every request gets its solo
    greedy output with windows of 1 (alone, a step of one token: run as two), 4 and adaptive,
    requests joining and leaving; a one-token step with no room for its copy runs eagerly, and
    so does a step the graph's guards refuse (the model in training mode), counted; refused
    REFUSALS times in a row, the runner stays eager."""
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine = Engine(model, slots=3, max_len=160, chunk=16, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert not any(engine.cache.ids)
    one = mock.patch.object(engine.runner, "run_one_token", wraps=engine.runner.run_one_token)
    with one as run_one_token:
        for window in ("w1", "w4", "adaptive"):
            expected, arrivals = [], {}
            for seed, (length, max_new, at) in enumerate(ARRIVALS):
                ids = prompt(length, seed)
                expected.append(tiny_greedy(arch, ids, max_new, dtype=F64))
                config = JacobiConfig(max_new_tokens=max_new, **WINDOWS[window])
                arrivals.setdefault(at, []).append((ids, config))
            order, steps, _ = drain(engine, arrivals)
            assert [tokens_of(steps[i]) for i in order] == expected, window
        assert run_one_token.call_count > 10
        engine.cache.clear(0)
        held = prompt(159, 7)
        with mock.patch.object(runner, "_decode", wraps=runner._decode) as decoded:
            engine.runner.run([Row(0, held, range(0))])
        assert decoded.call_count == 1       # once a step, not once a layer
        last = engine.runner.run([Row(0, [5], range(1))]).logits[0]     # position 159 of 160
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([held + [5]])).logits[0, -1:]
    assert torch.allclose(last, want.float(), atol=1e-6)
    assert engine.cache.ids[0] == held + [5] and engine.runner.compiled is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    assert engine.runner.eager_steps == 0
    model.train()            # a guard of the graph fails: the step runs eagerly, and counts
    try:
        engine.cache.clear(1)
        out = engine.runner.run([Row(1, [7, 8, 9], range(3))]).logits[0]
        assert engine.runner.eager_steps == 1 and engine.runner.compiled is not None
        for _ in range(REFUSALS - 1):            # refused this often in a row: stays eager
            engine.runner.run([Row(2, [7, 8], range(1))])
            engine.cache.clear(2)
    finally:
        model.eval()
    with torch.inference_mode():
        want = model(input_ids=torch.tensor([[7, 8, 9]])).logits[0]
    assert torch.allclose(out, want.float(), atol=1e-6) and engine.cache.ids[1] == [7, 8, 9]
    assert engine.runner.eager_steps == REFUSALS and engine.runner.compiled is None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1


def test_a_forward_that_fails_after_the_model_call_commits_nothing(arch, model):
    """A packed forward whose logits cannot be read back (as a device out of memory for their
    copy could) after the model wrote the cache: nothing was committed, its rows run again one
    by one from the same cache, and every answer stays exact."""
    engine = Engine(model, slots=3, max_len=96, chunk=8)
    config = JacobiConfig(max_new_tokens=12, window_size=4, adaptive=False)
    ids = [prompt(n, 120 + n) for n in (5, 9, 14)]
    real, calls = engine.runner.forward, []

    class Unreadable:
        def __getitem__(self, index):
            if index == 0:
                return self
            raise RuntimeError("lost the logits")

    def flaky(*args):
        logits = real(*args)
        calls.append(len(calls))
        return Unreadable() if len(calls) == 3 else logits
    engine.runner.forward = flaky
    order, steps, _ = drain(engine, {0: [(i, config) for i in ids]})
    for request_id, prompt_ids in zip(order, ids):
        assert tokens_of(steps[request_id]) == tiny_greedy(arch, prompt_ids, 12, dtype=F64)
    assert len(calls) > 3


def test_expanded_key_heads_attend_as_grouped_query_attention():
    """CUDA's path (keys/values repeated per query head) equals SDPA's own GQA (the CPU's)."""
    from fastchat_cllm.core.engine.runner import expand_heads

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=F64) for shape in
               ((2, 6, 3, 8), (2, 2, 11, 8), (2, 2, 11, 8)))
    mask = torch.rand(2, 1, 3, 11, generator=g) < 0.7
    mask[..., 0] = True
    attend = torch.nn.functional.scaled_dot_product_attention
    assert torch.allclose(attend(q, expand_heads(k, 6), expand_heads(v, 6), attn_mask=mask),
                          attend(q, k, v, attn_mask=mask, enable_gqa=True), atol=1e-12)


def test_a_model_whose_attention_cannot_be_set_is_refused(model):
    broken = tiny_model("llama", F64)
    broken.set_attn_implementation = lambda *args, **kwargs: None   # as a class that cannot
    with pytest.raises(ValueError, match="AttentionInterface"):
        Engine(broken, slots=1, max_len=16)


def test_an_eager_model_is_served_and_left_eager(one_thread):
    """The engine's forwards use its packed attention whatever the model's implementation, and
    leave the model as it was (its own calls still run eager attention)."""
    model = tiny_model("qwen2", dtype=F64)
    model.set_attn_implementation("eager")
    config = JacobiConfig(max_new_tokens=25, window_size=4, adaptive=False)
    ids = [prompt(n, 60 + n) for n in (3, 17, 40)]
    order, steps, _ = drain(Engine(model, slots=2, max_len=96, chunk=8),
                            {0: [(i, config) for i in ids]})
    for request_id, prompt_ids in zip(order, ids):
        assert tokens_of(steps[request_id]) == tiny_greedy("qwen2", prompt_ids, 25, dtype=F64)
    assert model.config._attn_implementation == "eager"
    assert ar_greedy(model, ids[0], 25) == tiny_greedy("qwen2", ids[0], 25, dtype=F64)


def test_engine_imports_no_fastchat():
    for path in (ROOT / "fastchat_cllm" / "core" / "engine").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] == "fastchat" for n in names), path


def test_refusals(one_thread):
    model = tiny_model("mistral")                             # sliding window 4096
    with pytest.raises(ValueError, match="sliding window"):
        Engine(model, slots=1, max_len=8192)
    engine = Engine(model, slots=1, max_len=32)
    with pytest.raises(ValueError, match="max_len"):
        engine.add(prompt(20, 1), JacobiConfig(max_new_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        engine.add([], JacobiConfig())


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.slow
def test_smollm2_bench_prompts_together_equal_solo(smollm2):
    """fp32: a batched forward may flip a near-tie; any difference must be one (gap < 1e-4)."""
    from fastchat_cllm.bench.prompts import builtin_prompts, encode

    model, tokenizer = smollm2
    torch.set_num_threads(2)
    eos = (tokenizer.eos_token_id,)
    prompts = [encode(tokenizer, p) for p in builtin_prompts()[:4]]
    config = JacobiConfig(max_new_tokens=32, eos_token_id=eos)
    order, steps, _ = drain(Engine(model, slots=4, max_len=512), {0: [(p, config)
                                                                       for p in prompts]})
    for request_id, ids in zip(order, prompts):
        want, got = ar_greedy(model, ids, 32, eos=eos), tokens_of(steps[request_id])
        at = first_difference(got, want)
        if at is None:
            assert got == want
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids + want[:at]])).logits[0, -1].float()
        top2 = logits.topk(2).values
        assert float(top2[0] - top2[1]) < 1e-4, f"prompt {request_id}: real divergence at {at}"
