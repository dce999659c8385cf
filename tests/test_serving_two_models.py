"""`serve` with two models (`--model-path` twice, or `--with-cllm`): one worker each behind the
one controller, ports and model paths checked first, ready once both answer."""
from __future__ import annotations

import socket

import pytest
import requests

from harness import free_ports, listed_models, post_json, save_adapter, tiny_folder
from fastchat_cllm import loading
from fastchat_cllm.serving.stack import Stack, StackError, parse, port_free


def test_model_paths_from_the_flags():
    assert parse([])[0].model_paths == [loading.DEFAULT_MODEL]
    assert parse(["--with-cllm"])[0].model_paths == [loading.DEFAULT_MODEL, loading.CLLM_MODEL]
    args, worker_args = parse(["--model-path", "a", "--model-path", "b", "--with-cllm",
                               "--window-size", "8"])
    assert args.model_paths == ["a", "b", loading.CLLM_MODEL] and worker_args == ["--window-size",
                                                                                   "8"]


def test_the_second_worker_port_and_the_model_names_are_checked(tmp_path):
    base = tiny_folder(tmp_path / "base")
    twin = tiny_folder(tmp_path / "other" / "base")
    with pytest.raises(StackError, match="would both be served as base"):
        Stack(*parse(["--model-path", str(base), "--model-path", str(twin)])).check_models()
    cllm = save_adapter(tmp_path / "cllm", str(base))
    with pytest.raises(StackError, match="--model-names names one model"):
        Stack(*parse(["--model-path", str(base), "--model-path", str(cllm),
                      "--model-names", "x"])).check_models()
    first, taken = free_then_taken()
    with taken:
        busy = first + 1
        controller, api = next(p for p in iter(lambda: free_ports(2), None)
                               if not {first, busy} & set(p))
        stack = Stack(*parse(["--model-path", str(base), "--model-path", str(cllm),
                              "--worker-port", str(busy - 1), "--controller-port",
                              str(controller), "--api-port", str(api)]))
        assert stack.workers == [f"http://127.0.0.1:{busy - 1}", f"http://127.0.0.1:{busy}"]
        with pytest.raises(StackError, match=f"port {busy} \\(--worker-port \\+ 1\\)"):
            stack.check_ports()


def free_then_taken() -> tuple[int, socket.socket]:
    """A free port and a listening socket on the port after it (the second worker's)."""
    while True:
        first = free_ports(1)[0]
        taken = socket.socket()
        try:
            taken.bind(("127.0.0.1", first + 1))
        except OSError:
            taken.close()
            continue
        taken.listen()
        if port_free("127.0.0.1", first):
            return first, taken
        taken.close()


def two_worker_ports() -> tuple[int, int, int]:
    """controller, API and first worker ports, the one after the worker free too."""
    while True:
        controller, api, worker = free_ports(3)
        if worker + 1 not in (controller, api) and port_free("127.0.0.1", worker + 1):
            return controller, api, worker


def test_serve_lists_both_models_and_each_answers(tmp_path):
    base = tiny_folder(tmp_path / "base")
    cllm = save_adapter(tmp_path / "cllm", str(base))
    controller, api, worker = two_worker_ports()
    args, worker_args = parse(["--model-path", str(base), "--model-path", str(cllm),
                               "--controller-port", str(controller), "--api-port", str(api),
                               "--worker-port", str(worker), "--logdir", str(tmp_path / "logs"),
                               "--device", "cpu"])
    stack = Stack(args, worker_args)
    try:
        stack.up()                                  # returns once both workers answer
        assert sorted(listed_models(stack.controller)) == ["base", "cllm"]
        cards = requests.get(stack.api + "/models", timeout=30).json()["data"]
        assert sorted(card["id"] for card in cards) == ["base", "cllm"]
        for name in ("base", "cllm"):
            reply = post_json(stack.api + "/completions", {"model": name, "prompt": "w5 w6",
                                                           "max_tokens": 1, "temperature": 0})
            assert reply.ok, reply.text
            assert reply.json()["model"] == name
            assert reply.json()["usage"]["completion_tokens"] == 1
        banner = stack.banner()
        assert f"worker     : http://127.0.0.1:{worker + 1}" in banner
        assert sorted(c.name for c in stack.children) == ["api", "controller", "worker",
                                                          "worker-2"]
    finally:
        stack.down()
