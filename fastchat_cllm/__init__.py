"""fastchat-cllm: serve Consistency LLMs through FastChat with KV-cached Jacobi decoding.

The FastChat plugin (adapter, prompt formats, fixes) registers when `fastchat_cllm.serving` is
imported; the launchers and the worker do that themselves.
"""
from .core import JacobiConfig, JacobiResult, JacobiStats, Step, jacobi_generate, jacobi_stream

__version__ = "0.1.0"
__all__ = ["JacobiConfig", "JacobiResult", "JacobiStats", "Step", "jacobi_generate",
           "jacobi_stream", "__version__"]
