"""Benchmark results as a markdown table (with the side-by-side ratios the targets are stated in) and a plot."""

from __future__ import annotations

from typing import Optional

MIB = 2**20


def _rows(results: dict):
    for record in results["methods"]:
        for run in record.get("runs", []):
            yield record, run


def _index(results: dict) -> dict:
    return {(r["method"], run["batch_size"], run["seq_len"]): run for r, run in _rows(results) if "error" not in run}


def ratio(results: dict, method: str, reference: str, key: str, batch_size: int, seq_len: int) -> Optional[float]:
    """`key` of `method` over that of `reference` at the same shape, or None when either is missing."""
    index = _index(results)
    a, b = index.get((method, batch_size, seq_len)), index.get((reference, batch_size, seq_len))
    if not a or not b or not b.get(key):
        return None
    return a[key] / b[key]


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    head = (
        "| method | batch | seq | trainable params | peak MiB | peak / QLoRA | peak / QLoRA+GC | saved for backward "
        "MiB | step time s | time / LoRA | time / QLoRA+GC | tokens/s | final loss |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for record, run in _rows(results):
        b, t = run["batch_size"], run["seq_len"]
        if "error" in run:
            lines.append(f"| {record['method']} | {b} | {t} | {record['trainable_params']:,} | {run['error']} |")
            continue
        cells = [
            record["method"],
            str(b),
            str(t),
            f"{record['trainable_params']:,}",
            f"{run['peak_bytes'] / MIB:.1f}",
            _fmt(ratio(results, record["method"], "qlora", "peak_bytes", b, t)),
            _fmt(ratio(results, record["method"], "qlora-gc", "peak_bytes", b, t)),
            f"{run['saved_bytes'] / MIB:.1f}",
            f"{run['step_time_s']:.3f}",
            _fmt(ratio(results, record["method"], "lora", "step_time_s", b, t)),
            _fmt(ratio(results, record["method"], "qlora-gc", "step_time_s", b, t)),
            _fmt(run["tokens_per_s"], ".0f"),
            f"{run['final_loss']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for record in results["methods"]:
        if record.get("error"):
            lines.append(f"| {record['method']} | failed: {record['error'].splitlines()[-1][:200]} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> Optional[str]:
    """Peak memory and step time against sequence length, one line per method (largest batch size)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = [(record, run) for record, run in _rows(results) if "error" not in run]
    if not runs:
        return None
    batch_size = max(run["batch_size"] for _, run in runs)
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab20").colors
    for number, record in enumerate(results["methods"]):
        points = sorted(
            (run["seq_len"], run)
            for run in record.get("runs", [])
            if "error" not in run and run["batch_size"] == batch_size
        )
        if not points:
            continue
        style = "-" if record["method"].startswith(("ladder", "xladder")) else "--"
        seq = [s for s, _ in points]
        color = colors[number % len(colors)]
        mem_ax.plot(
            seq,
            [r["peak_bytes"] / MIB for _, r in points],
            style,
            marker="o",
            ms=3,
            color=color,
            label=record["method"],
        )
        time_ax.plot(
            seq, [r["step_time_s"] for _, r in points], style, marker="o", ms=3, color=color, label=record["method"]
        )
    env = results["environment"]
    for ax, title in ((mem_ax, "peak memory (MiB)"), (time_ax, f"step time (s, {runs[0][1]['time_method']})")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    mem_ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle(
        f"{results['args']['model']}, batch {batch_size}, {results['args']['dtype']}, {env['device']}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
