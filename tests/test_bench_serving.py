"""The serving benchmark against a real OpenAI-compatible streaming server on 127.0.0.1.

The server here is small on purpose: it streams Jacobi-decoded tokens of a tiny random model
(one forward at a time under a lock, so concurrent streams interleave) in the chat-completions
SSE format, with a usage chunk only when asked for one and when `send_usage` is on; a prompt
containing FAIL gets an HTTP 500, one containing BREAK an error chunk in the stream (as FastChat
sends when a worker fails).
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import char_tokenizer, tiny_model
from fastchat_cllm import jacobi_stream
from fastchat_cllm.bench.__main__ import exit_status, main
from fastchat_cllm.bench.prompts import builtin_prompts, read_prompts
from fastchat_cllm.bench.serving import ServingConfig, percentile, run_serving

ROOT = pathlib.Path(__file__).resolve().parents[1]


class TinyChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, send_usage: bool):
        super().__init__(("127.0.0.1", 0), ChatHandler)
        self.model, self.tokenizer = tiny_model("llama"), char_tokenizer()
        self.send_usage, self.lock = send_usage, threading.Lock()
        self.completion_tokens: list[int] = []   # per finished request
        self.authorization: str | None = None    # the last request's Authorization header
        self.asked: list[str] = []               # every request's last message, as received

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class ChatHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json({"object": "list", "data": [{"id": "tiny", "object": "model", "created": 0,
                                                "owned_by": "test"}]})

    def _event(self, choices: list, usage: dict | None = None) -> None:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                 "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.flush()

    def do_POST(self):
        server: TinyChatServer = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.authorization = self.headers.get("Authorization")
        server.asked.append(request["messages"][-1]["content"])
        if "FAIL" in request["messages"][-1]["content"]:
            self.send_error(500, "asked to fail")
            return
        if "BREAK" in request["messages"][-1]["content"]:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'data: {"text": "worker lost", "error_code": 50002}\n\ndata: [DONE]\n\n')
            return
        ids = server.tokenizer.apply_chat_template(request["messages"], add_generation_prompt=True,
                                                   tokenize=True)["input_ids"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        steps = jacobi_stream(server.model, ids, max_new_tokens=request["max_tokens"], window_size=4)
        made = 0
        while True:
            with server.lock:
                step = next(steps)
            made += len(step.tokens)
            delta = {"content": server.tokenizer.decode(step.tokens)}
            self._event([{"index": 0, "delta": delta, "finish_reason": step.finish_reason}])
            if step.finish_reason:
                break
        if server.send_usage and request.get("stream_options", {}).get("include_usage"):
            self._event([], {"prompt_tokens": len(ids), "completion_tokens": made,
                             "total_tokens": len(ids) + made})
        self.wfile.write(b"data: [DONE]\n\n")
        server.completion_tokens.append(made)


@pytest.fixture
def chat_server(request):
    server = TinyChatServer(send_usage=request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("chat_server", [True], indirect=True)
def test_serving_cli_measures_each_concurrency_level(chat_server, tmp_path):
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    run = main(["--serve-url", chat_server.url, "--concurrency", "1,4", "--num-prompts", "3",
                "--max-new-tokens", "12", "--repeats", "2", "--out", str(out), "--plot", str(plot),
                "--api-key", "secret-key", "--timeout", "60"])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(run))
    assert chat_server.authorization == "Bearer secret-key" and "secret-key" not in out.read_text()
    assert data["config"]["timeout"] == 60
    assert data["mode"] == "serving" and data["model"] == "tiny"
    assert [level["concurrency"] for level in data["levels"]] == [1, 4]
    # warm-up + 1x2 + 4x2 requests, each of 12 tokens (a random model rarely says EOS early)
    assert len(chat_server.completion_tokens) == 1 + 2 + 8
    for level, made in zip(data["levels"], (chat_server.completion_tokens[1:3],
                                            chat_server.completion_tokens[3:])):
        assert level["requests"] == 2 * level["concurrency"] and level["failed"] == 0
        assert level["tokens"] == sum(made) and level["token_source"] == ["usage"]
        for name in ("ttft", "latency"):
            spread = [level[f"{name}_p{q}_s"] for q in (50, 90, 99)]
            assert 0 < spread[0] <= spread[1] <= spread[2] <= level["wall_s"], name
        assert level["ttft_p99_s"] <= level["latency_p99_s"]
        assert level["stream_tokens_per_second"] > 0 and level["aggregate_tokens_per_second"] > 0
        assert level["requests_per_second"] == pytest.approx(level["requests"] / level["wall_s"],
                                                             rel=1e-2)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # each request's prompt is its own: "Request N: " with N counting from the warm-up's 0
    questions = [p.messages[-1]["content"] for p in builtin_prompts()[:3]]
    asked = [re.fullmatch(r"Request (\d+): (.*)", q, re.S).groups() for q in chat_server.asked]
    assert sorted(int(n) for n, _ in asked) == list(range(11))
    assert Counter(questions.index(q) for _, q in asked) == {0: 5, 1: 4, 2: 2}


@pytest.mark.parametrize("chat_server", [True], indirect=True)
def test_repeat_prompts_sends_the_prompts_as_they_are(chat_server, tmp_path):
    run = main(["--serve-url", chat_server.url, "--concurrency", "2", "--num-prompts", "2",
                "--max-new-tokens", "3", "--repeat-prompts", "--out", str(tmp_path / "r.json")])
    questions = [p.messages[-1]["content"] for p in builtin_prompts()[:2]]
    assert sorted(chat_server.asked) == sorted([questions[0], *questions])   # warm-up, 2 streams
    assert run["config"]["distinct"] is False


@pytest.mark.parametrize("chat_server", [True], indirect=True)
def test_serving_reports_failed_requests_and_goes_on(chat_server, tmp_path):
    prompts = read_prompts_text(tmp_path, ["hello", "FAIL now", "more", "BREAK now"])
    config = ServingConfig(chat_server.url, "tiny", (4,), max_new_tokens=6)
    level = run_serving(config, prompts)["levels"][0]
    assert level["requests"] == 2 and level["failed"] == 2
    assert level["errors"][0].startswith("InternalServerError")
    assert level["errors"][1] == "StreamError: error_code 50002: worker lost"
    assert level["tokens"] == sum(chat_server.completion_tokens[1:])


@pytest.mark.parametrize("chat_server", [True], indirect=True)
def test_serving_cli_exits_1_and_names_the_errors_when_requests_fail(chat_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["hi", "FAIL", "yo"]))
    cmd = [sys.executable, "-m", "fastchat_cllm.bench", "--serve-url", chat_server.url,
           "--prompts", str(prompts), "--concurrency", "3", "--max-new-tokens", "4",
           "--out", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "concurrency 3: 1 of 3 requests failed: InternalServerError" in done.stderr
    assert json.loads((tmp_path / "r.json").read_text())["levels"][0]["failed"] == 1


def test_percentiles_interpolate_between_closest_ranks():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert [percentile([7.0], q) for q in (50, 90, 99)] == [7.0] * 3
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 90) == pytest.approx(90.1) and percentile(values, 99) == 99.01


def read_prompts_text(tmp_path, texts: list[str]):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    return read_prompts(path)


@pytest.mark.parametrize("chat_server", [False], indirect=True)
def test_serving_counts_tokens_with_a_tokenizer_when_the_stream_has_no_usage(chat_server):
    prompts = builtin_prompts()[:2]
    config = ServingConfig(chat_server.url, "tiny", (2,), max_new_tokens=10)
    result = run_serving(config, prompts, char_tokenizer())
    level = result["levels"][0]
    assert level["token_source"] == ["tokenizer"]
    assert level["tokens"] == sum(chat_server.completion_tokens[1:])
    without = run_serving(config, prompts)["levels"][0]
    assert without["token_source"] == ["chunks"] and without["tokens"] > 0


def test_compare_stock_worker_measures_ours_and_stock_side_by_side(tiny_served, tmp_path, capsys):
    """One command, two real stacks on loopback (stock controller, the worker, our API server):
    ours, then FastChat's stock model_worker, on the same folder, prompts and load."""
    out, plot, logs = tmp_path / "compare.json", tmp_path / "compare.png", tmp_path / "logs"
    run = main(["--compare-stock-worker", "--model", str(tiny_served), "--concurrency", "1,2",
                "--num-prompts", "2", "--max-new-tokens", "8", "--device", "cpu",
                "--logdir", str(logs), "--timeout", "120", "--out", str(out), "--plot", str(plot)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(run))
    assert exit_status(run) == 0
    assert run["mode"] == "serving-compare" and not run["saved_as_hf_folder"]
    assert run["config"]["workers"] == {"fastchat-cllm": "fastchat_cllm.worker",
                                        "stock": "fastchat_cllm.stock_worker"}
    sides = run["workers"]
    assert list(sides) == ["fastchat-cllm", "stock"]
    for side, result in sides.items():
        assert result["model"] == "tiny", side
        assert [level["concurrency"] for level in result["levels"]] == [1, 2], side
        for level in result["levels"]:
            assert level["requests"] == level["concurrency"] and level["failed"] == 0, side
            assert level["tokens"] > 0 and level["aggregate_tokens_per_second"] > 0, side
            assert level["ttft_p90_s"] > 0 and level["requests_per_second"] > 0, side
            assert level["token_source"] == ["tokenizer"], side    # one rule for both sides
    # the same greedy model on the same prompts: the same completions, counted alike
    assert [l["tokens"] for l in sides["stock"]["levels"]] == \
        [l["tokens"] for l in sides["fastchat-cllm"]["levels"]]
    # each side really ran its own worker: stock's writes its own log line and file
    assert "Loading the model ['tiny'] on worker" in (logs / "stock" / "worker.log").read_text()
    assert "Loading the model" not in (logs / "fastchat-cllm" / "worker.log").read_text()
    table = capsys.readouterr().out
    for row in ("| 1 | fastchat-cllm | 1 (0) |", "| 1 | stock | 1 (0) | ",
                "| 2 | fastchat-cllm | 2 (0) |", "| 2 | stock | 2 (0) | "):
        assert row in table
    assert plot.read_bytes()[:4] == b"\x89PNG"
