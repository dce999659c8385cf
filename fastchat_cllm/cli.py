"""`python -m fastchat_cllm.cli [--model-path P]`: FastChat's terminal chat, decoding with
Jacobi iterations and streaming as tokens are accepted."""
from .serving.launch import terminal_chat

if __name__ == "__main__":
    terminal_chat()
