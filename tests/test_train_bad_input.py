"""collect / distill on bad input: one `error:` line, exit status 2, nothing written that could
pass for a finished result; a run stopped by its time limit says it is incomplete."""
from __future__ import annotations

import json

import pytest

from harness import char_tokenizer, tiny_model
from fastchat_cllm.train import collect, distill
from test_train_distill import collect_args, distill_args

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(capsys, *words: str) -> str:
    """stderr ends with the one `error:` line (after transformers' loading bars, if any)."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], err
    return errors[0]


def test_collect_bad_prompt_files_write_nothing(tmp_path, capsys):
    out = tmp_path / "t.jsonl"
    for content, words in (("", ["holds no prompts"]),
                           ("{oops\n", ["bad.jsonl:1", "not valid JSON"]),
                           ('{"id": 1}\n', ["needs a string 'prompt'"])):
        (tmp_path / "bad.jsonl").write_text(content)
        assert collect.main(["--prompts", str(tmp_path / "bad.jsonl"), "--out", str(out)]) == 2
        one_error_line(capsys, *words)
    assert collect.main(["--prompts", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
    one_error_line(capsys, "none.jsonl does not exist")
    assert not out.exists()


def test_collect_missing_model(model_and_prompts, tmp_path, capsys):
    _, prompts = model_and_prompts
    out = tmp_path / "t.jsonl"
    assert collect.main(collect_args(tmp_path / "no-model", prompts, out)) == 2
    one_error_line(capsys, "does not exist")
    assert not out.exists()


@pytest.mark.parametrize("record, words", [
    ({"id": "blank", "prompt": ""}, ["'blank' is empty once tokenized"]),
    ({"id": "far", "prompt_ids": [1, 500]}, ["'far' holds a token id outside", "0..95"])])
def test_collect_checks_every_prompt_before_writing(model_and_prompts, tmp_path, capsys, record,
                                                   words):
    folder, prompts = model_and_prompts
    with open(prompts, "a") as f:
        f.write(json.dumps(record) + "\n")
    out = tmp_path / "t.jsonl"
    assert collect.main(collect_args(folder, prompts, out, "--no-chat-template")) == 2
    one_error_line(capsys, *words)
    assert not out.exists()


def test_collect_refuses_to_resume_a_file_of_another_tokenizer(model_and_prompts, tmp_path, capsys):
    folder, prompts = model_and_prompts
    out = tmp_path / "t.jsonl"
    assert collect.main(collect_args(folder, prompts, out, "--max-repeat", "0")) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    identity = records[0]["tokenizer"]
    assert identity["vocab_size"] == 96 and all(r["tokenizer"] == identity for r in records)
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    char_tokenizer().save_pretrained(other)            # the same size, other tokens
    text = out.read_text()
    out.write_text(text.splitlines()[0] + "\n")        # one line, so the rerun has work to do
    assert collect.main(collect_args(other, prompts, out)) == 2
    one_error_line(capsys, "another tokenizer", "collect into a new file")
    assert out.read_text() == text.splitlines()[0] + "\n"


def test_collect_stopped_by_its_time_limit_says_incomplete(model_and_prompts, tmp_path, capsys):
    folder, prompts = model_and_prompts
    out = tmp_path / "t.jsonl"
    assert collect.main(collect_args(folder, prompts, out, "--max-minutes", "1e-9")) == 0
    captured = capsys.readouterr()
    counts = json.loads(captured.out.strip().splitlines()[-1])
    assert counts["complete"] is False and counts["left"] == 4
    assert "incomplete; rerun the same command" in captured.err
    assert collect.main(collect_args(folder, prompts, out)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["complete"] is True


@pytest.fixture()
def trajectories(model_and_prompts, tmp_path):
    folder, prompts = model_and_prompts
    path = tmp_path / "traj.jsonl"
    assert collect.main(collect_args(folder, prompts, path, "--max-repeat", "0")) == 0
    return path


@pytest.mark.parametrize("content, words", [
    (None, ["does not exist"]), ("", ["holds no trajectories"]),
    ('{"id": "x", "blocks": 3}\n', ["t.jsonl:1", "not a trajectory record"]),
    ('{"id": "x"\n', ["t.jsonl:1", "not valid JSON"]),
    ('{"id": "x", "dropped": "repetition"}\n', ["holds no trajectories"])])
def test_distill_bad_trajectory_files(model_and_prompts, tmp_path, capsys, content, words):
    folder, _ = model_and_prompts
    path, out = tmp_path / "t.jsonl", tmp_path / "out"
    if content is not None:
        path.write_text(content)
    assert distill.main(distill_args(folder, path, out)) == 2
    one_error_line(capsys, *words)
    assert not out.exists()


def test_distill_missing_model(trajectories, tmp_path, capsys):
    out = tmp_path / "out"
    assert distill.main(distill_args(tmp_path / "no-model", trajectories, out)) == 2
    one_error_line(capsys, "does not exist")
    assert not out.exists()


def test_distill_refuses_trajectories_of_another_tokenizer(trajectories, tmp_path, capsys):
    other = tmp_path / "other"
    tiny_model("llama").save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    out = tmp_path / "out"
    assert distill.main(distill_args(other, trajectories, out)) == 2
    one_error_line(capsys, "was made with another tokenizer", "vocabulary 96, digest")
    assert not out.exists()


def test_distill_refuses_ids_outside_the_vocabulary_without_an_identity(
        model_and_prompts, trajectories, tmp_path, capsys):
    """Files written before trajectories recorded their tokenizer: the vocabulary still bounds
    their ids."""
    folder, _ = model_and_prompts
    records = [json.loads(line) for line in trajectories.read_text().splitlines()]
    for record in records:
        record.pop("tokenizer")
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert distill.main(distill_args(folder, legacy, tmp_path / "ok", "--steps", "1")) == 0
    capsys.readouterr()
    kept = next(r for r in records if "blocks" in r)
    kept["blocks"][0]["states"][0][-1] = 4000      # a guess outside the vocabulary
    legacy.write_text(json.dumps(kept) + "\n")
    assert distill.main(distill_args(folder, legacy, tmp_path / "out")) == 2
    one_error_line(capsys, "token id 4000", "outside --model's vocabulary (0..95)")
    assert not (tmp_path / "out").exists()


def test_distill_stopped_by_its_time_limit_says_incomplete(model_and_prompts, trajectories,
                                                           tmp_path, capsys):
    folder, _ = model_and_prompts
    assert distill.main(distill_args(folder, trajectories, tmp_path / "o", "--max-minutes",
                                     "1e-9")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["complete"] is False and summary["steps"] == 1


@pytest.mark.parametrize("edit, words", [
    (lambda b: b["states"][0].append(b["fixed_point"][0]), ["holds a state whose length"]),
    (lambda b: b["augmented"].append(b["fixed_point"][:-1]), ["holds a state whose length"]),
    (lambda b: b.update(start=b["start"] + 1), ["fixed point is not the output"])])
def test_distill_refuses_a_hand_edited_trajectory(trajectories, model_and_prompts, tmp_path,
                                                   capsys, edit, words):
    """A block that does not fit its output is named with its line, before any training (it
    used to stop the horizon cut with a bare StopIteration)."""
    folder, _ = model_and_prompts
    records = [json.loads(line) for line in trajectories.read_text().splitlines()]
    kept = [r for r in records if "blocks" in r]
    edit(kept[1]["blocks"][0])
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in kept))
    out = tmp_path / "out"
    assert distill.main(distill_args(folder, edited, out, "--horizon", "1")) == 2
    one_error_line(capsys, "edited.jsonl:2", "block 0", *words)
    assert not out.exists()


def test_distill_refuses_to_resume_a_checkpoint_made_with_other_settings(
        model_and_prompts, trajectories, tmp_path, capsys):
    """A rerun may lengthen the run or change its time limit, not the recipe: other settings
    are named, and the checkpoint and log are left as they were."""
    folder, _ = model_and_prompts
    out = tmp_path / "out"
    assert distill.main(distill_args(folder, trajectories, out, "--max-minutes", "1e-9")) == 0
    checkpoint, log = (out / "checkpoint.pt").read_bytes(), (out / "loss_log.jsonl").read_text()
    capsys.readouterr()
    assert distill.main(distill_args(folder, trajectories, out, "--lr", "2e-3",
                                     "--horizon", "2")) == 2
    one_error_line(capsys, "was made with other settings", "horizon 0 -> 2", "lr 0.001 -> 0.002")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert (out / "loss_log.jsonl").read_text() == log
    assert distill.main(distill_args(folder, trajectories, out, "--steps", "3")) == 0
    steps = [json.loads(line)["step"] for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_a_setting_only_one_side_records_is_not_compared(tmp_path):
    """A checkpoint from before a setting existed (or a caller that records fewer) resumes."""
    import torch

    from fastchat_cllm.train.trainer import CHECKPOINT, check_resume

    torch.save({"step": 1, "settings": {"lr": 1e-3, "old": 1}}, tmp_path / CHECKPOINT)
    check_resume(tmp_path, {"lr": 1e-3, "new": 2})
    with pytest.raises(ValueError, match="lr 0.001 -> 0.002"):
        check_resume(tmp_path, {"lr": 2e-3})
