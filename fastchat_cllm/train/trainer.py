"""The consistency-distillation loop: one packed sequence per trajectory, AdamW, accelerate.

A step draws `records_per_step` trajectories (epoch-shuffled, from the seed) and, for each of
their blocks, `states_per_block` states; every draw depends only on (seed, step), so a run
resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import functools
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..jsonl import jsonl_writer, read_jsonl, write_jsonl
from .losses import cllm_loss
from .packing import Packed, Segment, pack, packed_logits
from .trajectory import Trajectory

LOSSES = ("global", "local")
TEACHERS = ("self", "base", "greedy")
SCHEDULES = ("cosine", "constant")
CHECKPOINT, LOSS_LOG = "checkpoint.pt", "loss_log.jsonl"


@dataclass(frozen=True)
class DistillConfig:
    """steps: optimizer steps (0: one epoch). ar_weight: AR loss weight against the consistency
    loss (the reference's 10:1). max_minutes: stop (and checkpoint) after this long (0: never).
    horizon: 0 trains a state's every position (the reference); h > 0 only the h positions from
    its first wrong token on (global loss), those whose right answer a sliding window can turn
    into accepted tokens next forward; the state is cut to them, so a step affords more states."""

    steps: int = 0
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup: float = 0.03
    ar_weight: float = 10.0
    label_smoothing: float = 0.1
    loss: str = "global"
    states_per_block: int = 2
    records_per_step: int = 1
    save_every: int = 100
    max_minutes: float = 0.0
    bf16: bool = True
    seed: int = 0
    teacher: str = "self"
    snapshot_every: int = 0
    horizon: int = 0

    def __post_init__(self):
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.teacher != "self" and self.loss != "global":
            raise ValueError(f"teacher {self.teacher!r} needs the global loss (the local loss's "
                             "targets are the next noisy state, which only the model being "
                             "trained sees)")
        if self.horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {self.horizon}")
        if self.horizon and self.loss != "global":
            raise ValueError("horizon needs the global loss")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {self.snapshot_every}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("states_per_block", "records_per_step", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "ar_weight", "max_minutes", "lr"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("warmup and label_smoothing must be in [0, 1)")


def choose_segments(traj: Trajectory, config: DistillConfig, rng: random.Random) -> list[Segment]:
    """The noisy states one step trains on: a few per block (states equal to the fixed point
    teach nothing and are skipped). With a horizon a state is cut to its `horizon` tokens from
    the first wrong one, placed there: before it the state equals the clean output (the context
    is the same), after it the positions are not trained."""
    segments: list[Segment] = []
    for block in traj.blocks:
        fixed = block.fixed_point
        if config.loss == "global":
            pool = [s for s in block.states + block.augmented if s != fixed]
            if config.horizon:
                pool = sorted({_cut(s, fixed, config.horizon) for s in pool})
            for state in rng.sample(pool, min(config.states_per_block, len(pool))):
                if config.horizon:
                    segments.append(Segment(block.start + state[0], list(state[1])))
                else:
                    segments.append(Segment(block.start, state))
            continue
        pairs = [j for j in range(len(block.states) - 1) if block.states[j] != fixed]
        for j in rng.sample(pairs, min(config.states_per_block, len(pairs))):
            nxt = block.states[j + 1]
            if nxt == fixed:   # the next state is the fixed point: the clean part holds it
                segments.append(Segment(block.start, block.states[j]))
            else:
                segments.append(Segment(block.start, nxt, student=False))
                segments.append(Segment(block.start, block.states[j], target=len(segments) - 1))
    return segments


def _cut(state: list[int], fixed: list[int], horizon: int) -> tuple[int, tuple[int, ...]]:
    """(w, state[w:w + horizon]) for the first index w where the state differs from the fixed
    point (the state's tokens before w are the clean output's)."""
    w = next(i for i, (a, b) in enumerate(zip(state, fixed)) if a != b)
    return w, tuple(state[w: w + horizon])


def total_steps(config: DistillConfig, count: int) -> int:
    """Optimizer steps of a run over `count` trajectories (`steps`, else one epoch)."""
    return config.steps or math.ceil(count / config.records_per_step)


def lr_factor(step: int, steps: int, config: DistillConfig) -> float:
    warm = max(1, round(config.warmup * steps))
    if step < warm:
        return (step + 1) / warm
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, count: int) -> tuple[int, ...]:
    """The shuffle of `count` trajectories for one epoch."""
    return tuple(random.Random(f"{seed}:epoch{epoch}").sample(range(count), count))


def record_order(count: int, step: int, config: DistillConfig) -> list[int]:
    """Indices of the trajectories step `step` uses (a fresh shuffle every epoch)."""
    out = []
    for slot in range(step * config.records_per_step, (step + 1) * config.records_per_step):
        epoch, index = divmod(slot, count)
        out.append(epoch_order(config.seed, epoch, count)[index])
    return out


# what a resumed run may change; every other DistillConfig field must match its checkpoint's
RESUMABLE = ("steps", "save_every", "max_minutes", "snapshot_every", "bf16")


def run_settings(config: DistillConfig, **extra) -> dict:
    """What a checkpoint records of the run that made it (config fields a resume must keep, plus
    `extra`, e.g. the model and the LoRA shape)."""
    return {**{k: v for k, v in asdict(config).items() if k not in RESUMABLE}, **extra}


def check_resume(out_dir: Path, settings: dict) -> None:
    """ValueError when out_dir holds a checkpoint made with other settings (resuming it would
    silently train on with a mix of both). Only settings both record are compared; a checkpoint
    without settings is not checked."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return
    saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("settings")
    if saved is None:
        return
    changed = [f"{k} {saved[k]!r} -> {settings[k]!r}"
               for k in sorted(set(saved) & set(settings)) if saved[k] != settings[k]]
    if changed:
        raise ValueError(f"{path} was made with other settings ({', '.join(changed)}): rerun "
                         "with its settings, or give another --out")


def trainable_state(model) -> dict:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler,
                    settings: dict | None = None) -> None:
    """Atomically write what a resume needs (trainable weights, optimizer, schedule, step) and
    the run's settings (check_resume)."""
    state = {"step": step, "trainable": trainable_state(model),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "settings": settings}
    tmp = out_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / CHECKPOINT)


