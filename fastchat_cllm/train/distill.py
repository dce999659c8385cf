"""Consistency distillation: turn a causal LM into a CLLM from its own Jacobi trajectories.

python -m fastchat_cllm.train.distill --model P --trajectories T.jsonl --out DIR \
    [--steps N] [--lr 2e-5] [--ar-weight 10] [--loss global|local] [--lora-rank 32]

Full fine-tuning by default, LoRA with --lora-rank. DIR receives checkpoint.pt (rerunning the
same command resumes from it; a checkpoint made with another model or other training settings
is refused: a resumed run may change only --steps, --max-minutes, --save-every,
--snapshot-every, --no-bf16, --threads, --save-adapter and the trajectory file, which may have
grown), loss_log.jsonl, and at the end the model: a merged Hugging Face
folder (config, weights, tokenizer) that `fastchat_cllm.loading.load(DIR)` and the worker's
--model-path take, or with --save-adapter a LoRA adapter folder.

Bad input (a trajectory file that is missing, empty or malformed, or made with another tokenizer
than --model's, a missing model) stops it with one `error:` line and exit status 2 before
training; a run stopped by --max-minutes saves the model so far and says so ("complete": false).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..jsonl import numbered_jsonl
from .collect import first_line
from .trainer import (LOSSES, SCHEDULES, TEACHERS, DistillConfig, check_resume, run_settings,
                      total_steps, train)
from .trajectory import Trajectory, describe, tokenizer_identity


def read_trajectories(path: str | Path) -> list[Trajectory]:
    """The kept trajectories of a collect output; ValueError names a bad line."""
    out = []
    for number, record in numbered_jsonl(path):
        try:
            if not record.get("dropped"):
                out.append(Trajectory.from_dict(record))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}:{number}: not a trajectory record ({e})") from None
    if not out:
        raise ValueError(f"trajectory file {path} holds no trajectories")
    return out


def check_tokenizer(trajectories: list[Trajectory], tokenizer, vocab_size: int,
                    path: str | Path) -> None:
    """ValueError when a trajectory was made with another tokenizer than the model's: its
    recorded identity differs, or (files without one) it holds a token id the model lacks."""
    identity = tokenizer_identity(tokenizer)
    for traj in trajectories:
        if traj.tokenizer is not None and traj.tokenizer != identity:
            raise ValueError(f"{path}: trajectory {traj.id!r} was made with another tokenizer "
                             f"({describe(traj.tokenizer)}) than --model's "
                             f"({describe(identity)})")
        if traj.largest_id() >= vocab_size:
            raise ValueError(f"{path}: trajectory {traj.id!r} holds token id "
                             f"{traj.largest_id()}, outside --model's vocabulary "
                             f"(0..{vocab_size - 1}): made with another tokenizer")


def clear_quantizer(model) -> None:
    """A GGUF-loaded model is dequantized but keeps its quantizer marker, which blocks
    save_pretrained (and confuses peft): forget it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def add_lora(model, rank: int, alpha: int):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))


def name_base(model, base: str) -> None:
    """Make the LoRA adapter (saved at the end and in snapshots) name `base` as its base model:
    loading.base_name of --model, an alias or absolute path that resolves on any machine (peft
    would record the GGUF's package folder)."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = base


def save_model(model, tokenizer, out_dir: str | Path, adapter: bool) -> None:
    """Write the result: a merged HF folder, or (adapter=True, LoRA only) the adapter."""
    if hasattr(model, "merge_and_unload") and not adapter:
        model = model.merge_and_unload()
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.train.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DistillConfig()
    p.add_argument("--model", default=None, help="model path or alias (default: SmolLM2-135M)")
    p.add_argument("--trajectories", required=True, help="output of fastchat_cllm.train.collect")
    p.add_argument("--out", required=True, help="output folder (checkpoint, log, model)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (0: one epoch)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--warmup", type=float, default=d.warmup, help="fraction of the steps")
    p.add_argument("--ar-weight", type=float, default=d.ar_weight)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing,
                   help="on the AR cross-entropy (teacher self and greedy; greedy's consistency "
                        "term is never smoothed)")
    p.add_argument("--loss", choices=LOSSES, default=d.loss)
    p.add_argument("--states-per-block", type=int, default=d.states_per_block)
    p.add_argument("--records-per-step", type=int, default=d.records_per_step)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--max-minutes", type=float, default=d.max_minutes)
    p.add_argument("--no-bf16", action="store_true", help="fp32 on GPU too")
    p.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--save-adapter", action="store_true", help="save the LoRA adapter, unmerged")
    p.add_argument("--teacher", choices=TEACHERS, default=d.teacher,
                   help="targets from the model being trained (self), the frozen base (base: "
                        "LoRA only; holds the base's distribution) or the collected greedy "
                        "tokens (greedy: cross-entropy on the fixed point and the output, for "
                        "the argmax; no teacher forward)")
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="save the LoRA adapter every N steps to OUT/snapshots/step-N (0: never)")
    p.add_argument("--horizon", type=int, default=d.horizon,
                   help="train only the H positions of a state from its first wrong token "
                        "(0: all; cut states are cheap, so raise --states-per-block)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    return p.parse_args(argv)


def config_from(args) -> DistillConfig:
    return DistillConfig(args.steps, args.lr, args.schedule, args.warmup, args.ar_weight,
                         args.label_smoothing, args.loss, args.states_per_block,
                         args.records_per_step, args.save_every, args.max_minutes,
                         not args.no_bf16, args.seed, args.teacher, args.snapshot_every,
                         args.horizon)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from ..loading import base_name, load

    try:
        config = config_from(args)
        if args.save_adapter and not args.lora_rank:
            raise ValueError("--save-adapter needs --lora-rank")
        if not args.lora_rank and (args.teacher == "base" or args.snapshot_every):
            raise ValueError("--teacher base and --snapshot-every need --lora-rank")
        trajectories = read_trajectories(args.trajectories)
        torch.set_num_threads(args.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load(args.model, dtype=torch.float32, device=device)
        settings = run_settings(config, model=base_name(args.model), lora_rank=args.lora_rank,
                                lora_alpha=args.lora_alpha if args.lora_rank else None)
        check_resume(Path(args.out), settings)
        check_tokenizer(trajectories, tokenizer, model.get_input_embeddings().num_embeddings,
                        args.trajectories)
    except (ValueError, OSError) as e:     # OSError: a hub id that cannot be fetched, too
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    clear_quantizer(model)
    if args.lora_rank:
        model = add_lora(model, args.lora_rank, args.lora_alpha)
        name_base(model, base_name(args.model))
    done = train(model, trajectories, config, args.out, settings=settings)
    steps = total_steps(config, len(trajectories))
    save_model(model, tokenizer, args.out, args.save_adapter)
    if done < steps:
        print(f"stopped at step {done} of {steps} (time limit): saved the model so far; "
              "rerun the same command to continue")
    print(json.dumps({"steps": done, "of": steps, "out": str(args.out),
                      "complete": done >= steps}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
