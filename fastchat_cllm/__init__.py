"""fastchat-cllm: serve Consistency LLMs through FastChat with KV-cached Jacobi decoding."""
from .core import JacobiConfig, JacobiResult, JacobiStats, Step, jacobi_generate, jacobi_stream
from .plugin_hook import arm as _arm_fastchat_plugin

__version__ = "0.1.0"
__all__ = ["JacobiConfig", "JacobiResult", "JacobiStats", "Step", "jacobi_generate",
           "jacobi_stream", "__version__"]

# Registers the CLLM adapter into FastChat when (and only once) FastChat's adapters are imported;
# imports no FastChat itself.
_arm_fastchat_plugin()
