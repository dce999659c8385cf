"""`python -m fastchat_cllm.gradio_web_server`: FastChat's web UI (stock flags), taking each
model's conversation template from its worker."""
from .serving.launch import web_server

if __name__ == "__main__":
    web_server()
