"""`python -m fastchat_cllm.serve`: the stock controller, the Jacobi worker, the API server (and
the web UI with --web) on 127.0.0.1, started in order, watched, and stopped together.

`--model-path` given more than once (as FastChat's multi_model_worker takes it) serves each
model from its own worker, on --worker-port, --worker-port + 1, ...; `--with-cllm` adds the
package's CLLM (smollm2-135m-cllm) beside the model, so the API's /v1/models and the web UI's
model menu offer both. Before starting anything it checks the model paths and that its ports are
free; it says ready only once the controller lists every worker's model, the API server lists
them too, and a one-token request to each through the API server answers. Flags it does not
know go to every worker (e.g. --device cuda --window-size 32 --conv-template X).
Each process logs to <logdir>/<name>.log; when one dies, the others are stopped and its log's
tail is printed.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import requests

from .. import loading

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 900          # seconds; loading a 7B checkpoint can take minutes
STOP_TIMEOUT = 15
LINUX = sys.platform.startswith("linux")


class StackError(RuntimeError):
    pass


def _die_with_parent(parent: int) -> None:
    """In the child before exec (Linux): SIGTERM when serve dies, even by SIGKILL, so no
    server is left holding its port."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:         # serve died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log: Path

    def tail(self, lines: int = 25) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Other flags are passed to fastchat_cllm.worker.")
    p.add_argument("--model-path", action="append", dest="model_paths", metavar="PATH",
                   help=f"model to serve (default {loading.DEFAULT_MODEL}); give it again to "
                        "serve several side by side, one worker each")
    p.add_argument("--with-cllm", action="store_true",
                   help=f"also serve {loading.CLLM_MODEL}, the CLLM of the default model")
    p.add_argument("--web", action="store_true", help="also start the web UI")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--controller-port", type=int, default=21001)
    p.add_argument("--worker-port", type=int, default=21002)
    p.add_argument("--api-port", type=int, default=8000)
    p.add_argument("--web-port", type=int, default=7860)
    p.add_argument("--api-keys", default=None,
                   help="comma-separated keys the API server requires (Bearer token)")
    p.add_argument("--logdir", default=os.environ.get("LOGDIR") or
                   os.path.join(tempfile.gettempdir(), "fastchat-cllm-logs"))
    args, worker_args = p.parse_known_args(argv)
    args.model_paths = (args.model_paths or [loading.DEFAULT_MODEL]) + (
        [loading.CLLM_MODEL] if args.with_cllm else [])
    return args, worker_args


