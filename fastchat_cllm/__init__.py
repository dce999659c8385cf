"""fastchat-cllm: serve Consistency LLMs through FastChat with KV-cached Jacobi decoding."""
from .core import JacobiConfig, JacobiResult, JacobiStats, Step, jacobi_generate, jacobi_stream

__version__ = "0.1.0"
__all__ = ["JacobiConfig", "JacobiResult", "JacobiStats", "Step", "jacobi_generate",
           "jacobi_stream", "__version__"]
