"""Benchmarks: Jacobi decoding against autoregressive and speculative peers, offline and served.

`python -m fastchat_cllm.bench --help`. The offline mode imports no FastChat; the serving mode
talks to a running stack through its OpenAI-compatible API only.
"""
from .offline import DEFAULT_METHODS, OfflineConfig, run_offline
from .serving import ServingConfig, run_serving

__all__ = ["DEFAULT_METHODS", "OfflineConfig", "ServingConfig", "run_offline", "run_serving"]
