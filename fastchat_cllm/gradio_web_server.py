"""`python -m fastchat_cllm.gradio_web_server`: FastChat's web UI (stock flags), taking each
model's conversation template from its worker."""

from ._entry import run

if __name__ == "__main__":
    run("fastchat_cllm.serving.launch", "web_server")
