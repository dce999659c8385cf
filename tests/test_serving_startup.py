"""Start-up of the serving shell: the worker joins the controller only once it answers, `serve`
refuses busy ports before starting anything, and a FastChat other than the one we were built
on stops every launcher with one line."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
import requests

from harness import MODEL, free_ports, listed_models, spawn, stop, wait_for, worker_status

pytestmark = pytest.mark.slow
WORKER_START = 300


def test_worker_is_listed_only_once_it_answers(tmp_path):
    """The old race: the worker registered before its HTTP server listened, so a
    /refresh_all_workers in that gap (the API server's /v1/models sends one) found its status
    refused and dropped it until the next heartbeat, 45 s later. Refresh as fast as the
    controller answers while the worker starts: once listed, it must stay listed."""
    controller_port, worker_port = free_ports(2)
    controller = f"http://127.0.0.1:{controller_port}"
    processes = [spawn(tmp_path / "controller.log", "fastchat.serve.controller",
                       "--host", "127.0.0.1", "--port", str(controller_port))]
    try:
        wait_for(lambda: listed_models(controller) is not None, 120, "the controller answers")
        processes.append(spawn(
            tmp_path / "worker.log", "fastchat_cllm.worker", "--port", str(worker_port),
            "--controller-address", controller, "--dtype", "float32"))
        listed_at, refreshes = None, 0
        deadline = time.monotonic() + WORKER_START
        while time.monotonic() < deadline:
            assert processes[1].poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            requests.post(controller + "/refresh_all_workers", timeout=30)
            refreshes += 1
            models = listed_models(controller)
            if listed_at is None and models:
                listed_at = refreshes
            if listed_at is not None:
                assert models == [MODEL], (f"listed at refresh {listed_at}, dropped at "
                                           f"{refreshes}")
                if refreshes - listed_at >= 20:
                    break
        assert listed_at is not None, "the worker never registered"
        assert worker_status(f"http://127.0.0.1:{worker_port}")["model_names"] == [MODEL]
    finally:
        for process in reversed(processes):
            stop(process)


def test_serve_refuses_a_busy_port_before_starting_anything(tmp_path):
    ports = free_ports(4)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[1]))
        taken.listen()
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "fastchat_cllm.serve", "--controller-port", str(ports[0]),
             "--worker-port", str(ports[1]), "--api-port", str(ports[2]),
             "--logdir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"fastchat_cllm.serve: port {ports[1]} (--worker-port) on "
                                   f"127.0.0.1 is already in use")
    assert "started" not in done.stdout and time.monotonic() - started < 60
    same = subprocess.run(
        [sys.executable, "-m", "fastchat_cllm.serve", "--controller-port", str(ports[3]),
         "--api-port", str(ports[3]), "--logdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120)
    assert same.returncode == 1
    assert same.stderr.strip() == (f"fastchat_cllm.serve: --api-port and --controller-port "
                                   f"are both {ports[3]}")


SHIM = ("import sys, runpy, fastchat{extra}; {change}; sys.argv[0] = {prog!r}; "
        "runpy.run_module({module!r}, run_name='__main__')")


def launch_with(module: str, change: str, extra: str = "") -> subprocess.CompletedProcess:
    prog = module.rsplit(".", 1)[1]
    code = SHIM.format(extra=extra, change=change, prog=prog, module=module)
    return subprocess.run([sys.executable, "-c", code, "--port", "1"], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("module", ["fastchat_cllm.openai_api_server", "fastchat_cllm.worker",
                                    "fastchat_cllm.gradio_web_server", "fastchat_cllm.cli",
                                    "fastchat_cllm.serve"])
def test_another_fastchat_version_stops_every_launcher_with_one_line(module):
    done = launch_with(module, "fastchat.__version__ = '0.2.35'")
    prog = module.rsplit(".", 1)[1]
    assert done.returncode == 1
    assert done.stderr.strip() == (f"{prog}: error: fastchat-cllm needs fschat==0.2.36, found "
                                   f"0.2.35 (pip install 'fschat==0.2.36')")


def test_a_missing_stock_name_stops_the_launcher_with_one_line():
    done = launch_with("fastchat_cllm.gradio_web_server",
                       "del fastchat.serve.gradio_web_server.build_demo",
                       extra=", fastchat.serve.gradio_web_server")
    assert done.returncode == 1
    assert done.stderr.strip() == ("gradio_web_server: error: fastchat.serve.gradio_web_server "
                                   "lacks build_demo: fastchat-cllm needs fschat==0.2.36")


def test_api_server_help_lists_its_own_flag():
    done = subprocess.run([sys.executable, "-m", "fastchat_cllm.openai_api_server", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--max-request-bytes" in done.stdout and "--controller-address" in done.stdout


@pytest.mark.parametrize("flag, reason", [("--judge-sent-end", "cannot be honoured by the "
                                           "Jacobi chat"),
                                          ("--load-8bit", "--load-8bit cannot be honoured")])
def test_terminal_chat_refuses_what_it_cannot_honour(flag, reason):
    done = subprocess.run([sys.executable, "-m", "fastchat_cllm.cli", flag],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and reason in done.stderr, done.stderr[-2000:]


def test_terminal_chat_help_lists_the_jacobi_flags_and_not_the_refused_one():
    done = subprocess.run([sys.executable, "-m", "fastchat_cllm.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--window-size" in done.stdout and "--model-path" in done.stdout
    assert "--judge-sent-end" not in done.stdout


def test_a_step_that_cannot_compile_runs_eagerly_under_auto_and_stops_start_up_under_on(caplog):
    """--compile auto (the CPU's default) must not cost a worker that ran before its start: a
    model whose forward breaks the graph is served eagerly, with a warning; --compile on stops
    start-up with the reason and the way out."""
    import torch

    from harness import tiny_greedy, tiny_model
    from fastchat_cllm.serving.worker import StartupError, build_engine

    model = tiny_model("llama", dtype=torch.float64)
    model.model.embed_tokens.register_forward_hook(lambda *_: torch._dynamo.graph_break())
    with caplog.at_level("WARNING", logger="fastchat_cllm.worker"):
        engine = build_engine(model, 2, 64, 16, compile=True, required=False)
    assert engine.runner.compiled is None
    assert "cannot compile the step" in caplog.text and "runs its step eagerly" in caplog.text
    engine.add([5, 6, 7], max_new_tokens=4)
    tokens = []
    while engine.has_work:
        tokens += [t for _, step in engine.step() for t in step.tokens]
    assert tokens == tiny_greedy("llama", [5, 6, 7], 4, dtype=torch.float64)
    with pytest.raises(StartupError, match=r"cannot compile the step.*--compile off"):
        build_engine(model, 2, 64, 16, compile=True, required=True)
    broken = tiny_model("llama", dtype=torch.float64)     # an error of the model itself is
    broken.model.norm.register_forward_hook(             # not a compile's: it stops start-up
        lambda *_: (_ for _ in ()).throw(ValueError("a model that cannot run")))
    with pytest.raises(StartupError, match="cannot build the engine.*a model that cannot run"):
        build_engine(broken, 2, 64, 16, compile=True, required=False)


def test_compile_auto_is_on_for_the_cpu_where_memory_holds_it():
    """--compile auto: the CPU compiles unless the system's available memory is below the
    weights and cache again (a prepacked copy of the weights); CUDA does not (not measured);
    on and off are what they say; the cache's bytes are what a SlotCache allocates."""
    import torch

    from harness import tiny_model
    from fastchat_cllm.core.engine import SlotCache
    from fastchat_cllm.serving.worker import available_memory, compile_step

    gib = 2 ** 30
    assert compile_step("auto", "cpu", gib, 8 * gib) == (True, "")
    assert compile_step("auto", "cpu", gib, None) == (True, "")
    off, why = compile_step("auto", "cpu", 4 * gib, 3 * gib)
    assert not off and "4.0 GiB" in why and "3.0 GiB" in why
    assert compile_step("on", "cpu", 4 * gib, 3 * gib) == (True, "")
    assert compile_step("auto", "cuda", gib, 8 * gib) == (False, "")
    assert compile_step("on", "cuda", gib, 8 * gib) == (True, "")
    assert compile_step("off", "cpu", gib, 8 * gib) == (False, "")
    assert (available_memory() or 0) > 0                  # Linux: /proc/meminfo says
    model = tiny_model("qwen2", dtype=torch.float64)
    assert SlotCache.bytes_for(model, 3, 40) == SlotCache(model, 3, 40).nbytes()
