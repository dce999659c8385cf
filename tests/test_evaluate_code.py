"""The code evaluation command on tiny models (2 held-out prompts, 16 tokens) and its HumanEval
pass@1 harness on known answers."""
from __future__ import annotations

import json

import pytest

from harness import save_adapter, tiny_folder
from fastchat_cllm import loading
from fastchat_cllm.train import evaluate_code
from fastchat_cllm.train.code_prompts import held_out_prompts
from fastchat_cllm.train.humaneval import build_program, extract_code, pass_at_1

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problems():
    return {p["id"]: p for p in held_out_prompts()}


RIGHT_ADD = "```python\ndef add(x: int, y: int):\n    return x + y\n```\nThis adds them."


def test_pass_at_1_passes_a_right_answer_and_fails_wrong_ones(problems):
    add = problems["HumanEval/53"]                    # add(x, y)
    assert pass_at_1(RIGHT_ADD, add).passed
    assert pass_at_1("    return x + y\n", add).passed                      # a completion
    assert pass_at_1("```python\n    return x + y\n", add).passed           # a fence cut short
    wrong = pass_at_1("```python\ndef add(x, y):\n    return x - y\n```", add)
    assert not wrong.passed and wrong.result == "failed: AssertionError"
    assert not pass_at_1("return x + y", add).passed                      # not indented
    hang = pass_at_1("```python\ndef add(x, y):\n    while True:\n        pass\n```", add,
                     timeout=1)
    assert hang.result == "timed out"
    online = pass_at_1("```python\nimport socket\ndef add(x, y):\n"
                       "    socket.create_connection(('1.1.1.1', 80))\n    return x + y\n```", add)
    assert not online.passed and "network access is disabled" in online.result
    early = pass_at_1("```python\nimport sys\ndef add(x, y):\n    return 0\nsys.exit(0)\n```", add)
    assert not early.passed                                  # exiting 0 before check() is no pass


def test_the_stub_gives_helpers_and_imports_to_a_full_answer(problems):
    """HumanEval/38: decode_cyclic's stub defines encode_cyclic, which a reply may call."""
    decode = problems["HumanEval/38"]
    reply = ("```python\ndef decode_cyclic(s: str):\n"
             "    return encode_cyclic(encode_cyclic(s))\n```")
    code = extract_code(reply)
    assert build_program(decode["stub"], code, "decode_cyclic").startswith(decode["stub"])
    assert pass_at_1(reply, decode).passed
    first = ("```python\nprint('example')\n```\n```python\nfrom typing import List\n"
             "def f(x):\n    return x\n```")
    assert extract_code(first).startswith("from typing import List")
    assert extract_code("plain text") == "plain text"


def run_evaluation(model, base, out, capsys, *flags) -> dict:
    assert evaluate_code.main(["--model", str(model), "--base", str(base), "--count", "2",
                               "--max-new-tokens", "16", "--out", str(out), "--threads", "1",
                               "--device", "cpu", *flags]) == 0
    printed = capsys.readouterr().out
    assert "| tokens per forward, sliding window of 16 (greedy, Jacobi's own guesses) |" in printed
    assert ("prompt lookup 3 (greedy)" in printed) == ("--prompt-lookup" not in flags)
    return json.loads((out / "results.json").read_text())


