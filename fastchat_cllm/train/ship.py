"""Install a trained LoRA adapter as a packaged model: python -m fastchat_cllm.train.ship DIR

Copies DIR's adapter_config.json and adapter_model.safetensors (what `distill --lora-rank R
--save-adapter` writes) into fastchat_cllm/models/<alias>/ (default smollm2-135m-cllm), with the
adapter's base model set to the alias of the default model, so it resolves offline on any machine
(--dtype float16 halves a float32 adapter's size; --scale S < 1 ships S times the adapter's
change to the base, a point between the base and the trained CLLM, e.g. one that keeps the
base's quality: `train.tradeoff --scales` measures them); then checks the files as the loader
does. MADE.md, beside them, is filled in by hand.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from .. import loading


LORA_KEY = re.compile(r"\.lora_(embedding_)?[AB](\.[^.]+)?(\.weight|\.bias)?$")
SCALED = re.compile(r"\.lora_(embedding_)?B(\.|$)")


def check_scalable(adapter: Path, config: dict) -> None:
    """AdapterError unless the adapter's change to the base is linear in its B matrices (plain
    LoRA: no DoRA, no biases or whole modules of its own), so that scaling them scales it."""
    from safetensors import safe_open

    plain = (config.get("peft_type") == "LORA" and not config.get("use_dora")
             and config.get("bias", "none") == "none" and not config.get("modules_to_save")
             and not config.get("trainable_token_indices"))
    with safe_open(adapter / loading.ADAPTER_WEIGHTS, "pt") as f:
        keys = list(f.keys())
    odd = [k for k in keys if not LORA_KEY.search(k)]
    if not plain or odd or not any(SCALED.search(k) for k in keys):
        why = f"tensor {odd[0]}" if odd else "its adapter_config.json"
        raise loading.AdapterError(f"{adapter} cannot be scaled exactly: only a plain LoRA "
                                   f"adapter can ({why})")


def write_adapter(adapter: Path, target: Path, base: str | None = None,
                  dtype: str | None = None, scale: float = 1.0) -> Path:
    """Copy the LoRA adapter in `adapter` to `target` (its files replaced): the base model named
    `base` when given, the weights cast to `dtype`, the change it makes to the base times
    `scale` (every lora_B times scale: the merged weight is W + scale * (alpha / r) * B A)."""
    loading.check_adapter(adapter)
    if not (adapter / loading.ADAPTER_WEIGHTS).exists():      # adapter_model.bin passed the check
        raise loading.AdapterError(f"{adapter} holds adapter_model.bin: save it as safetensors")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    config = json.loads((adapter / loading.ADAPTER_CONFIG).read_text())
    if scale != 1:
        check_scalable(adapter, config)
    target.mkdir(parents=True, exist_ok=True)
    if base is not None:
        config["base_model_name_or_path"] = base
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (target / loading.ADAPTER_CONFIG).write_text(text)
    if dtype is None and scale == 1:
        shutil.copyfile(adapter / loading.ADAPTER_WEIGHTS, target / loading.ADAPTER_WEIGHTS)
    else:
        import torch
        from safetensors.torch import load_file, save_file

        out = {}
        for name, t in load_file(adapter / loading.ADAPTER_WEIGHTS).items():
            if scale != 1 and SCALED.search(name):
                t = (t.float() * scale).to(t.dtype)
            out[name] = t.to(getattr(torch, dtype)) if dtype else t
        save_file(out, target / loading.ADAPTER_WEIGHTS, metadata={"format": "pt"})
    loading.check_adapter(target)
    return target


def ship(adapter: Path, alias: str = loading.CLLM_MODEL, base: str = loading.DEFAULT_MODEL,
         dtype: str | None = None, scale: float = 1.0) -> Path:
    """Install the adapter in `adapter` as PACKAGED/alias (write_adapter); the folder."""
    return write_adapter(adapter, loading.PACKAGED / alias, base, dtype, scale)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastchat_cllm.train.ship", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", type=Path, help="folder with adapter_config.json and "
                                              "adapter_model.safetensors")
    p.add_argument("--alias", default=loading.CLLM_MODEL)
    p.add_argument("--base", default=loading.DEFAULT_MODEL, help="the adapter's base model")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="store the weights in this dtype (default: as saved)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="ship this fraction of the adapter's change to the base (0 < S <= 1)")
    args = p.parse_args(argv)
    try:
        target = ship(args.adapter, args.alias, args.base, args.dtype, args.scale)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = (target / loading.ADAPTER_WEIGHTS).stat().st_size / 2**20
    scaled = f", scale {args.scale:g}" if args.scale != 1 else ""
    print(f"installed {args.adapter}{scaled} as {args.alias} ({target}, {size:.1f} MiB); "
          f"fill in {target / 'MADE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
