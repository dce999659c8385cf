"""Command line: python -m fastchat_cllm.bench --model P --out results.json [--plot results.png].

With --serve-url it measures (and load-tests) a running stack instead; with
--compare-stock-worker it starts our stack, then one with FastChat's stock model_worker, on the
same --model and measures both alike. The exit status is 1 when any served request failed.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import report
from .extras import MissingExtra, need
from .offline import DEFAULT_METHODS, OfflineConfig, run_offline
from .prompts import HUMAN_EVAL_SET, select_prompts
from .serving import ServingConfig, run_serving

DTYPES = ("float32", "bfloat16", "float16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.bench", description=__doc__)
    p.add_argument("--model", help="model path or alias (offline, --compare-stock-worker; "
                   "default: the embedded SmolLM2), or the served model name (--serve-url; "
                   "default: the first listed)")
    p.add_argument("--prompts", help="JSONL file: {\"prompt\": ...} or {\"messages\": [...]} "
                   f"a line, or '{HUMAN_EVAL_SET}': all HumanEval problems (the bench extra); "
                   "default: the built-in chat/code/extractive mix")
    p.add_argument("--num-prompts", type=int, default=8, help="use the first N prompts (0: all)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="ar, jacobi, jacobi-wN, jacobi[-wN][-pool][-nolookup], "
                   "jacobi-nocache[-bN], pld, assisted, batch[-wN][-pool][-nolookup] (space- or "
                   "comma-separated); -pool: the n-gram pool on; -nolookup: no prompt-lookup "
                   "guesses; batch: all the prompts decoded together on one engine (a slot "
                   "each) against jacobi[-wN][-pool][-nolookup] one by one")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over the prompts (serving: requests per stream)")
    p.add_argument("--draft-model", help="draft model for the 'assisted' method")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-pack", action="store_true",
                   help="offline on the CPU: keep torch's nn.Linear (MKL) instead of weights "
                        "prepacked for oneDNN (the default, ~2x faster forwards; every method, "
                        "and the draft model, runs the same way; serving modes measure the "
                        "worker as it runs)")
    p.add_argument("--dequantize", action="store_true",
                   help="offline on the CPU: run a GGUF model on float32 weights dequantized "
                        "at load (by default its linear layers read the file's quantized "
                        "blocks, as the worker's do; --no-pack implies it)")
    p.add_argument("--serve-url", help="measure a running stack instead, e.g. "
                   "http://127.0.0.1:8000/v1")
    p.add_argument("--compare-stock-worker", action="store_true",
                   help="serving: start our stack (stock controller, our worker, our API "
                   "server), then the same with FastChat's stock fastchat.serve.model_worker, on "
                   "--model (a GGUF or LoRA is first saved as a Hugging Face folder), --device "
                   "and --dtype; measure both at each --concurrency and report them side by side")
    p.add_argument("--compare-llamacpp", metavar="PATH",
                   help="serving: start our stack and llama.cpp's llama-server (the binary at "
                   "PATH; building it: docs/llamacpp.md) on the same GGUF (--model's), same "
                   "threads and slots (--limit-worker-concurrency, default 8), both up at once; "
                   "measure them in turns, wave by wave, at each --concurrency")
    p.add_argument("--llamacpp-spec", action="store_true",
                   help="--compare-llamacpp: also a llama-server with its n-gram speculation "
                   "(--spec-type ngram-simple, n 3, m 16)")
    p.add_argument("--with-dequantized", action="store_true",
                   help="--compare-llamacpp: also our stack on float32 weights (--dequantize)")
    p.add_argument("--worker-args", default="",
                   help="--compare-llamacpp: more flags for our worker, one string (e.g. "
                   "'--compile off --window-size 8')")
    p.add_argument("--limit-worker-concurrency", type=int,
                   help="--compare-stock-worker: passed to both workers (requests each decodes "
                   "at once); default: each worker's own")
    p.add_argument("--logdir", help="--compare-stock-worker: each side's processes log to "
                   "LOGDIR/<side>/ (default: $TMPDIR/fastchat-cllm-compare-logs)")
    p.add_argument("--concurrency", default="1,4,16", help="serving: concurrency levels")
    p.add_argument("--repeat-prompts", action="store_true",
                   help="serving: send the prompts as they are at every level (by default "
                   "each request's is its own, 'Request N: ' before it, so a server's prefix "
                   "cache finds only what requests really share)")
    p.add_argument("--tokenizer", help="serving: count tokens with this tokenizer (model path or "
                   "alias) when the stream carries no usage")
    p.add_argument("--api-key", help="serving: sent as 'Authorization: Bearer KEY' (not saved)")
    p.add_argument("--timeout", type=float, default=600.0, help="serving: seconds per request")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--plot", help="PNG bar chart")
    return p


def _methods(values: list[str]) -> tuple[str, ...]:
    return tuple(m for v in values for m in v.split(",") if m)


def offline(args, info: dict) -> dict:
    import torch

    from ..core.packed_linear import is_packed
    from ..loading import DEFAULT_MODEL, load, quantized_by_default

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    config = OfflineConfig(_methods(args.methods), args.max_new_tokens, args.repeats)
    prompts = select_prompts(args.prompts, args.num_prompts)
    print(f"loading {args.model or 'the default model'} ...", file=sys.stderr)
    try:
        quantized = not (args.no_pack or args.dequantize) and quantized_by_default(args.model)
        model, tokenizer = load(args.model, dtype=dtype, device=device, pack=not args.no_pack,
                                quantized=quantized)
    except (ValueError, FileNotFoundError) as e:     # a missing path or adapter file: one line
        raise SystemExit(f"error: {e}") from None
    draft = (load(args.draft_model, dtype=dtype, device=device, pack=not args.no_pack,
                  quantized=not (args.no_pack or args.dequantize)
                  and quantized_by_default(args.draft_model))[0]
             if args.draft_model else None)
    results = run_offline(config, model, tokenizer, prompts, draft)
    run = {"mode": "offline", "model": args.model or DEFAULT_MODEL,
           "draft_model": args.draft_model, "dtype": args.dtype, "device": device,
           "packed_linear": is_packed(model),
           "machine": info, "config": config.as_dict(), **results}
    print(report.offline_table(results["methods"]))
    print("linear layers: " + ("prepacked for oneDNN" if run["packed_linear"] else
                               "torch's nn.Linear (--no-pack, or not on the CPU in fp32/bf16)"))
    if "batches" in results:
        print(report.batch_table(results["batches"]))
    if args.plot:
        title = f"{run['model']} ({args.dtype}, {device})\n{report.machine_line(info)}"
        report.speedup_chart(results["methods"], args.plot, title)
    return run


def serving(args, info: dict) -> dict:
    from ..loading import load_tokenizer, resolve

    need("openai", "--serve-url")
    config = ServingConfig(args.serve_url, args.model, _levels(args.concurrency),
                           args.max_new_tokens, args.repeats, args.timeout, args.api_key,
                           distinct=not args.repeat_prompts)
    tokenizer = load_tokenizer(resolve(args.tokenizer)) if args.tokenizer else None
    results = run_serving(config, select_prompts(args.prompts, args.num_prompts), tokenizer)
    run = {"mode": "serving", "machine": info, "config": config.as_dict(), **results}
    print(report.serving_table(results["levels"]))
    for line in report.failures(results["levels"]):
        print(line, file=sys.stderr)
    if args.plot:
        levels = results["levels"]
        report.bar_chart([str(l["concurrency"]) for l in levels],
                         [l["aggregate_tokens_per_second"] for l in levels], args.plot,
                         f"{results['model']} via {args.serve_url}", "aggregate tokens/s")
    return run


def compare(args, info: dict) -> dict:
    import torch

    from ..serving.stack import StackError    # imports FastChat, which both sides start
    from .compare import LOGDIR, CompareConfig, run_compare

    need("openai", "--compare-stock-worker")
    if args.serve_url:
        raise SystemExit("error: --compare-stock-worker starts its own stacks: drop --serve-url")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = CompareConfig(args.model, _levels(args.concurrency), args.max_new_tokens,
                           args.repeats, args.timeout, device, args.dtype,
                           args.limit_worker_concurrency, args.logdir or str(LOGDIR),
                           distinct=not args.repeat_prompts)
    try:
        results = run_compare(config, select_prompts(args.prompts, args.num_prompts))
    except StackError as e:         # a stack that did not start: which process, its log's tail
        raise SystemExit(f"error: {e}") from None
    run = {"mode": "serving-compare", "machine": info, "config": config.as_dict(), **results}
    print(report.compare_table(results["workers"]))
    for side, result in results["workers"].items():
        for line in report.failures(result["levels"]):
            print(f"{side}: {line}", file=sys.stderr)
    if args.plot:
        report.compare_chart(results["workers"], args.plot, f"{results['model']}: ours vs "
                             f"stock model_worker ({args.dtype}, {device})")
    return run


def compare_llamacpp(args, info: dict) -> dict:
    from ..serving.stack import StackError
    from .llamacpp import LlamaCompareConfig, find_binary, run_llamacpp_compare, table

    need("openai", "--compare-llamacpp")
    if args.serve_url:
        raise SystemExit("error: --compare-llamacpp starts its own servers: drop --serve-url")
    try:
        config = LlamaCompareConfig(
            binary=find_binary(args.compare_llamacpp), model=args.model,
            concurrency=_levels(args.concurrency), max_new_tokens=args.max_new_tokens,
            slots=args.limit_worker_concurrency or 8, threads=args.threads or 0,
            spec=args.llamacpp_spec, dequantized=args.with_dequantized, timeout=args.timeout,
            logdir=args.logdir or "/tmp/fastchat-cllm-llamacpp-logs",
            worker_flags=tuple(shlex.split(args.worker_args)))
        results = run_llamacpp_compare(config, select_prompts(args.prompts, args.num_prompts))
    except (ValueError, RuntimeError, StackError) as e:
        raise SystemExit(f"error: {e}") from None
    print(table(results))
    for side, levels in results["sides"].items():
        for line in report.failures(levels):
            print(f"{side}: {line}", file=sys.stderr)
    return {"mode": "serving-llamacpp", "machine": info, "max_new_tokens": args.max_new_tokens,
            **results}


def _levels(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(",") if c)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; a missing optional package stops it with one line (exit status 1)."""
    args = parser().parse_args(argv)
    try:
        return _run(args)
    except MissingExtra as e:
        raise SystemExit(f"error: {e}") from None


