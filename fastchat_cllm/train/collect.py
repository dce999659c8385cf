"""Collect Jacobi trajectories for a prompt file (JSON lines) into a trajectory file.

python -m fastchat_cllm.train.collect --model P --prompts F.jsonl --block-size 16 \
    --max-new-tokens N --out T.jsonl [--augment A] [--max-repeat 10]

Each prompt line holds {"id": ..., "prompt": "user message"} (or "prompt_ids": [token ids]);
each output line is one trajectory (or {"id", "dropped"} for a degenerate output), with the
identity of the tokenizer that made it. The output is appended to and flushed after every
prompt, and a rerun skips the ids already there, so an interrupted collection resumes where it
stopped (a file made with another tokenizer is refused). Bad input (a prompt file that is empty,
malformed or empty once tokenized, a missing model) stops it with one `error:` line and exit
status 2 before anything is written; a run stopped by --max-minutes says how many prompts are
left ("complete": false).

--workers N (CPU only) collects in N processes of --threads threads each, every one a shard of
the prompts left, into OUT.partK; when they end, their trajectories are appended to OUT in prompt
order (the same trajectories as one worker's: a prompt's trajectory depends only on it and the
seed; an uninterrupted run also writes them in the same order), and an interrupted run's parts
are merged on the next one. One collection at a time writes OUT (OUT.lock): a second is refused.
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import json
import subprocess
import sys
from pathlib import Path

from ..chat_prompt import chat_prompt_ids
from ..jsonl import jsonl_writer, numbered_jsonl, read_jsonl, write_jsonl
from .trajectory import CollectConfig, collect_trajectory, describe, tokenizer_identity


def read_prompts(path: str | Path) -> list[dict]:
    """Prompt records with "id" and "prompt" or "prompt_ids"; ValueError names the bad line."""
    records, seen = [], set()
    for number, record in numbered_jsonl(path):
        if not isinstance(record, dict) or not (
                isinstance(record.get("prompt"), str) or _is_ids(record.get("prompt_ids"))):
            raise ValueError(f"{path}:{number}: needs a string 'prompt' or a list 'prompt_ids'")
        record.setdefault("id", f"line-{number}")
        record["id"] = str(record["id"])
        if record["id"] in seen:
            raise ValueError(f"{path}:{number}: duplicate id {record['id']!r}")
        seen.add(record["id"])
        records.append(record)
    if not records:
        raise ValueError(f"prompt file {path} holds no prompts")
    return records


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) for t in value)


def done_ids(path: str | Path) -> dict[str, dict | None]:
    """Ids already in a trajectory file, each with the tokenizer identity it records (None in
    files from before identities were recorded); a torn last line from an interrupt is ignored."""
    if not Path(path).exists():
        return {}
    ids = {}
    for number, record in numbered_jsonl(path, torn_end=True):
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}:{number}: not a trajectory record (no 'id')")
        ids[record["id"]] = record.get("tokenizer")
    return ids


def check_same_tokenizer(path: str | Path, done: dict, identity: dict) -> None:
    """ValueError when a trajectory already in `path` was made with another tokenizer."""
    for record_id, theirs in done.items():
        if theirs is not None and theirs != identity:
            raise ValueError(f"{path} holds trajectories made with another tokenizer ("
                             f"{describe(theirs)}, at id {record_id!r}) than this model's "
                             f"({describe(identity)}): collect into a new file")


def prompt_tokens(tokenizer, record: dict, chat: bool) -> list[int]:
    if "prompt_ids" in record:
        return list(record["prompt_ids"])
    if chat:
        return chat_prompt_ids(tokenizer, [{"role": "user", "content": record["prompt"]}])
    return tokenizer(record["prompt"])["input_ids"]


def encode_prompts(tokenizer, prompts: list[dict], chat: bool, vocab_size: int,
                   path: str | Path) -> dict[str, list[int]]:
    """Prompt id -> token ids, all checked before anything is collected: ValueError names a
    prompt that is empty once tokenized or holds a token id outside the model's vocabulary."""
    encoded = {}
    for record in prompts:
        ids = prompt_tokens(tokenizer, record, chat)
        if not ids:
            raise ValueError(f"{path}: prompt {record['id']!r} is empty once tokenized")
        if not all(0 <= t < vocab_size for t in ids):
            raise ValueError(f"{path}: prompt {record['id']!r} holds a token id outside the "
                             f"model's vocabulary (0..{vocab_size - 1})")
        encoded[record["id"]] = ids
    return encoded


