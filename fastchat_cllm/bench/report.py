"""What a benchmark hands back: the machine it ran on, a printed table, JSON and a bar chart."""
from __future__ import annotations

import json
import os
import platform
import textwrap
from pathlib import Path

from .serving import PERCENTILES

YLABEL_CHARS = 30            # fits the axes' height of a 3.6-inch figure at 10 pt
TITLE_CHARS_PER_INCH = 12    # characters of a 10 pt title line per inch of figure width


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU/GPU model, threads, library versions: enough to say where numbers come from."""
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": gpu, "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }


def machine_line(info: dict) -> str:
    where = info["gpu"] or f"{info['cpu']} ({info['cpu_count']} cores)"
    return (f"{where}, torch threads: {info['torch_threads']}, torch {info['torch']}, "
            f"transformers {info['transformers']}")


def _cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def offline_table(methods: dict[str, dict]) -> str:
    header = ["method", "tokens/s", "speedup vs AR", "tokens/forward", "fast-forwarded",
              "stationary", "identical to AR"]
    rows = [[name, m["tokens_per_second"], m["speedup_vs_ar"], m["tokens_per_forward"],
             m["fast_forwarded"], m["stationary"], f"{m['identical_to_ar']}/{m['runs']}"]
            for name, m in methods.items()]
    return markdown_table(header, rows)


def batch_table(batches: dict[str, dict]) -> str:
    """Each batch method against its one-by-one twin: aggregate rates, forwards, losslessness."""
    header = ["method", "prompts (slots)", "tokens/s", "one by one", "speedup", "forwards",
              "one by one", "tokens/forward", "one by one", "identical to one by one"]
    rows = [[f"{name} vs {b['one_by_one']}", b["prompts"], b["tokens_per_second"],
             b["one_by_one_tokens_per_second"], b["speedup_vs_one_by_one"], b["model_calls"],
             b["one_by_one_model_calls"], b["tokens_per_forward"],
             b["one_by_one_tokens_per_forward"], f"{b['identical_to_one_by_one']}/{b['outputs']}"]
            for name, b in batches.items()]
    return markdown_table(header, rows)


def serving_table(levels: list[dict]) -> str:
    spread = "/".join(f"p{q}" for q in PERCENTILES)
    header = ["concurrency", "requests (failed)", f"TTFT {spread} (s)", f"latency {spread} (s)",
              "tokens/s per stream", "aggregate tokens/s", "requests/s"]
    rows = [[l["concurrency"], f"{l['requests']} ({l['failed']})", _spread(l, "ttft"),
             _spread(l, "latency"), l["stream_tokens_per_second"],
             l["aggregate_tokens_per_second"], l["requests_per_second"]] for l in levels]
    return markdown_table(header, rows)


def compare_table(workers: dict[str, dict]) -> str:
    """The sides of a comparison, level by level; `vs stock`: aggregate tokens/s over stock's."""
    stock = {l["concurrency"]: l["aggregate_tokens_per_second"] for l in workers["stock"]["levels"]}
    rows = []
    for concurrency in stock:
        for side, result in workers.items():
            level = next(l for l in result["levels"] if l["concurrency"] == concurrency)
            rate = level["aggregate_tokens_per_second"]
            rows.append([concurrency, side, f"{level['requests']} ({level['failed']})", rate,
                         rate / stock[concurrency] if stock[concurrency] else None,
                         f"{_cell(level['ttft_p50_s'])} / {_cell(level['ttft_p90_s'])}",
                         level["requests_per_second"]])
    header = ["concurrency", "worker", "requests (failed)", "aggregate tokens/s", "vs stock",
              "TTFT p50 / p90 (s)", "requests/s"]
    return markdown_table(header, rows)


def _spread(level: dict, name: str) -> str:
    return " / ".join(_cell(level[f"{name}_p{q}_s"]) for q in PERCENTILES)


def failures(levels: list[dict], shown: int = 3) -> list[str]:
    """A line per level with failed requests: how many, and its first distinct errors."""
    return [f"concurrency {l['concurrency']}: {l['failed']} of {l['requests'] + l['failed']} "
            f"requests failed: " + "; ".join(l["errors"][:shown]) for l in levels if l["failed"]]


def write_json(data: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def bar_chart(labels: list[str], values: list[float], path: str | Path, title: str,
              ylabel: str, reference: float | None = None) -> None:
    """A PNG bar chart (matplotlib, Agg backend), with an optional horizontal reference line.
    Long title lines and the y label are wrapped to the figure; the saved image holds all text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(4.0, 1.1 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(width, 3.6), layout="constrained")
    bars = ax.bar(labels, values, color="#4c72b0")
    ax.bar_label(bars, fmt="%.2f")
    if reference is not None:
        ax.axhline(reference, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.15 * max(values + [reference or 0.0]))
    ax.set_ylabel(textwrap.fill(ylabel, YLABEL_CHARS, break_on_hyphens=False))
    fig.suptitle(_wrap(title, int(width * TITLE_CHARS_PER_INCH)), fontsize=10)
    ax.tick_params(axis="x", labelrotation=20)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _wrap(text: str, chars: int) -> str:
    return "\n".join(textwrap.fill(line, chars) for line in text.splitlines())


def speedup_chart(methods: dict[str, dict], path: str | Path, title: str) -> None:
    names = [n for n, m in methods.items() if m["speedup_vs_ar"] is not None]
    bar_chart(names, [methods[n]["speedup_vs_ar"] for n in names], path, title,
              "speedup vs AR (median of per-prompt ratios)", reference=1.0)


def compare_chart(workers: dict[str, dict], path: str | Path, title: str) -> None:
    """Aggregate tokens/s of each side at each concurrency, side by side."""
    bars = {f"{level['concurrency']} {side}": level["aggregate_tokens_per_second"]
            for levels in zip(*(result["levels"] for result in workers.values()))
            for side, level in zip(workers, levels)}
    bar_chart(list(bars), list(bars.values()), path, title, "aggregate tokens/s")
