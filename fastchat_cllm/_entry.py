"""Entry points' shared start: import the serving module, and stop with one line when the
installed FastChat is missing or not the one the serving shell was built on."""
import importlib
import os
import sys


def fail(message: str) -> None:
    """One line on the real stderr (FastChat's loggers replace sys.stderr), exit code 1."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.__stderr__, flush=True)
    sys.exit(1)


def run(module: str, function: str = "main"):
    try:
        target = getattr(importlib.import_module(module), function)
    except ImportError as e:
        stock = sys.modules.get("fastchat_cllm.serving.stock")
        if stock is None or not isinstance(e, stock.StockMismatch):
            raise
        fail(str(e))
    return target()
