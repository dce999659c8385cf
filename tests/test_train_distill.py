"""Consistency distillation and the collect / distill command lines, on tiny random models."""
from __future__ import annotations

import json
import sys
import random

import pytest
import torch

from harness import random_prompts, sharp_tiny_model
from fastchat_cllm import jacobi_generate
from fastchat_cllm.loading import load
from fastchat_cllm.train import collect, distill
from fastchat_cllm.train.losses import consistency_loss
from fastchat_cllm.train.packing import pack, packed_logits
from fastchat_cllm.train.trainer import DistillConfig, choose_segments, train
from fastchat_cllm.train.trajectory import CollectConfig, collect_trajectory

BLOCK, NEW = 8, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def tokens_per_forward(model, prompts, fixed_blocks=True) -> float:
    accepted = forwards = 0
    for ids in prompts:
        out = jacobi_generate(model, ids, max_new_tokens=NEW, window_size=BLOCK, adaptive=False,
                              fixed_blocks=fixed_blocks, fill="random")
        accepted += sum(out.stats.accepted_per_forward)
        forwards += out.stats.forwards
    return accepted / forwards


def mean_consistency(model, trajectories) -> float:
    rng, total = random.Random(5), 0.0
    with torch.no_grad():
        for traj in trajectories:
            packed = pack(traj.prompt_ids, traj.output_ids,
                          choose_segments(traj, DistillConfig(states_per_block=8), rng))
            total += consistency_loss(packed_logits(model, packed), packed).item()
    return total / len(trajectories)


def sharp_model_and_trajectories(count: int = 6):
    """A sharp tiny model, `count` random prompts and its trajectories on them."""
    model = sharp_tiny_model()
    prompts = random_prompts(count)
    config = CollectConfig(block_size=BLOCK, max_new_tokens=NEW, max_repeat=0)
    return model, prompts, [collect_trajectory(model, str(i), p, config)
                            for i, p in enumerate(prompts)]


def test_distillation_lowers_consistency_loss_and_raises_tokens_per_forward(tmp_path):
    model, prompts, trajectories = sharp_model_and_trajectories()
    before = mean_consistency(model, trajectories), tokens_per_forward(model, prompts)
    done = train(model, trajectories, DistillConfig(steps=30, lr=3e-3, ar_weight=0.1, warmup=0,
                                                    states_per_block=8, records_per_step=2),
                 tmp_path, progress=False)
    after = mean_consistency(model, trajectories), tokens_per_forward(model, prompts)
    assert done == 30
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] > before[1] + 0.05, (before, after)
    log = [json.loads(line) for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == list(range(30)) and log[0]["states"] > 0


def collect_args(folder, prompts, out, *extra):
    return ["--model", str(folder), "--prompts", str(prompts), "--out", str(out), "--block-size",
            str(BLOCK), "--max-new-tokens", str(NEW), "--threads", "1", *extra]


def test_collect_cli_writes_resumes_and_skips_done_prompts(model_and_prompts, tmp_path, capsys):
    folder, prompts = model_and_prompts
    out = tmp_path / "traj.jsonl"
    first = prompts.read_text().splitlines()[:2]
    partial = tmp_path / "first.jsonl"
    partial.write_text("\n".join(first) + "\n")
    assert collect.main(collect_args(folder, partial, out, "--augment", "1")) == 0
    with open(out, "a") as f:
        f.write('{"id": "p2", "prompt_ids": [1, 2')      # a line torn by an interrupt
    assert collect.main(collect_args(folder, prompts, out, "--augment", "1")) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert counts["skipped"] == 2 and counts["written"] + counts["dropped"] == 3
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["ids", "p0", "p1", "p2", "p3"]
    assert next(r for r in records if r["id"] == "ids")["prompt_ids"] == [1, 40, 41, 42]
    assert any(b["augmented"] for r in records if "blocks" in r for b in r["blocks"])


def test_collect_with_workers_writes_what_one_worker_writes_and_resumes(model_and_prompts,
                                                                        tmp_path, capsys):
    """--workers 2: shards in two processes, merged in prompt order into the same file one
    worker writes; a run stopped by its time limit, and a worker file left by a killed run, are
    continued by the next run."""
    folder, prompts = model_and_prompts
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ("--augment", "1", "--max-repeat", "0")
    assert collect.main(collect_args(folder, prompts, one, *common)) == 0
    assert collect.main(collect_args(folder, prompts, two, *common, "--workers", "2",
                                     "--max-minutes", "1e-9")) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["written"], counts["left"], counts["complete"]) == (2, 3, False)
    assert [json.loads(line)["id"] for line in two.read_text().splitlines()] == ["p0", "p1"]
    assert [p.name for p in tmp_path.glob("two.jsonl.*")] == ["two.jsonl.lock"]  # parts merged
    (tmp_path / "two.jsonl.part0").write_text(one.read_text().splitlines()[2] + "\n")  # p2
    assert collect.main(collect_args(folder, prompts, two, *common, "--workers", "2")) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (counts["skipped"], counts["written"], counts["complete"]) == (3, 2, True)
    assert two.read_text() == one.read_text()
    assert [p.name for p in tmp_path.glob("two.jsonl.*")] == ["two.jsonl.lock"]
    held = collect.lock(two)                   # another collection is writing the file
    assert collect.main(collect_args(folder, prompts, two, "--workers", "2")) == 2
    assert "another collection is writing" in capsys.readouterr().err
    held.close()


