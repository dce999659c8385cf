"""The FastChat plugin without a model server: registration, templates, parameters, fixes,
loading options, worker flags."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from harness import tiny_model

REGISTERED = """
import sys
import fastchat_cllm
assert "fastchat" not in sys.modules, "import fastchat_cllm imported FastChat"
from fastchat.model.model_adapter import model_adapters
assert type(model_adapters[0]).__name__ != "CllmAdapter", "registered without being asked"
import fastchat_cllm.serving
from fastchat.model.model_adapter import get_model_adapter
print(type(model_adapters[0]).__name__, type(get_model_adapter("lmsys/vicuna-7b-v1.5")).__name__,
      sum(type(a).__name__ == "CllmAdapter" for a in model_adapters))
"""


def test_importing_serving_registers_the_plugin_first_and_once():
    """The one registration path for a process of one's own: import fastchat_cllm.serving
    (importing fastchat_cllm alone loads no FastChat and registers nothing)."""
    done = subprocess.run([sys.executable, "-c", REGISTERED], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["CllmAdapter", "VicunaAdapter", "1"]


@pytest.mark.parametrize("path, prompt", [
    ("cllm/consistency-llm-7b-sharegpt48k",
     "A chat between a curious user and an artificial intelligence assistant. The assistant "
     "gives helpful, detailed, and polite answers to the user's questions. USER: Q? ASSISTANT:"),
    ("/models/consistency-llm-7b-math", "Question:\nQ?\nAnswer:\nLet's think step by step.\n"),
    ("cllm/consistency-llm-7b-spider", "### Instruction:\nQ?\n### Response:\n"),
    ("cllm/consistency-llm-7b-codesearchnet", "### Instruction:\nQ?\n### Response:\n"),
])
def test_published_checkpoints_get_their_training_format(path, prompt):
    from fastchat.model.model_adapter import get_conversation_template, get_model_adapter

    from fastchat_cllm.serving.adapter import CllmAdapter

    assert isinstance(get_model_adapter(path), CllmAdapter)
    conv = get_conversation_template(path)
    conv.append_message(conv.roles[0], "Q?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == prompt
    if "spider" in path or "codesearchnet" in path:
        assert conv.stop_str == "<|EOT|>"


def test_adapter_claims_the_worker_path_and_leaves_others_alone(tmp_path):
    from fastchat.model.model_adapter import get_model_adapter

    from fastchat_cllm.serving.adapter import CllmAdapter

    assert isinstance(get_model_adapter("smollm2-135m-instruct"), CllmAdapter)
    assert isinstance(get_model_adapter(str(tmp_path / "model.Q4.gguf")), CllmAdapter)
    mine = str(tmp_path / "my-vicuna-finetune")
    assert not isinstance(get_model_adapter(mine), CllmAdapter)
    CllmAdapter.claim(mine)
    assert isinstance(get_model_adapter(mine), CllmAdapter)


@pytest.mark.parametrize("params, code", [
    ({"prompt": ""}, 40001),
    ({"prompt": "x", "max_new_tokens": 0}, 40302),
    ({"prompt": "x", "max_new_tokens": 2.5}, 40001),
    ({"prompt": "x", "temperature": -1}, 40302),
    ({"prompt": "x", "top_p": 1.5}, 40302),
    ({"prompt": "x", "top_k": 0}, 40302),
    ({"prompt": "x", "repetition_penalty": 0}, 40302),
    ({"prompt": "x", "stop": 5}, 40302),
    ({"prompt": "x", "stop_token_ids": ["a"]}, 40302),
    ({"prompt": "x", "logprobs": 21}, 40302),
    ({"prompt": "x", "presence_penalty": 0.5}, 40302),
    ({"prompt": "x", "best_of": 3}, 40302),
])
def test_bad_parameters_get_error_codes(params, code):
    from fastchat_cllm.serving.params import ParamError, parse_params

    with pytest.raises(ParamError) as error:
        parse_params(params)
    assert error.value.code == code


def test_parameters_translate_fastchat_rules():
    from fastchat_cllm.serving.params import parse_params

    request = parse_params({"prompt": "x", "temperature": 0.7, "top_p": 1e-9, "stop": "###",
                            "stop_token_ids": [7], "max_new_tokens": 9, "echo": False})
    assert request.greedy and request.stop == ("###",) and request.stop_token_ids == (7,)
    assert not parse_params({"prompt": "x"}).greedy        # FastChat's default temperature 1.0


@pytest.mark.parametrize("rope, expected", [
    (None, 512), ({"rope_type": "linear", "factor": 4.0}, 2048),
    ({"rope_type": "dynamic", "factor": 2.0}, 1024),
])
def test_context_length_reads_transformers5_rope_dicts(rope, expected):
    from fastchat_cllm.serving.compat import context_length

    config = tiny_model().config
    config.rope_scaling = rope
    assert context_length(config) == expected


def test_api_usage_keeps_jacobi_counts_and_streaming_json_works():
    from fastchat.protocol import openai_api_protocol as protocol

    from fastchat_cllm.serving import compat

    compat.fix_protocol()
    total = protocol.UsageInfo()
    for forwards, tokens in ((4, 6), (2, 2)):           # the API server's sum over n choices
        part = protocol.UsageInfo.model_validate(
            {"prompt_tokens": 3, "completion_tokens": tokens + 1, "total_tokens": tokens + 4,
             "jacobi_forwards": forwards, "jacobi_tokens": tokens,
             "jacobi_tokens_per_forward": tokens / forwards})
        for key, value in part.dict().items():
            setattr(total, key, getattr(total, key) + value)
    usage = json.loads(protocol.ChatCompletionResponse(model="m", choices=[],
                                                       usage=total).model_dump_json())["usage"]
    assert usage["jacobi_forwards"] == 6 and usage["jacobi_tokens_per_forward"] == round(8 / 6, 4)
    plain = protocol.ChatCompletionResponse(model="m", choices=[], usage=protocol.UsageInfo())
    assert not any(k.startswith("jacobi") for k in plain.model_dump()["usage"])
    chunk = protocol.ChatCompletionStreamResponse(id="x", model="m", choices=[
        protocol.ChatCompletionResponseStreamChoice(index=0, delta=protocol.DeltaMessage(
            content="é"))])
    assert json.loads(chunk.json(exclude_unset=True, ensure_ascii=False))["choices"][0][
        "delta"] == {"content": "é"}


def test_placement_refuses_what_it_cannot_honour():
    from fastchat_cllm.loading import placement

    assert placement("cpu") == {}
    with pytest.raises(ValueError, match="--num-gpus"):
        placement("cpu", num_gpus=2)
    with pytest.raises(ValueError, match="--device cpu"):
        placement("cpu", max_gpu_memory="10GiB")
    with pytest.raises(ValueError, match="--num-gpus"):
        placement("cuda", num_gpus=0)
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="visible"):
            placement("cuda", num_gpus=8)


def test_hub_ids_resolve_and_missing_paths_fail(tmp_path):
    from fastchat_cllm.loading import resolve

    assert str(resolve("cllm/consistency-llm-7b-math").folder) == "cllm/consistency-llm-7b-math"
    with pytest.raises(FileNotFoundError):
        resolve(str(tmp_path / "nothing" / "here"))


def test_lora_folder_loads_base_with_adapter_merged(tmp_path):
    from peft import LoraConfig, get_peft_model

    from fastchat_cllm.loading import load_model, resolve

    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")
    lora = get_peft_model(tiny_model("llama"), LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    merged = load_model(resolve(str(tmp_path / "adapter")))
    with torch.no_grad():
        expected, got, plain = lora(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)      # the adapter really changed the model


@pytest.mark.parametrize("argv, message", [
    (["--window-size", "100000"], "window_size must be in [1, 1024], got 100000"),
    (["--load-8bit"], "--load-8bit cannot be honoured"),
    (["--gptq-wbits", "4"], "--gptq-ckpt/--gptq-wbits cannot be honoured"),
    (["--num-gpus", "2", "--device", "cpu"], "--num-gpus/--max-gpu-memory"),
    (["--stream-interval", "0"], "--stream-interval must be >= 1"),
    (["--embed-in-truncate"], "--embed-in-truncate cannot be honoured"),
    (["--conv-template", "no-such-template"], "unknown --conv-template"),
])
def test_worker_refuses_bad_flags_at_start_up(argv, message, capsys):
    from fastchat_cllm.serving.options import jacobi_config
    from fastchat_cllm.serving.worker import build_parser, check_args

    parser = build_parser()
    args = parser.parse_args(argv)
    args.device = args.device or "cpu"
    with pytest.raises(SystemExit) as stop:
        check_args(parser, args)
        jacobi_config(parser, args)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_web_ui_line_under_each_answer_and_a_regenerated_one():
    """The statistics line comes from the worker's last usage; regenerating the answer drops
    the old line until the new answer ends; the prompt never holds it."""
    from fastchat.conversation import SeparatorStyle

    from fastchat_cllm.serving.web_ui import AnswerConversation, stats_line, with_answer_stats

    conv = AnswerConversation(name="t", roles=("user", "assistant"), messages=[],
                              sep_style=SeparatorStyle.ADD_COLON_SINGLE, sep="\n")
    usage = {"completion_tokens": 9, "jacobi_forwards": 4, "jacobi_tokens": 8}

    def stream(conv, *args):
        yield {"text": "Par", "error_code": 0, "usage": {}}
        yield {"text": "Paris", "error_code": 0, "usage": usage}

    conv.append_message("user", "Capital of France?")
    conv.append_message("assistant", None)
    for _ in with_answer_stats(stream)(conv):
        pass
    conv.update_last_message("Paris")
    answer = conv.to_gradio_chatbot()[-1][1]
    assert answer.startswith("Paris\n\n*2.00 tokens per forward · ") and answer.endswith(" tokens/s*")
    assert "tokens per forward" not in conv.get_prompt()
    assert stats_line({"completion_tokens": 3}, 0.5) == "*6.0 tokens/s*"

    def failing(conv, *args):
        yield {"text": "boom", "error_code": 50001}

    conv.update_last_message(None)                       # FastChat's regenerate
    for _ in with_answer_stats(failing)(conv):
        pass
    conv.update_last_message("boom")
    assert conv.to_gradio_chatbot()[-1][1] == "boom"