def output_file(path: str, flag: str) -> Path:
    """`path` as a file the run writes at its end, checked now (its folder made): SystemExit
    with one line when it is a folder, rather than a traceback after the measurements."""
    out = Path(path)
    if out.is_dir() or path.endswith("/"):
        raise SystemExit(f"error: {flag} {path} is a folder: give a file, e.g. "
                         f"{out / ('results.json' if flag == '--out' else 'results.png')}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: cannot make its folder ({e})") from None
    return out


def _run(args) -> dict:
    output_file(args.out, "--out")       # checked before the run, not after it
    if args.plot:
        output_file(args.plot, "--plot")
        need("matplotlib", "--plot")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    info = report.machine()
    if args.compare_stock_worker:
        run = compare(args, info)
    elif args.compare_llamacpp:
        run = compare_llamacpp(args, info)
    else:
        run = serving(args, info) if args.serve_url else offline(args, info)
    print(f"machine: {report.machine_line(info)}")
    report.write_json(run, args.out)
    return run


def exit_status(run: dict) -> int:
    """1 when a served request failed (the verdict of a load test), else 0."""
    sides = [run] + list(run.get("workers", {}).values())
    levels = [level for side in sides for level in side.get("levels", ())]
    levels += [level for side in run.get("sides", {}).values() for level in side]
    return int(any(level["failed"] for level in levels))


if __name__ == "__main__":
    sys.exit(exit_status(main()))
