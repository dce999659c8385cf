"""Command-line flags of the Jacobi engine, shared by the worker and the terminal chat."""
from __future__ import annotations

import argparse

from ..core import JacobiConfig
from ..core.config import ACCEPTANCES, FILLS

DEFAULTS = JacobiConfig()


def add_jacobi_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Jacobi decoding")
    group.add_argument("--block-size", type=int, default=DEFAULTS.block_size,
                       help="largest Jacobi block (guess window) one forward runs; CLLM "
                            "checkpoints were trained with 16 or 32")
    group.add_argument("--min-block-size", type=int, default=DEFAULTS.min_block_size,
                       help="smallest window the adaptive controller may pick")
    group.add_argument("--no-adaptive", action="store_true",
                       help="always run --block-size positions instead of picking the window "
                            "from measured cost and acceptance")
    group.add_argument("--fixed-blocks", action="store_true",
                       help="the reference's semantics: iterate each block to its fixed point")
    group.add_argument("--fill", choices=FILLS, default=DEFAULTS.fill,
                       help="initial guesses: continue the context's bigrams, or random tokens "
                            "from the context (the reference)")
    group.add_argument("--acceptance", choices=ACCEPTANCES, default=DEFAULTS.acceptance,
                       help="sampled requests: Gumbel noise fixed per output position (a seed "
                            "gives the same text at any window), or the textbook speculative "
                            "rule with fresh randomness per forward")
    group.add_argument("--block-cost", type=float, default=None,
                       help="prior cost of one more block position relative to a 1-token forward")
    group.add_argument("--ngram-pool", type=int, default=DEFAULTS.ngram_pool, metavar="KEYS",
                       help="n-gram pool size in keys (0: off): n-grams of the context and of "
                            "the engine's own predictions proposed as guesses (lookahead-style)")
    group.add_argument("--ngram-size", type=int, default=DEFAULTS.ngram_size,
                       help="tokens per n-gram in the pool")


def jacobi_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> JacobiConfig:
    """The base config of every request; a bad value stops start-up with the reason."""
    try:
        return JacobiConfig(block_size=args.block_size, min_block_size=args.min_block_size,
                            adaptive=not args.no_adaptive, fixed_blocks=args.fixed_blocks,
                            fill=args.fill, block_cost=args.block_cost,
                            acceptance=args.acceptance,
                            ngram_pool=args.ngram_pool, ngram_size=args.ngram_size)
    except ValueError as e:
        parser.error(f"bad Jacobi option: {e}")