def test_collect_says_when_a_worker_fails(model_and_prompts, tmp_path, capsys, monkeypatch):
    folder, prompts = model_and_prompts
    monkeypatch.setattr(sys, "executable", "/bin/false")    # every worker exits with status 1
    out = tmp_path / "t.jsonl"
    assert collect.main(collect_args(folder, prompts, out, "--workers", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: worker 0 exited with status 1; worker 1 exited with status 1")
    assert not out.exists() or not out.read_text()
    assert [p.name for p in tmp_path.glob("t.jsonl.*")] == ["t.jsonl.lock"]


@pytest.mark.parametrize("content,message", [("{not json\n", "not valid JSON"),
                                             ('{"text": "x"}\n', "needs a string 'prompt'"),
                                             ("", "holds no prompts")])
def test_collect_cli_rejects_bad_prompt_files(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert collect.main(["--prompts", str(bad), "--out", str(tmp_path / "t.jsonl")]) == 2
    assert message in capsys.readouterr().err
    assert collect.main(["--prompts", str(tmp_path / "missing.jsonl"),
                         "--out", str(tmp_path / "t.jsonl")]) == 2


def distill_args(folder, trajectories, out, *extra):
    return ["--model", str(folder), "--trajectories", str(trajectories), "--out", str(out),
            "--steps", "4", "--lr", "1e-3", "--save-every", "2", "--threads", "1", *extra]


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_distill_cli_resumes_exactly_and_saves_a_loadable_model(model_and_prompts, tmp_path):
    folder, prompts = model_and_prompts
    trajectories = tmp_path / "traj.jsonl"
    assert collect.main(collect_args(folder, prompts, trajectories, "--max-repeat", "0")) == 0
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert distill.main(distill_args(folder, trajectories, straight)) == 0
    # stop after the first step (time limit), then rerun the same command without it
    assert distill.main(distill_args(folder, trajectories, resumed, "--max-minutes", "1e-9")) == 0
    assert torch.load(resumed / "checkpoint.pt", weights_only=False)["step"] == 1
    assert distill.main(distill_args(folder, trajectories, resumed)) == 0
    log = [json.loads(l)["step"] for l in (resumed / "loss_log.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2, 3]
    model_a, tokenizer = load(str(straight))
    model_b, _ = load(str(resumed))
    for (name, a), b in zip(weights(model_a).items(), weights(model_b).values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    original, _ = load(str(folder))
    assert any(not torch.equal(a, b) for a, b in zip(weights(original).values(),
                                                     weights(model_a).values()))
    ids = tokenizer("w5 w6 w7")["input_ids"]
    assert len(jacobi_generate(model_a, ids, max_new_tokens=8).tokens) == 8


def test_distill_cli_lora_merged_and_adapter(model_and_prompts, tmp_path):
    folder, prompts = model_and_prompts
    trajectories = tmp_path / "traj.jsonl"
    assert collect.main(collect_args(folder, prompts, trajectories, "--max-repeat", "0")) == 0
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    assert distill.main(distill_args(folder, trajectories, merged, "--lora-rank", "4",
                                     "--loss", "local")) == 0
    model, _ = load(str(merged))
    assert not any("lora" in name for name in model.state_dict())
    assert distill.main(distill_args(folder, trajectories, adapter, "--lora-rank", "4",
                                     "--save-adapter")) == 0
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder.resolve())   # resolves from anywhere
    assert not any("lora" in name for name in load(str(adapter))[0].state_dict())


def test_distill_cli_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "blocks": 3}\n')
    assert distill.main(["--trajectories", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert distill.main(["--trajectories", str(bad), "--out", str(tmp_path / "o"),
                         "--loss", "global", "--states-per-block", "0"]) == 2
    with pytest.raises(ValueError):
        DistillConfig(loss="other")


def test_distillation_with_a_horizon_raises_tokens_per_forward(tmp_path):
    """Measured with the sliding window the horizon aims at."""
    model, prompts, trajectories = sharp_model_and_trajectories()
    before = tokens_per_forward(model, prompts, fixed_blocks=False)
    train(model, trajectories, DistillConfig(steps=60, lr=3e-3, ar_weight=0.1, warmup=0,
                                             states_per_block=16, records_per_step=2, horizon=3),
          tmp_path, progress=False)
    after = tokens_per_forward(model, prompts, fixed_blocks=False)
    assert after > before + 0.05, (before, after)


def test_the_greedy_teacher_learns_the_fixed_point_tokens_and_raises_tokens_per_forward(tmp_path):
    """--teacher greedy: a state position's label is the fixed point's next token (the clean
    token after its target position), the AR term is cross-entropy on the greedy output, and a
    run raises sliding tokens per forward while the model keeps its greedy output's argmax."""
    from fastchat_cllm.train.losses import cllm_loss, consistency_ce

    model, prompts, trajectories = sharp_model_and_trajectories()
    traj = trajectories[0]
    segments = choose_segments(traj, DistillConfig(states_per_block=4, horizon=3),
                               random.Random(0))
    end = len(traj.output_ids) - 2          # a state at the output's end: its last has no label
    segments.append(type(segments[0])(end, [traj.output_ids[end], traj.output_ids[end]]))
    packed = pack(traj.prompt_ids, traj.output_ids, segments)
    labels, at = [], 0
    for seg in segments:       # the token each trained position should predict
        labels += [traj.output_ids[seg.start + i + 1] if seg.start + i + 1 < len(traj.output_ids)
                   else None for i in range(len(seg.tokens))]
    keep = torch.tensor([label is not None for label in labels])
    assert not keep.all()
    with torch.no_grad():
        logits = packed_logits(model, packed)
        expected = torch.nn.functional.cross_entropy(
            logits[packed.student[keep]], torch.tensor([t for t in labels if t is not None]))
        torch.testing.assert_close(consistency_ce(logits, packed), expected)
        both = cllm_loss(logits, packed, 2.0, 0.0, hard=True)
        assert both.total.item() == pytest.approx(both.consistency.item() + 2 * both.ar.item())
    before = tokens_per_forward(model, prompts, fixed_blocks=False)
    train(model, trajectories, DistillConfig(steps=120, lr=3e-3, ar_weight=1.0, warmup=0,
                                             states_per_block=16, records_per_step=2, horizon=3,
                                             teacher="greedy", label_smoothing=0.0),
          tmp_path, progress=False)
    after = tokens_per_forward(model, prompts, fixed_blocks=False)
    assert after > before + 0.05, (before, after)
    for traj in trajectories:       # still the greedy output's argmax everywhere
        with torch.no_grad():
            ids = torch.tensor([traj.prompt_ids + traj.output_ids])
            argmax = model(input_ids=ids).logits[0, len(traj.prompt_ids) - 1: -1].argmax(-1)
        assert (argmax == torch.tensor(traj.output_ids)).float().mean() >= 0.95
    with pytest.raises(ValueError):
        DistillConfig(teacher="greedy", loss="local")


def test_a_horizon_trains_the_positions_after_the_first_wrong_token_on_cut_states():
    """--horizon H: each chosen state becomes its H tokens from the first wrong one, placed at
    that offset; the cut state's predictions equal the whole state's at those positions (same
    context), its targets are the fixed point's, and a step packs fewer tokens than uncut."""
    model = sharp_tiny_model()
    config = CollectConfig(block_size=BLOCK, max_new_tokens=NEW, max_repeat=0)
    traj = collect_trajectory(model, "t", random_prompts(1)[0], config)
    horizon = DistillConfig(states_per_block=64, horizon=3)
    cut = choose_segments(traj, horizon, random.Random(0))
    assert cut and all(1 <= len(seg.tokens) <= 3 for seg in cut)
    whole = {}
    for block in traj.blocks:
        for state in block.states + block.augmented:
            if state == block.fixed_point:
                continue
            w = next(i for i, (a, b) in enumerate(zip(state, block.fixed_point)) if a != b)
            whole[(block.start + w, tuple(state[w: w + 3]))] = (block.start, state, w)
    assert {(seg.start, tuple(seg.tokens)) for seg in cut} <= set(whole)
    assert len({(seg.start, tuple(seg.tokens)) for seg in cut}) == len(cut)   # no repeats
    p = len(traj.prompt_ids)
    with torch.no_grad():
        for seg in cut[:6]:
            start, state, w = whole[(seg.start, tuple(seg.tokens))]
            a = pack(traj.prompt_ids, traj.output_ids, [seg])
            b = pack(traj.prompt_ids, traj.output_ids,
                     [type(seg)(start, state)])
            n = len(seg.tokens)
            assert a.teacher.tolist() == list(range(p + seg.start, p + seg.start + n))
            torch.testing.assert_close(packed_logits(model, a)[a.student],
                                       packed_logits(model, b)[b.student[w: w + n]])
    assert sum(len(s.tokens) for s in cut) < sum(
        len(s.tokens) for s in choose_segments(traj, DistillConfig(states_per_block=64),
                                               random.Random(0)))
    with pytest.raises(ValueError):
        DistillConfig(horizon=2, loss="local")
    with pytest.raises(ValueError):
        DistillConfig(horizon=-1)


def test_base_teacher_targets_the_frozen_model_and_snapshots_adapters(model_and_prompts,
                                                                     tmp_path):
    """--teacher base: the reference logits are the base model's (the LoRA adapter off), so at
    the start (LoRA B = 0) the AR KL is 0 and both teachers give the same loss; after training the
    adapter moved the model but the reference still equals the untouched base."""
    from fastchat_cllm.train.distill import add_lora, clear_quantizer
    from fastchat_cllm.train.losses import cllm_loss
    from fastchat_cllm.train.trainer import base_logits

    folder, prompts = model_and_prompts
    trajectories = tmp_path / "traj.jsonl"
    assert collect.main(collect_args(folder, prompts, trajectories, "--max-repeat", "0")) == 0
    traj = distill.read_trajectories(trajectories)[0]
    packed = pack(traj.prompt_ids, traj.output_ids,
                  choose_segments(traj, DistillConfig(states_per_block=4), random.Random(0)))
    base, _ = load(str(folder))
    with torch.no_grad():
        expected = packed_logits(base, packed)[: packed.clean_len]
    clear_quantizer(base)
    model = add_lora(base, 4, 8)
    with torch.no_grad():
        logits = packed_logits(model, packed)
        reference = base_logits(model, packed)
        torch.testing.assert_close(reference, expected)
        own = cllm_loss(logits, packed, 10.0, 0.0)
        anchored = cllm_loss(logits, packed, 10.0, 0.0, reference)
    assert anchored.ar.item() == pytest.approx(0.0, abs=1e-6)
    assert anchored.consistency.item() == pytest.approx(own.consistency.item(), rel=1e-5)
    with torch.no_grad():                 # an adapter that moves the model: the reference doesn't
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
        moved = packed_logits(model, packed)[: packed.clean_len]
        assert not torch.allclose(moved, expected)
        torch.testing.assert_close(base_logits(model, packed), expected)
    out = tmp_path / "run"
    assert distill.main(distill_args(folder, trajectories, out, "--lora-rank", "4", "--lr", "1e-2",
                                     "--teacher", "base", "--snapshot-every", "2",
                                     "--save-adapter")) == 0
    snapshots = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snapshots == ["step-2", "step-4"]
    snapshot = json.loads((out / "snapshots" / "step-2" / "adapter_config.json").read_text())
    assert snapshot["base_model_name_or_path"] == str(folder.resolve())
    log = [json.loads(l) for l in (out / "loss_log.jsonl").read_text().splitlines()]
    assert log[0]["ar"] == pytest.approx(0.0, abs=1e-6) and log[-1]["ar"] > 0
    trained, _ = load(str(out))
    with torch.no_grad():
        assert not torch.allclose(packed_logits(trained, packed)[: packed.clean_len], expected)
    assert distill.main(distill_args(folder, trajectories, tmp_path / "x", "--teacher",
                                     "base")) == 2


def test_code_recipe_runs_end_to_end_and_resumes(tmp_path, capsys):
    """The recipe of the shipped adapter on a tiny model: stdlib prompts, trajectories, a LoRA
    run with snapshots, the trade-off table; a rerun does no stage's work again."""
    from harness import tiny_folder
    from fastchat_cllm.train import code_recipe

    base = tiny_folder(tmp_path / "base")
    work = tmp_path / "work"
    args = ["--work", str(work), "--model", str(base), "--prompts", "3", "--steps", "2",
            "--snapshot-every", "1", "--collect-minutes", "5", "--distill-minutes", "5",
            "--scales", "1,0.5", "--dev-prompts", "3", "--min-agreement", "0"]
    assert code_recipe.main(args) == 0
    assert len((work / "train.jsonl").read_text().splitlines()) == 3
    assert len((work / "trajectories.jsonl").read_text().splitlines()) == 3
    assert sorted(p.name for p in (work / "distill" / "snapshots").iterdir()) == ["step-1", "step-2"]
    assert (work / "distill" / "adapter_config.json").exists()
    table = (work / "tradeoff" / "tradeoff.md").read_text()
    rows = json.loads((work / "tradeoff" / "tradeoff.json").read_text())
    assert [r["model"] for r in rows[1:]] == ["step 1", "step 1 x 0.5", "step 2", "step 2 x 0.5"]
    assert sum(bool(r.get("pick")) for r in rows) == 1
    assert "HumanEval problems 100-102" in table and "**" in table
    assert "fastchat_cllm.train.ship" in table
    log = (work / "distill" / "loss_log.jsonl").read_text()
    with pytest.raises(SystemExit):
        code_recipe.parse_args(["--dev-prompts", "65"])      # past HumanEval, before any work
    assert code_recipe.main(args) == 0                       # resumes: nothing is redone
    assert (work / "distill" / "loss_log.jsonl").read_text() == log
    assert len((work / "trajectories.jsonl").read_text().splitlines()) == 3
