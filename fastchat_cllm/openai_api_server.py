"""`python -m fastchat_cllm.openai_api_server`: FastChat's OpenAI-compatible API server (stock
flags) with the compatibility fixes applied."""
from .serving.launch import api_server

if __name__ == "__main__":
    api_server()
