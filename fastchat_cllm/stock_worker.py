"""`python -m fastchat_cllm.stock_worker`: FastChat's stock model_worker (every stock flag), made
to start on transformers 5 and to format prompts as our worker does; for comparisons."""

from ._entry import run

if __name__ == "__main__":
    run("fastchat_cllm.serving.stock_worker", "main")
