"""The batched Jacobi engine: a request's state, a scheduler, a slot cache, one model runner;
and the loop that drives one engine on a thread of its own for concurrent callers."""
from .engine import BatchTotals, Engine, Failure
from .loop import EngineLoop
from .request import Request
from .runner import CompileError
from .slot_cache import SlotCache

__all__ = ["BatchTotals", "CompileError", "Engine", "EngineLoop", "Failure", "Request", "SlotCache"]
