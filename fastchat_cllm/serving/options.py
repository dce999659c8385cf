"""Command-line flags of the Jacobi engine, shared by the worker and the terminal chat."""
from __future__ import annotations

import argparse
import sys

from ..core import JacobiConfig
from ..core.config import ACCEPTANCES, FILLS

DEFAULTS = JacobiConfig()
RENAMED = {"--block-size": ("--window-size", int), "--min-block-size": ("--min-window-size", int),
           "--block-cost": ("--window-cost", float)}   # old flag -> (its new name, type)


def renamed(new: str):
    """An argparse action for a flag's old name: takes the value, says the new name."""
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog}: {option_string} is deprecated, use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)
    return Renamed


def add_jacobi_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Jacobi decoding")
    group.add_argument("--window-size", type=int, default=DEFAULTS.window_size,
                       help="largest window (newest token + guesses) one forward runs per "
                            "request; CLLM checkpoints were trained with 16 or 32")
    group.add_argument("--min-window-size", type=int, default=DEFAULTS.min_window_size,
                       help="smallest window the adaptive controller may pick")
    group.add_argument("--no-adaptive", action="store_true",
                       help="always run --window-size positions instead of picking the window "
                            "from measured cost and acceptance")
    group.add_argument("--fixed-blocks", action="store_true",
                       help="the reference's semantics: each window stays in place as a block "
                            "until it is a fixed point")
    group.add_argument("--fill", choices=FILLS, default=DEFAULTS.fill,
                       help="initial guesses: continue the context's bigrams, or random tokens "
                            "from the context (the reference)")
    group.add_argument("--acceptance", choices=ACCEPTANCES, default=DEFAULTS.acceptance,
                       help="sampled requests: Gumbel noise fixed per output position (a seed "
                            "gives the same text at any window), or the textbook speculative "
                            "rule with fresh randomness per forward")
    group.add_argument("--window-cost", type=float, default=None,
                       help="prior cost of one more window position relative to a 1-token "
                            "forward")
    for old, (new, kind) in RENAMED.items():
        group.add_argument(old, dest=new.lstrip("-").replace("-", "_"), type=kind,
                           action=renamed(new), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    group.add_argument("--prompt-lookup", type=int, default=DEFAULTS.prompt_lookup, metavar="N",
                       help="prompt-lookup guesses (0: off): when the context's last N..2 "
                            "tokens occurred before, what followed them is the window's guess")
    group.add_argument("--lookup-window", type=int, default=DEFAULTS.lookup_window,
                       help="an adaptive window (alone, or in a batch past the batch's "
                            "width) grows to take a lookup's guesses, up to this size (1: never)")
    group.add_argument("--ngram-pool", type=int, default=DEFAULTS.ngram_pool, metavar="KEYS",
                       help="n-gram pool size in keys (0: off): n-grams of the context and of "
                            "the engine's own predictions proposed as guesses (lookahead-style)")
    group.add_argument("--ngram-size", type=int, default=DEFAULTS.ngram_size,
                       help="tokens per n-gram in the pool")


def jacobi_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> JacobiConfig:
    """The base config of every request; a bad value stops start-up with the reason."""
    try:
        return JacobiConfig(window_size=args.window_size, min_window_size=args.min_window_size,
                            adaptive=not args.no_adaptive, fixed_blocks=args.fixed_blocks,
                            fill=args.fill, window_cost=args.window_cost,
                            acceptance=args.acceptance, prompt_lookup=args.prompt_lookup,
                            lookup_window=args.lookup_window,
                            ngram_pool=args.ngram_pool, ngram_size=args.ngram_size)
    except ValueError as e:
        parser.error(f"bad Jacobi option: {e}")
