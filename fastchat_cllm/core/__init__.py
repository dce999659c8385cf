"""The decoding core: torch + transformers only (no FastChat, no web stack)."""
from .config import JacobiConfig
from .jacobi import JacobiResult, Step, jacobi_generate, jacobi_stream
from .verify import Verdict, accepted_length, verify_greedy
from .stats import JacobiStats

__all__ = ["JacobiConfig", "JacobiResult", "JacobiStats", "Step", "accepted_length",
           "jacobi_generate", "jacobi_stream", "Verdict", "verify_greedy"]
