"""The batched Jacobi engine: a request's state, a scheduler, a slot cache, one model runner."""
from .engine import Engine
from .request import Request
from .slot_cache import SlotCache

__all__ = ["Engine", "Request", "SlotCache"]
