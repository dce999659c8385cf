"""`python -m fastchat_cllm.openai_api_server`: FastChat's OpenAI-compatible API server (stock
flags) with the compatibility fixes applied."""

from ._entry import run

if __name__ == "__main__":
    run("fastchat_cllm.serving.launch", "api_server")