def eos_ids(tokenizer) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


def collect_file(model, prompts: dict[str, list[int]], out: str | Path, config: CollectConfig,
                 identity: dict | None = None, progress: bool = True,
                 max_minutes: float = 0.0) -> dict:
    """Append the trajectories of the prompts (id -> token ids) not yet in `out`, each line
    marked with the tokenizer `identity` (stopping after `max_minutes` when > 0: a rerun
    continues); returns counts ("complete": no prompt left)."""
    import time

    from tqdm import tqdm

    began = time.monotonic()
    done = done_ids(out)
    todo = [key for key in prompts if key not in done]
    counts = {"skipped": len(prompts) - len(todo), "written": 0, "dropped": 0, "states": 0,
              "left": len(todo)}
    with jsonl_writer(out, append=True) as write:
        for key in tqdm(todo, desc="collect", unit="prompt", disable=not progress):
            trajectory = collect_trajectory(model, key, prompts[key], config)
            if trajectory is None:
                line = {"id": key, "dropped": "repetition", "tokenizer": identity}
                counts["dropped"] += 1
            else:
                trajectory.tokenizer = identity
                line = trajectory.as_dict()
                counts["written"] += 1
                counts["states"] += sum(len(b.states) + len(b.augmented) for b in trajectory.blocks)
            write(line)
            counts["left"] -= 1
            if max_minutes and time.monotonic() - began > 60 * max_minutes:
                break
    return {**counts, "complete": counts["left"] == 0}


def part_paths(out: str | Path) -> list[Path]:
    """The worker files next to `out` (OUT.part0, OUT.part1, ...)."""
    out = Path(out)
    parts = [p for p in out.parent.glob(glob.escape(out.name) + ".part*")
             if p.name[len(out.name) + 5:].isdigit()]
    return sorted(parts, key=lambda p: int(p.name[len(out.name) + 5:]))


def merge_parts(out: str | Path, order: list[str], identity: dict) -> int:
    """Append the records of OUT's worker files that OUT lacks, in `order` of ids (then any
    others), and delete the files; returns how many were appended. ValueError, before anything
    is merged, when a worker file holds another tokenizer's trajectories than `identity`."""
    out, parts = Path(out), part_paths(out)
    if not parts:
        return 0
    for part in parts:
        check_same_tokenizer(part, done_ids(part), identity)
    have = done_ids(out)
    new = {}
    for part in parts:
        for record in read_jsonl(part, torn_end=True):
            if isinstance(record, dict) and record.get("id") not in have:
                new.setdefault(record["id"], record)
    rank = {key: i for i, key in enumerate(order)}
    with jsonl_writer(out, append=True) as write:
        for key in sorted(new, key=lambda k: rank.get(k, len(rank))):
            write(new[key])
    for part in parts:
        part.unlink()
    return len(new)


def collect_parallel(args, encoded: dict[str, list[int]], identity: dict) -> dict:
    """Collect the prompts not yet in args.out with args.workers processes (module docstring)."""
    merge_parts(args.out, list(encoded), identity)  # an interrupted run's work first
    done = done_ids(args.out)
    todo = [key for key in encoded if key not in done]
    counts = {"skipped": len(encoded) - len(todo), "written": 0, "dropped": 0, "states": 0}
    workers, failed = [], []
    try:
        start_workers(args, encoded, todo, workers)
        for k, worker in enumerate(workers):
            stdout, _ = worker.communicate()
            try:
                summary = json.loads(stdout.strip().splitlines()[-1])
                if worker.returncode:
                    raise ValueError
                for key in ("written", "dropped", "states"):
                    counts[key] += summary[key]
            except (ValueError, IndexError, KeyError, TypeError):
                failed.append(f"worker {k} exited with status {worker.returncode}")
    finally:
        for worker in workers:          # on an error here, no worker outlives the run
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        name = glob.escape(Path(args.out).name)
        for kind in (".part*.prompts", ".part*.lock"):     # the workers' inputs and locks
            for path in Path(args.out).parent.glob(name + kind):
                path.unlink(missing_ok=True)
        merge_parts(args.out, list(encoded), identity)
    done = done_ids(args.out)
    left = sum(1 for key in encoded if key not in done)
    if failed:
        raise RuntimeError("; ".join(failed) + f" ({args.out} holds what was collected, "
                           f"{left} prompts left; rerun to continue)")
    return {**counts, "left": left, "complete": left == 0}