class Stack:
    """The processes of one stack; `worker_module` is the worker it starts (ours by default;
    the benchmark's comparison starts FastChat's stock one, fastchat_cllm.stock_worker)."""

    def __init__(self, args: argparse.Namespace, worker_args: list[str],
                 worker_module: str = "fastchat_cllm.worker"):
        self.args, self.worker_args, self.worker_module = args, worker_args, worker_module
        self.logdir = Path(args.logdir)
        self.children: list[Child] = []
        host = args.host
        self.controller = f"http://{host}:{args.controller_port}"
        self.workers = [f"http://{host}:{args.worker_port + i}"
                        for i in range(len(args.model_paths))]
        self.worker = self.workers[0]
        self.api = f"http://{host}:{args.api_port}/v1"
        self.web = f"http://{host}:{args.web_port}"

    def start(self, name: str, module: str, *flags: str) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.log"
        env = {**os.environ, "LOGDIR": str(self.logdir), "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:   # the child keeps its own handle
            process = subprocess.Popen([sys.executable, "-m", module, *flags], stdout=out,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       preexec_fn=partial(_die_with_parent, os.getpid())
                                       if LINUX else None)
        self.children.append(Child(name, process, log))
        print(f"started {name} (pid {process.pid}, log {log})", flush=True)

    def check_alive(self) -> None:
        for child in self.children:
            if child.process.poll() is not None:
                raise StackError(f"{child.name} exited with code {child.process.returncode}; "
                                 f"last lines of {child.log}:\n{child.tail()}")

    def wait(self, what: str, ready) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise StackError(f"{what} not ready after {START_TIMEOUT} s")

    def models(self) -> list[str]:
        return requests.post(self.controller + "/list_models", timeout=5).json()["models"]

    def workers_listed(self) -> bool:
        """Whether the controller lists the models of every worker (each asked directly)."""
        listed = set(self.models())
        return all(set(requests.post(url + "/worker_get_status", timeout=5).json()["model_names"])
                   <= listed for url in self.workers)

    def ports(self) -> dict[str, int]:
        a = self.args
        ports = {"--controller-port": a.controller_port, "--worker-port": a.worker_port,
                 **{f"--worker-port + {i}": a.worker_port + i
                    for i in range(1, len(a.model_paths))},
                 "--api-port": a.api_port}
        if a.web:
            ports["--web-port"] = a.web_port
        return ports

    def check_ports(self) -> None:
        """Stop before starting anything if a port is taken (another stack's controller would
        otherwise be joined silently) or named twice."""
        seen: dict[int, str] = {}
        for flag, port in self.ports().items():
            if port in seen:
                raise StackError(f"{flag} and {seen[port]} are both {port}")
            seen[port] = flag
            if not port_free(self.args.host, port):
                raise StackError(f"port {port} ({flag}) on {self.args.host} is already in use")

    def check_models(self) -> None:
        """Stop before starting anything on a model path that cannot load (a missing or corrupt
        adapter file, say) or two models that would be served under one name."""
        names: dict[str, str] = {}
        for path in self.args.model_paths:
            try:
                loading.resolve(path)
            except (ValueError, FileNotFoundError) as e:
                raise StackError(f"--model-path {path}: {e}") from None
            name = loading.model_name(path)
            if name in names:
                raise StackError(f"--model-path {names[name]} and {path} would both be served "
                                 f"as {name}")
            names[name] = path
        if len(names) > 1 and any(a.split("=")[0] == "--model-names" for a in self.worker_args):
            raise StackError("--model-names names one model; with several --model-path each "
                             "is served under its own name")

    def serving(self) -> list[str]:
        """The models the API server lists, once a one-token completion of each answers."""
        listed = requests.get(self.api + "/models", timeout=10, headers=self.auth())
        names = [card["id"] for card in listed.json()["data"]] if listed.ok else []
        if not names or not set(self.models()) <= set(names):
            return []
        for name in names:
            answer = requests.post(self.api + "/completions", headers=self.auth(), timeout=300,
                                   json={"model": name, "prompt": "Hi", "max_tokens": 1})
            if 400 <= answer.status_code < 500 and answer.status_code != 429:
                raise StackError(f"the first request to {name} was refused "
                                 f"({answer.status_code}): {answer.text[:500]}")
            if not answer.ok:
                return []
        return names

    def up(self) -> None:
        a = self.args
        self.check_models()
        self.check_ports()
        self.start("controller", "fastchat.serve.controller", "--host", a.host,
                   "--port", str(a.controller_port))
        self.wait("the controller", lambda: self.models() is not None)
        for i, (path, url) in enumerate(zip(a.model_paths, self.workers)):
            self.start("worker" if i == 0 else f"worker-{i + 1}", self.worker_module,
                       "--model-path", path, "--host", a.host, "--port", str(a.worker_port + i),
                       "--worker-address", url, "--controller-address", self.controller,
                       *self.worker_args)
        keys = ("--api-keys", a.api_keys) if a.api_keys else ()
        self.start("api", "fastchat_cllm.openai_api_server", "--host", a.host,
                   "--port", str(a.api_port), "--controller-address", self.controller, *keys)
        print(f"loading {', '.join(a.model_paths)} ...", flush=True)
        self.wait("the worker" if len(self.workers) == 1 else "the workers", self.workers_listed)
        self.wait("the API server", lambda: bool(self.serving()))
        if a.web:
            self.start("web", "fastchat_cllm.gradio_web_server", "--host", a.host,
                       "--port", str(a.web_port), "--controller-url", self.controller)
            self.wait("the web UI", lambda: requests.get(self.web, timeout=10).ok)

    def auth(self) -> dict:
        key = self.args.api_keys and self.args.api_keys.split(",")[0]
        return {"Authorization": f"Bearer {key}"} if key else {}

    def banner(self) -> str:
        lines = [f"fastchat-cllm is serving {', '.join(self.models())}",
                 f"  OpenAI API : {self.api}   (try: curl {self.api}/models)",
                 f"  controller : {self.controller}"]
        lines += [f"  worker     : {url}   (Jacobi totals: POST {url}/worker_get_status)"
                  for url in self.workers]
        if self.args.web:
            lines.append(f"  web UI     : {self.web}")
        lines += [f"  logs       : {self.logdir}", "Ctrl-C stops everything."]
        return "\n".join(lines)

    def watch(self) -> None:
        while True:
            self.check_alive()
            time.sleep(1)

    def down(self) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
        for child in reversed(self.children):
            try:
                child.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        if self.children:
            print("stopped " + ", ".join(c.name for c in reversed(self.children)), flush=True)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` different ports free on `host`, picked by the system (all held open while picked)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind((host, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port (as uvicorn binds: SO_REUSEADDR set)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args, worker_args = parse(argv)
    for signum in (signal.SIGINT, signal.SIGTERM):   # SIGINT too: a shell may start us ignoring it
        signal.signal(signum, _terminate)
    stack = Stack(args, worker_args)
    try:
        stack.up()
        print(stack.banner(), flush=True)
        stack.watch()
    except KeyboardInterrupt:
        return 0
    except StackError as e:
        print(f"fastchat_cllm.serve: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stack.down()
