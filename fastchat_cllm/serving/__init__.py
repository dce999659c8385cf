"""The serving shell: the only subpackage that imports FastChat.

adapter / templates / plugin: model adapter and prompt formats registered into FastChat;
params / sources / stream: FastChat's generate-stream contract over the Jacobi engine;
worker: the model worker; compat / launch / stack: fixed stock front ends and the one-command
stack. `hook` arms the plugin on `import fastchat_cllm` without importing FastChat.
"""
