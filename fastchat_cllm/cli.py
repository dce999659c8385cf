"""`python -m fastchat_cllm.cli [--model-path P]`: FastChat's terminal chat, decoding with
Jacobi iterations and streaming as tokens are accepted."""

from ._entry import run

if __name__ == "__main__":
    run("fastchat_cllm.serving.launch", "terminal_chat")
