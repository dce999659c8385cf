"""Launchers of FastChat's front ends with our fixes: each checks the installed FastChat first
(version and every stock name we use: one line and exit 1 on a mismatch), then builds the stock
app explicitly, adds our routes and fixes to it, and runs it. Everything binds 127.0.0.1 unless
told otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
from functools import partial

from .. import loading
from .._entry import fail
from . import body_limit, compat, openai_routes, stock

CONTROLLER = "http://127.0.0.1:21001"


def _defaults(defaults: dict[str, str]) -> None:
    """sys.argv plus `defaults` for the flags not given (the stock parser reads sys.argv)."""
    for flag, value in defaults.items():
        if not any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:]):
            sys.argv += [flag, value]


def _checked(start):
    """Run a launcher; a FastChat mismatch stops it with one line."""
    def launcher() -> None:
        try:
            start()
        except stock.StockMismatch as e:
            fail(str(e))
    launcher.__doc__ = start.__doc__
    return launcher


def _ssl(enabled: bool) -> dict:
    return {"ssl_keyfile": os.environ["SSL_KEYFILE"],
            "ssl_certfile": os.environ["SSL_CERTFILE"]} if enabled else {}


@_checked
def api_server() -> None:
    """FastChat's OpenAI API server (stock flags) with our chat/completions routes."""
    import uvicorn

    compat.fix_protocol()                  # before the stock module takes the models by name
    server = stock.load("fastchat.serve.openai_api_server")
    ours = argparse.ArgumentParser(add_help=False, usage=argparse.SUPPRESS,
                                   description="fastchat-cllm's own flag (FastChat's follow):")
    ours.add_argument("--max-request-bytes", type=int, default=body_limit.DEFAULT_MAX_BYTES,
                      help="larger request bodies are refused with 413 before parsing")
    limits, sys.argv[1:] = ours.parse_known_args()
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(ours.format_help())
    if limits.max_request_bytes < 1:
        fail(f"--max-request-bytes must be >= 1, got {limits.max_request_bytes}")
    # before create_openai_api_server adds CORS: middleware added later runs first, so a 413
    # still carries the CORS headers a browser client needs to read it
    server.app.add_middleware(body_limit.BodyLimit, max_bytes=limits.max_request_bytes)
    _defaults({"--host": "127.0.0.1", "--controller-address": CONTROLLER})
    args = server.create_openai_api_server()
    openai_routes.install(server.app, server)
    compat.answer_unreachable_worker(server.app)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="info", **_ssl(args.ssl))


def web_parser() -> argparse.ArgumentParser:
    """The stock web UI's flags (fastchat.serve.gradio_web_server's own parser)."""
    p = argparse.ArgumentParser(description="FastChat's web UI over Jacobi workers")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int)
    p.add_argument("--share", action="store_true")
    p.add_argument("--controller-url", default=CONTROLLER)
    p.add_argument("--concurrency-count", type=int, default=10)
    p.add_argument("--model-list-mode", default="once", choices=["once", "reload"])
    p.add_argument("--moderate", action="store_true")
    p.add_argument("--show-terms-of-use", action="store_true")
    p.add_argument("--register-api-endpoint-file")
    p.add_argument("--gradio-auth-path")
    p.add_argument("--gradio-root-path")
    return p


@_checked
def web_server() -> None:
    """FastChat's web UI: templates from the workers, a statistics line under each answer."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from . import web_ui

    web = stock.load("fastchat.serve.gradio_web_server")
    args = web_parser().parse_args()
    web.args = args                        # the stock UI reads its flags from this global
    web.set_global_vars(args.controller_url, args.moderate)
    web.get_conversation_template = web_ui.asking_worker(args.controller_url,
                                                         web.get_conversation_template)
    web.model_worker_stream_iter = web_ui.with_answer_stats(web.model_worker_stream_iter)
    web.get_model_list = web_ui.describing(web.get_model_list)
    models, _ = web.get_model_list(args.controller_url, args.register_api_endpoint_file, False)
    web.models = models                    # ... and its model list from this one
    auth = web.parse_gradio_auth_creds(args.gradio_auth_path) if args.gradio_auth_path else None
    demo = web.build_demo(models)
    demo.queue(default_concurrency_limit=args.concurrency_count, status_update_rate=10,
               api_open=False).launch(server_name=args.host, server_port=args.port,
                                      share=args.share, max_threads=200, auth=auth,
                                      root_path=args.gradio_root_path)


def chat_parser() -> argparse.ArgumentParser:
    """The stock terminal chat's flags (but --judge-sent-end, which Jacobi decoding cannot
    honour) plus the Jacobi flags; greedy by default."""
    import torch
    from fastchat.model.model_adapter import add_model_args

    from .options import add_jacobi_args

    p = argparse.ArgumentParser(description="FastChat's terminal chat, decoding with Jacobi "
                                            "iterations (fastchat-cllm)")
    add_model_args(p)
    p.set_defaults(model_path=loading.DEFAULT_MODEL,
                   device="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--conv-template", default=None, help="conversation prompt template")
    p.add_argument("--conv-system-msg", default=None, help="conversation system message")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--no-history", action="store_true")
    p.add_argument("--style", default="simple", choices=["simple", "rich", "programmatic"])
    p.add_argument("--multiline", action="store_true")
    p.add_argument("--mouse", action="store_true")
    p.add_argument("--debug", action="store_true", help="print the prompts")
    p.add_argument("--judge-sent-end", action="store_true", help=argparse.SUPPRESS)
    add_jacobi_args(p)
    return p


@_checked
def terminal_chat() -> None:
    """FastChat's terminal chat decoding with Jacobi iterations (greedy unless --temperature)."""
    from .options import jacobi_config
    from .stream import generate_stream

    inference = stock.load("fastchat.serve.inference")
    cli = stock.load("fastchat.serve.cli")
    from .worker import refuse_unsupported

    parser = chat_parser()
    args = parser.parse_args()
    if args.judge_sent_end:
        parser.error("--judge-sent-end cannot be honoured by the Jacobi chat (its window "
                     "decides what is final, not a sentence-end rule)")
    refuse_unsupported(parser, args)
    config = jacobi_config(parser, args)
    args.judge_sent_end = False
    inference.get_generate_stream_function = lambda model, path: partial(generate_stream,
                                                                         jacobi=config)
    cli.main(args)