def load_checkpoint(out_dir: Path, model, optimizer, scheduler) -> int:
    """Restore a checkpoint if there is one; returns the step to continue from."""
    path = out_dir / CHECKPOINT
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    result = model.load_state_dict(state["trainable"], strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {path} does not fit this model: {result.unexpected_keys[:3]}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _trim_log(out_dir / LOSS_LOG, state["step"])
    return state["step"]


def _trim_log(path: Path, step: int) -> None:
    """Forget log lines written after the checkpoint (they will be logged again)."""
    if path.exists():
        write_jsonl([line for line in read_jsonl(path, torn_end=True)
                     if isinstance(line.get("step"), int) and line["step"] < step], path)


def base_logits(model, packed) -> torch.Tensor:
    """The frozen base model's logits [clean_len, V] on the clean part (the LoRA adapter off)."""
    clean = packed.clean_len
    plain = Packed(packed.input_ids[:clean], packed.position_ids[:clean],
                   packed.allowed[:clean, :clean], packed.prompt_len, clean,
                   packed.student[:0], packed.teacher[:0])
    with torch.no_grad(), model.disable_adapter():
        return packed_logits(model, plain)


def train_step(model, trajectories: list[Trajectory], config: DistillConfig, rng, accelerator):
    """Forward/backward over the step's trajectories; returns the mean loss parts."""
    parts, states = {"loss": 0.0, "consistency": 0.0, "ar": 0.0}, 0
    for traj in trajectories:
        segments = choose_segments(traj, config, rng)
        packed = pack(traj.prompt_ids, traj.output_ids, segments)
        with accelerator.autocast():
            logits = packed_logits(model, packed)
            reference = base_logits(model, packed) if config.teacher == "base" else None
        losses = cllm_loss(logits, packed, config.ar_weight, config.label_smoothing, reference,
                           hard=config.teacher == "greedy")
        accelerator.backward(losses.total / len(trajectories))
        states += sum(1 for s in segments if s.student)
        for key, value in losses.as_dict().items():
            parts[key] += value / len(trajectories)
    return parts, states


def train(model, trajectories: list[Trajectory], config: DistillConfig, out_dir: str | Path,
          progress: bool = True, settings: dict | None = None) -> int:
    """Distil `model` in place on the trajectories; checkpoints and logs go to `out_dir`.
    Resumes from `out_dir`'s checkpoint, refusing one made with other settings (default:
    run_settings(config)). Returns the number of steps done."""
    from accelerate import Accelerator
    from tqdm import tqdm

    if not trajectories:
        raise ValueError("no trajectories to train on")
    if config.teacher == "base" and not hasattr(model, "disable_adapter"):
        raise ValueError("teacher 'base' needs a LoRA model (its adapter off is the base)")
    out_dir = Path(out_dir)
    settings = run_settings(config) if settings is None else settings
    check_resume(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = total_steps(config, len(trajectories))
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and config.bf16 else "no")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, config))
    model, optimizer = accelerator.prepare(model, optimizer)
    start = load_checkpoint(out_dir, accelerator.unwrap_model(model), optimizer, scheduler)
    model.train()
    began, done = time.monotonic(), start
    with jsonl_writer(out_dir / LOSS_LOG, append=True) as log:
        bar = tqdm(range(start, steps), initial=start, total=steps, desc="distill",
                   disable=not progress)
        for step in bar:
            rng = random.Random(f"{config.seed}:step{step}")
            batch = [trajectories[i] for i in record_order(len(trajectories), step, config)]
            tick = time.monotonic()
            parts, states = train_step(model, batch, config, rng, accelerator)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            line = {"step": step, **{k: round(v, 5) for k, v in parts.items()},
                    "lr": scheduler.get_last_lr()[0], "states": states,
                    "seconds": round(time.monotonic() - tick, 3)}
            log(line)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", kl=f"{parts['consistency']:.3f}")
            out_of_time = config.max_minutes and time.monotonic() - began > 60 * config.max_minutes
            if done % config.save_every == 0 or done == steps or out_of_time:
                save_checkpoint(out_dir, done, accelerator.unwrap_model(model), optimizer,
                                scheduler, settings)
            if config.snapshot_every and done % config.snapshot_every == 0:
                accelerator.unwrap_model(model).save_pretrained(out_dir / "snapshots" / f"step-{done}")
            if out_of_time:
                break
    model.eval()
    return done
