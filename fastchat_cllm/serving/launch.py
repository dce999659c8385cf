"""Launchers: register the plugin, apply the compatibility fixes, then run FastChat's own module
unchanged (runpy, as `python -m` would). Everything binds 127.0.0.1 unless told otherwise."""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from functools import partial

from .. import loading
from . import compat, openai_routes, plugin

CONTROLLER = "http://127.0.0.1:21001"


def _given(flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:])


def run_stock(module: str, defaults: dict[str, str]) -> None:
    """Run `module` as __main__ with sys.argv plus `defaults` for the flags not given."""
    plugin.register()
    for flag, value in defaults.items():
        if not _given(flag):
            sys.argv += [flag, value]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def api_server() -> None:
    compat.fix_streaming_json()
    compat.keep_jacobi_usage()
    compat.check_requests()
    compat.fix_app_when_served(compat.answer_unreachable_worker, openai_routes.install)
    run_stock("fastchat.serve.openai_api_server",
              {"--host": "127.0.0.1", "--controller-address": CONTROLLER})


def web_server() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--controller-url", default=CONTROLLER)
    compat.web_ui_asks_worker(peek.parse_known_args()[0].controller_url)
    run_stock("fastchat.serve.gradio_web_server",
              {"--host": "127.0.0.1", "--controller-url": CONTROLLER})


def terminal_chat() -> None:
    """FastChat's terminal chat decoding with Jacobi iterations (greedy unless --temperature)."""
    import torch
    from fastchat.serve import inference

    from .options import add_jacobi_args, jacobi_config
    from .stream import generate_stream

    parser = argparse.ArgumentParser(add_help=False)
    add_jacobi_args(parser)
    args, rest = parser.parse_known_args()
    if "--judge-sent-end" in rest:
        parser.error("--judge-sent-end cannot be honoured by the Jacobi chat")
    sys.argv[1:] = rest
    config = jacobi_config(parser, args)
    inference.get_generate_stream_function = lambda model, path: partial(generate_stream,
                                                                         jacobi=config)
    run_stock("fastchat.serve.cli", {
        "--model-path": loading.DEFAULT_MODEL, "--temperature": "0",
        "--device": "cuda" if torch.cuda.is_available() else "cpu"})
