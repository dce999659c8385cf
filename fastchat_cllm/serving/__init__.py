"""The serving shell: the only subpackage that imports FastChat.

adapter / templates / plugin: model adapter and prompt formats registered into FastChat;
params / sources / stream: FastChat's generate-stream contract over the Jacobi engine;
worker: the model worker; compat / launch / stack: fixed stock front ends and the one-command
stack. `fastchat_cllm.plugin_hook` registers the plugin when FastChat's adapters are imported,
which happens here first, before any module of this package runs.
"""
import fastchat.model.model_adapter  # noqa: F401  (registers the plugin through the hook)
