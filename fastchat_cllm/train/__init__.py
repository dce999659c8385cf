"""Make a CLLM: Jacobi trajectory collection and consistency distillation (no FastChat import).

collect.py (CLI) -> trajectory.py records every block state up to its fixed point;
distill.py (CLI) -> trainer.py runs the loop over packing.py's packed sequences and losses.py;
problems.py is an offline prompt set with a quality metric; evaluate.py measures a model.
code_prompts.py builds code prompts (standard-library stubs; HumanEval held out);
evaluate_code.py (CLI) measures a CLLM beside its base on them, humaneval.py runs pass@1;
ship.py (CLI) installs a trained LoRA adapter as the packaged `smollm2-135m-cllm`.
"""
