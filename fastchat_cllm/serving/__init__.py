"""The serving shell: the only subpackage that imports FastChat.

adapter / templates / plugin: model adapter and prompt formats registered into FastChat;
params / sources / stream: FastChat's generate-stream contract over the Jacobi engine;
worker: the model worker; stock / compat / launch / openai_routes / web_ui / stack: the checked
stock FastChat, its fixes, the front ends built on it and the one-command stack.

Importing this package checks the installed FastChat (stock.StockMismatch, an ImportError, when
it is not fschat 0.2.36) and registers the plugin into it (`plugin.register`, idempotent): a
process of your own that uses FastChat's adapters imports `fastchat_cllm.serving` first.
"""
from . import stock

stock.check_version()
stock.check_shell()

from . import plugin  # noqa: E402  (after the version check: it imports FastChat)

plugin.register()
