"""`python -m fastchat_cllm.worker`: FastChat's model worker with Jacobi decoding (every stock
model_worker flag, plus --window-size and the other Jacobi flags)."""

from ._entry import run

if __name__ == "__main__":
    run("fastchat_cllm.serving.worker", "main")
