"""Scale-out: two of our workers serve the same model behind one stock controller.

FastChat's controller dispatches each request of a model to one of its workers (default
`--dispatch-method shortest_queue`: the shortest queue as the worker's last heartbeat reported
it, plus one for each request handed to it since); the API server asks it once per request.
Sixteen concurrent requests through the API server: both workers serve some, as each worker's
own count of finished requests (/worker_get_status, "jacobi") shows. The second worker runs
with --no-prefix-cache: it prefills every prompt in full.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import requests

from harness import free_ports, post_json, spawn, start_stack, stop, wait_for, worker_status

REQUESTS = 16


def controller_status(controller: str) -> dict:
    """The controller's sum over its live workers: model names, speed (1 a worker), queue."""
    return requests.post(controller + "/worker_get_status", timeout=10).json()


def test_two_workers_behind_one_controller_both_serve(tiny_served, tmp_path):
    stack = start_stack(tmp_path / "logs", "--model-path", str(tiny_served), "--device", "cpu",
                        model="tiny")
    port = free_ports(1)[0]
    second = f"http://127.0.0.1:{port}"
    process = spawn(tmp_path / "second-worker.log", "fastchat_cllm.worker", "--model-path",
                    str(tiny_served), "--device", "cpu", "--port", str(port),
                    "--worker-address", second, "--controller-address", stack.controller,
                    "--no-prefix-cache", "--compile", "off")
    try:
        def alive() -> None:
            stack.check_alive()
            assert process.poll() is None, (tmp_path / "second-worker.log").read_text()[-3000:]

        wait_for(lambda: controller_status(stack.controller)["speed"] == 2,
                 what="the controller counts two workers", check=alive)
        workers = (stack.worker, second)
        before = [worker_status(w)["jacobi"]["requests"] for w in workers]
        body = {"model": "tiny", "max_tokens": 8, "temperature": 0}

        def ask(i: int) -> requests.Response:
            question = [{"role": "user", "content": f"Request {i}: say something."}]
            return post_json(stack.api + "/chat/completions", {**body, "messages": question})

        with ThreadPoolExecutor(REQUESTS) as pool:
            replies = list(pool.map(ask, range(REQUESTS)))
        assert all(r.ok for r in replies), [r.text for r in replies if not r.ok]
        assert all(r.json()["usage"]["completion_tokens"] > 0 for r in replies)
        served = [worker_status(w)["jacobi"]["requests"] - b for w, b in zip(workers, before)]
        assert sum(served) == REQUESTS and min(served) > 0, served
        assert all(worker_status(w)["queue_length"] == 0 for w in workers)
        full = worker_status(second)["batch"]
        assert full["prompt_tokens"] > 0 and full["cached_prompt_tokens"] == 0
        log = (tmp_path / "second-worker.log").read_text()
        assert "prefix caching off" in log and "engine step: eager, linear layers prepacked" in log
        assert full["compiled"] is False and worker_status(stack.worker)["batch"]["compiled"]
    finally:
        stop(process)
        stack.down()