def test_base_against_itself_then_a_cllm_against_the_cached_base(tmp_path, capsys, monkeypatch):
    base = tiny_folder(tmp_path / "base")
    out = tmp_path / "eval"
    itself = run_evaluation(base, base, out, capsys)
    summary = itself["base"]
    assert itself["prompts"] == ["HumanEval/0", "HumanEval/1"] and summary["prompts"] == 2
    assert summary["agreement"] == 100.0 and summary["identical_to_teacher"] == 100.0
    assert summary["lossless_sliding"] == 100.0 and summary["lossless_adaptive"] == 100.0
    assert summary["mean_output_tokens"] == 16.0 and summary["pass_at_1"] == 0.0
    assert summary["tpf_sliding"] >= 1.0 and summary["tpf_sampled"] > 0
    assert itself["model"] == summary
    assert itself["packed_linear"] is True
    assert summary["lossless_sliding_lookup"] == 100.0 and summary["tpf_sliding_lookup"] >= 1.0
    packed = next(out.glob("base-*-packed-l3.jsonl"))   # prepacked weights, prompt lookup 3
    records = [json.loads(line) for line in packed.read_text().splitlines()]
    assert [r["id"] for r in records] == itself["prompts"]
    assert all(r["agreement"] == [16, 16] and len(r["greedy"]) == 16 for r in records)

    loaded = []
    real_load = loading.load
    monkeypatch.setattr(loading, "load", lambda path, **kw: loaded.append(path) or
                        real_load(path, **kw))
    cllm = save_adapter(tmp_path / "cllm", str(base), seed=3)
    versus = run_evaluation(cllm, base, out, capsys)
    assert loaded == [str(cllm)]                      # the base's records came from its file
    assert versus["base"] == summary
    other = versus["model"]
    assert 0 <= other["agreement"] < 100.0 and other["lossless_sliding"] == 100.0
    cllm_records = next(out.glob("cllm-*.jsonl")).read_text().splitlines()
    assert len(cllm_records) == 2
    assert "teacher-forced agreement" in (out / "results.md").read_text()
    without = run_evaluation(cllm, base, out, capsys, "--prompt-lookup", "0")   # records apart
    assert "tpf_sliding_lookup" not in without["model"] and len(list(out.glob("*.jsonl"))) == 4
    assert without["model"]["tpf_sliding"] == other["tpf_sliding"]    # same guesses, same count


def test_pass_at_1_only_decodes_once_per_prompt_and_compares_the_verdicts(tmp_path, capsys,
                                                                        monkeypatch):
    """--pass-at-1-only: one decode per prompt and model, its own records and summary beside
    the full evaluation's; the replies are the greedy ones the full evaluation found (the
    engine is lossless); one of the base's replies replaced by a right answer shows in pass@1
    and in the verdicts."""
    from fastchat_cllm import core
    from fastchat_cllm.bench import methods

    base = tiny_folder(tmp_path / "base")
    cllm = save_adapter(tmp_path / "cllm", str(base), seed=3)
    out = tmp_path / "eval"
    argv = ["--model", str(cllm), "--base", str(base), "--count", "2", "--max-new-tokens", "16",
            "--out", str(out), "--threads", "1", "--device", "cpu"]
    assert evaluate_code.main(argv) == 0
    full = {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in out.glob("*.jsonl")}
    decodes, generate = [], core.jacobi_generate
    monkeypatch.setattr(core, "jacobi_generate", lambda *a, **k: decodes.append(1) or
                        generate(*a, **k))
    monkeypatch.setattr(methods, "decoder", lambda name: pytest.fail("an AR decode"))
    assert evaluate_code.main(argv + ["--pass-at-1-only"]) == 0
    assert len(decodes) == 4                            # 2 prompts x 2 models, one decode each
    printed = capsys.readouterr().out
    assert "| HumanEval pass@1, greedy reply of the default engine (%) | 0.00 | 0.00 |" in printed
    assert "by the base only: 0, by the CLLM only: 0, by neither: 2" in printed
    summary = json.loads((out / "pass-at-1.json").read_text())
    assert summary["base"]["identical_to_teacher"] == 100.0 and summary["base"]["passed"] == 0
    assert summary["base"]["agreement"] == 100.0
    full_summary = json.loads((out / "results.json").read_text())
    assert summary["model"]["agreement"] == full_summary["model"]["agreement"] < 100.0
    assert (out / "results.json").exists() and (out / "pass-at-1.md").exists()
    for name, records in full.items():                  # the same greedy replies, decoded once
        replies = out / name.replace(".jsonl", "-pass.jsonl")
        assert [r["greedy"] for r in records] == \
            [json.loads(line)["greedy"] for line in replies.read_text().splitlines()]
    cllm_ids = [r["greedy"] for r in full[next(n for n in full if n.startswith("cllm"))]]
    base_ids = [r["greedy"] for r in full[next(n for n in full if n.startswith("base"))]]
    assert summary["model"]["identical_to_teacher"] == \
        100.0 * sum(c == b for c, b in zip(cllm_ids, base_ids)) / 2

    base_file = next(out.glob("base-*-pass.jsonl"))     # a resumed run reads the records
    records = [json.loads(line) for line in base_file.read_text().splitlines()]
    records[0]["passed"] = True
    base_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert evaluate_code.main(argv + ["--pass-at-1-only"]) == 0
    again = json.loads((out / "pass-at-1.json").read_text())
    assert again["base"]["pass_at_1"] == 50.0
    assert again["verdicts"] == {"both": 0, "base_only": 1, "model_only": 0, "neither": 1}


