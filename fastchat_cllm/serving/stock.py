"""The stock FastChat this package builds on: its version and every name we take from it, checked
at start-up so a mismatch stops a launcher with one line instead of failing at the first request.
"""
from __future__ import annotations

import importlib

FASTCHAT_VERSION = "0.2.36"

# module -> the names our launchers, worker and routes use from it; the front ends' modules are
# checked by the launcher that imports them (stock.load), the others when fastchat_cllm.serving
# is imported (check_shell)
FRONT_ENDS = ("fastchat.serve.openai_api_server", "fastchat.serve.gradio_web_server",
              "fastchat.serve.inference", "fastchat.serve.cli")
NAMES = {
    "fastchat.serve.openai_api_server": (
        "app", "app_settings", "create_openai_api_server", "check_api_key",
        "create_error_response", "check_model", "check_requests", "get_worker_address",
        "get_gen_params", "check_length", "fetch_remote", "UsageInfo"),
    "fastchat.serve.gradio_web_server": (
        "set_global_vars", "get_model_list", "build_demo", "parse_gradio_auth_creds",
        "model_worker_stream_iter", "get_conversation_template", "State"),
    "fastchat.serve.base_model_worker": ("BaseModelWorker",),
    "fastchat.serve.inference": ("get_generate_stream_function", "chat_loop"),
    "fastchat.serve.cli": ("main",),
    "fastchat.model.model_adapter": (
        "BaseModelAdapter", "model_adapters", "get_model_adapter", "get_conversation_template",
        "add_model_args"),
    "fastchat.model.model_registry": ("register_model_info", "get_model_info"),
    "fastchat.protocol.openai_api_protocol": (
        "ChatCompletionRequest", "CompletionRequest", "UsageInfo", "ChatCompletionResponse",
        "ChatCompletionStreamResponse"),
    "fastchat.conversation": ("Conversation", "SeparatorStyle", "conv_templates",
                              "register_conv_template"),
    "fastchat.utils": ("get_context_length", "SEQUENCE_LENGTH_KEYS", "str_to_torch_dtype"),
}


class StockMismatch(ImportError):
    """The installed FastChat is not the one this package was built on (or is missing)."""


def check_version() -> None:
    try:
        import fastchat
    except ImportError as e:
        raise StockMismatch(f"FastChat is not installed ({e}); pip install "
                            f"'fastchat-cllm[serve]' (fschat=={FASTCHAT_VERSION})") from e
    found = getattr(fastchat, "__version__", "unknown")
    if found != FASTCHAT_VERSION:
        raise StockMismatch(f"fastchat-cllm needs fschat=={FASTCHAT_VERSION}, found {found} "
                            f"(pip install 'fschat=={FASTCHAT_VERSION}')")


def check_shell() -> None:
    """The names the plugin and the worker use (every module of NAMES but the front ends')."""
    for module_name in NAMES:
        if module_name not in FRONT_ENDS:
            load(module_name)


def load(module_name: str):
    """Import a stock module and check that it has every name we use from it."""
    module = importlib.import_module(module_name)
    missing = [name for name in NAMES[module_name] if not hasattr(module, name)]
    if missing:
        raise StockMismatch(f"{module_name} lacks {', '.join(missing)}: fastchat-cllm needs "
                            f"fschat=={FASTCHAT_VERSION}")
    return module
