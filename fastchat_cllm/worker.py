"""`python -m fastchat_cllm.worker`: FastChat's model worker with Jacobi decoding (every stock
model_worker flag, plus --block-size and the other Jacobi flags)."""
from .serving.worker import main

if __name__ == "__main__":
    main()