def test_another_tokenizer_than_the_base_is_refused(tmp_path, capsys):
    from harness import char_tokenizer, tiny_model

    base = tiny_folder(tmp_path / "base")
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    argv = ["--model", str(other), "--base", str(base), "--count", "1", "--max-new-tokens", "4",
            "--out", str(tmp_path / "eval"), "--threads", "1", "--device", "cpu"]
    assert evaluate_code.main(argv) == 2
    assert "has another tokenizer than the base model" in capsys.readouterr().err


def test_tradeoff_table_over_snapshots(tmp_path, capsys):
    """The snapshot table: the base row agrees with itself fully; a snapshot equal to the base
    (a zero LoRA) too; a random adapter does not; rows come in step order."""
    from fastchat_cllm.train import tradeoff

    base = tiny_folder(tmp_path / "base")
    snapshots = tmp_path / "snapshots"
    save_adapter(snapshots / "step-20", str(base), seed=3)
    save_adapter(snapshots / "step-5", str(base), seed=4)
    out = tmp_path / "tradeoff"
    assert tradeoff.main(["--snapshots", str(snapshots), "--base", str(base), "--count", "2",
                          "--max-new-tokens", "12", "--window-size", "4", "--out", str(out),
                          "--threads", "1"]) == 0
    rows = json.loads((out / "tradeoff.json").read_text())
    assert [r["model"] for r in rows] == [f"base ({base})", "step 5", "step 20"]
    assert rows[0]["agreement"] == 100.0 and rows[0]["identical_to_teacher"] == 100.0
    assert all(r["tpf_sliding"] >= 1.0 for r in rows)
    assert any(r["agreement"] < 100.0 for r in rows[1:])
    assert "| step 20 |" in (out / "tradeoff.md").read_text()
    assert tradeoff.main(["--snapshots", str(snapshots / "step-20"), "--base", str(base),
                          "--count", "2", "--max-new-tokens", "12", "--window-size", "4",
                          "--out", str(out), "--threads", "1", "--scales", "1,0.02"]) == 0
    scaled = json.loads((out / "tradeoff.json").read_text())
    assert [r["model"] for r in scaled] == [f"base ({base})", "step 20", "step 20 x 0.02"]
    assert scaled[1] == {**rows[2], "snapshot": str(snapshots / "step-20"), "scale": 1.0}
    assert scaled[1]["agreement"] < scaled[2]["agreement"]      # nearer the base
    capsys.readouterr()
    assert tradeoff.main(["--snapshots", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert tradeoff.main(["--snapshots", str(snapshots), "--out", str(out),
                          "--scales", "2"]) == 2
    assert tradeoff.main(["--snapshots", str(snapshots), "--out", str(out),
                          "--skip", "163", "--count", "2"]) == 2
    assert tradeoff.main(["--snapshots", str(snapshots / "step-5"), "--base", str(base),
                          "--count", "1", "--skip", "3", "--max-new-tokens", "4",
                          "--window-size", "4", "--out", str(out), "--threads", "1"]) == 0
    assert "(sliding 4; HumanEval problems 3-3)" in (out / "tradeoff.md").read_text()
    records = [json.loads(line) for path in out.glob("*.jsonl")
               for line in path.read_text().splitlines()]
    assert "HumanEval/3" in {r["id"] for r in records}


def test_tradeoff_picks_the_fastest_point_that_keeps_agreement(tmp_path, capsys):
    """--agreement-count widens the agreement set past the decoded prompts; --min-agreement marks
    the point with the most tokens per forward among those at or above it and prints its ship
    command; a threshold nobody keeps says so. A single adapter folder keeps its name."""
    from fastchat_cllm.train import tradeoff

    base = tiny_folder(tmp_path / "base")
    snapshots = tmp_path / "snapshots"
    save_adapter(snapshots / "step-1", str(base), seed=3)
    save_adapter(snapshots / "step-2", str(base), seed=4)
    out = tmp_path / "tradeoff"
    common = ["--base", str(base), "--count", "1", "--agreement-count", "3",
              "--max-new-tokens", "12", "--window-size", "4", "--out", str(out), "--threads", "1"]
    assert tradeoff.main(["--snapshots", str(snapshots), *common, "--scales", "1,0.02",
                          "--min-agreement", "0"]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "tradeoff.json").read_text())
    trained = rows[1:]
    best = max(trained, key=lambda r: r["tpf_sliding"])
    assert [r["model"] for r in rows if r.get("pick")] == [best["model"]]
    assert f"| **{best['model']}** |" in (out / "tradeoff.md").read_text()
    assert f"fastchat_cllm.train.ship {best['snapshot']} --scale {best['scale']!r}" in printed
    assert "HumanEval problems 0-0) | agreement with base (% positions; HumanEval problems " \
           "0-2)" in printed
    base_records = [json.loads(line) for path in out.glob("base-*.jsonl")
                    for line in path.read_text().splitlines()]
    assert [r["id"] for r in base_records] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    # the row's agreement is over all three prompts, though only the first was decoded
    from fastchat_cllm.chat_prompt import chat_prompt_ids
    from fastchat_cllm.train.evaluate_code import teacher_forced

    model, tokenizer = loading.load(str(snapshots / "step-1"))
    agree = positions = 0
    for problem, record in zip(tradeoff_problems(3), base_records):
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": problem["prompt"]}])
        agree += teacher_forced(model, ids, record["greedy"])
        positions += len(record["greedy"])
    step_1 = next(r for r in rows if r["model"] == "step 1")
    assert step_1["agreement"] == pytest.approx(100.0 * agree / positions)

    assert tradeoff.main(["--snapshots", str(snapshots), *common, "--min-agreement", "101"]) == 0
    assert "no point keeps agreement >= 101%" in capsys.readouterr().out
    assert not any(r.get("pick") for r in json.loads((out / "tradeoff.json").read_text()))

    single = save_adapter(tmp_path / "cllm7", str(base), seed=3)
    assert tradeoff.main(["--snapshots", str(single), *common]) == 0
    assert [r["model"] for r in json.loads((out / "tradeoff.json").read_text())][1] == "cllm7"
    assert tradeoff.main(["--snapshots", str(single), *common, "--agreement-count", "0",
                          "--count", "2"]) == 0
    assert tradeoff.main(["--snapshots", str(single), *common[:2], "--count", "3",
                          "--agreement-count", "2", "--out", str(out)]) == 2
    assert "--agreement-count must be >= --count" in capsys.readouterr().err


def test_the_pick_is_the_fastest_trained_point_at_or_above_the_threshold():
    from fastchat_cllm.train.tradeoff import pick

    rows = [{"model": "base", "tpf_sliding": 1.0, "agreement": 100.0},
            {"model": "a", "tpf_sliding": 1.6, "agreement": 96.9, "snapshot": "s", "scale": 1.0},
            {"model": "b", "tpf_sliding": 1.3, "agreement": 97.0, "snapshot": "s", "scale": 0.8},
            {"model": "c", "tpf_sliding": 1.2, "agreement": 98.5, "snapshot": "s", "scale": 0.7}]
    assert pick(rows, 97.0)["model"] == "b"          # a is faster but below; the base never
    assert pick(rows, 98.0)["model"] == "c"
    assert pick(rows, 99.0) is None
    assert pick(rows, 0.0)["model"] == "a"


def tradeoff_problems(n: int) -> list[dict]:
    from fastchat_cllm.train.code_prompts import held_out_prompts

    return held_out_prompts()[:n]


def test_where_onednn_refuses_the_records_are_kept_as_unpacked(tmp_path, capsys, monkeypatch):
    """oneDNN refusing the model at load (it then runs on nn.Linear with a warning): the records
    go to the plain file, not the prepacked one, and the results say so."""
    from fastchat_cllm.core.packed_linear import PackedLinear

    def refuse(self, x):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(PackedLinear, "forward", refuse)
    base = tiny_folder(tmp_path / "base")
    out = tmp_path / "eval"
    results = run_evaluation(base, base, out, capsys)
    assert results["packed_linear"] is False and results["base"]["lossless_sliding"] == 100.0
    assert [f.name.endswith("-w16-l3.jsonl") for f in out.glob("base-*.jsonl")] == [True]
    assert "weights prepacked" not in (out / "results.md").read_text()