def start_workers(args, encoded: dict[str, list[int]], todo: list[str], workers: list) -> None:
    """One `collect` process per shard of `todo`, appended to `workers` as it starts."""
    for k in range(min(args.workers, len(todo))):
        part = Path(f"{args.out}.part{k}")
        prompts = Path(f"{part}.prompts")
        write_jsonl(({"id": key, "prompt_ids": encoded[key]} for key in todo[k::args.workers]),
                    prompts)
        command = [sys.executable, "-m", "fastchat_cllm.train.collect", "--prompts", str(prompts),
                   "--out", str(part), "--block-size", str(args.block_size), "--max-new-tokens",
                   str(args.max_new_tokens), "--augment", str(args.augment), "--max-repeat",
                   str(args.max_repeat), "--seed", str(args.seed), "--max-minutes",
                   str(args.max_minutes), "--threads", str(args.threads), "--device", args.device,
                   *(["--model", args.model] if args.model else [])]
        workers.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))


def lock(out: str | Path):
    """An exclusive lock on OUT.lock (held while the returned file is open); ValueError when
    another collection holds it."""
    handle = open(f"{out}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ValueError(f"another collection is writing {out} ({out}.lock is held)") from None
    return handle


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.train.collect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path or alias (default: SmolLM2-135M)")
    p.add_argument("--prompts", required=True, help="JSON lines with 'prompt' or 'prompt_ids'")
    p.add_argument("--out", required=True, help="trajectory file (JSON lines, appended)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--augment", type=int, default=0, help="augmented states per state")
    p.add_argument("--max-repeat", type=int, default=10,
                   help="drop outputs with a run of this many equal tokens (0: keep all)")
    p.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as is")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop after this long (0: no limit); a rerun continues")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--workers", type=int, default=1,
                   help="CPU processes, each with --threads threads and a shard of the prompts")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.workers > 1 and args.device != "cpu":
        p.error("--workers is for the CPU (on a GPU one process uses the device)")
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from ..loading import load

    try:
        prompts = read_prompts(args.prompts)
        held = lock(args.out) if Path(args.out).parent.is_dir() else None
        done = done_ids(args.out)   # a bad trajectory file fails here, before the model loads
        parallel = args.workers > 1 or bool(part_paths(args.out))   # the workers load it
        model, tokenizer = load(args.model, dtype=torch.float32, device=args.device,
                                pack=not parallel)
        identity = tokenizer_identity(tokenizer)
        check_same_tokenizer(args.out, done, identity)
        config = CollectConfig(args.block_size, args.max_new_tokens, eos_ids(tokenizer),
                               args.augment, args.max_repeat, args.seed)
        encoded = encode_prompts(tokenizer, prompts, not args.no_chat_template,
                                 model.get_input_embeddings().num_embeddings, args.prompts)
    except (ValueError, OSError) as e:     # OSError: a hub id that cannot be fetched, too
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if parallel:
        del model
        try:
            counts = collect_parallel(args, encoded, identity)
        except ValueError as e:         # a worker file of another tokenizer or malformed
            print(f"error: {first_line(e)}", file=sys.stderr)
            return 2
        except RuntimeError as e:       # a worker failed
            print(f"error: {first_line(e)}", file=sys.stderr)
            return 1
    else:
        counts = collect_file(model, encoded, args.out, config, identity,
                              max_minutes=args.max_minutes)
    del held                            # the lock goes with the file's last reference
    print(json.dumps(counts))
    if not counts["complete"]:
        print(f"stopped with {counts['left']} prompts left (--max-minutes): {args.out} is "
              "incomplete; rerun the same command to continue", file=sys.stderr)
    return 0


def first_line(error: Exception) -> str:
    """An exception's message as one line (transformers' OSErrors run to several)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
