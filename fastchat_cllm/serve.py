"""`python -m fastchat_cllm.serve [--model-path P] [--web] [ports...]`: controller, Jacobi worker,
OpenAI API server (and web UI) on 127.0.0.1 in one command; Ctrl-C stops them all."""

import sys

from ._entry import run

if __name__ == "__main__":
    sys.exit(run("fastchat_cllm.serving.stack", "main"))
