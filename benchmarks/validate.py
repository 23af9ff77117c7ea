"""The planner's predictions (`peft_ladder.planner`) against the peak memory a `python -m benchmarks` run measured,
under the optimizer and autocast the run used (`--optimizer`, `--autocast`; results written before those options
measured AdamW without autocast)."""

from __future__ import annotations

import json

from peft_ladder.methods import METHODS
from peft_ladder.planner import estimate

from .models import model_config


def validate(results_path: str) -> list[dict]:
    """Predicted against measured peak memory for every successful run in a results.json."""
    with open(results_path) as handle:
        results = json.load(handle)
    args = results["args"]
    config = model_config(args["model"])
    rows = []
    for record in results["methods"]:
        if record["method"] not in METHODS:
            continue
        for run in record.get("runs", []):
            if "error" in run:
                continue
            optimizer, autocast = record.get("optimizer", "adamw"), record.get("autocast", "none")
            e = estimate(
                config,
                record["method"],
                run["batch_size"],
                run["seq_len"],
                args["dtype"],
                optimizer=optimizer,
                autocast=autocast,
            )
            rows.append(
                {
                    "method": record["method"],
                    "optimizer": optimizer,
                    "autocast": autocast,
                    "batch_size": run["batch_size"],
                    "seq_len": run["seq_len"],
                    "predicted_bytes": e.total,
                    "measured_bytes": run["peak_bytes"],
                    "error": e.total / run["peak_bytes"] - 1,
                }
            )
    return rows


def validation_table(rows: list[dict]) -> str:
    """The rows of `validate` as markdown, with the mean and worst error under the table."""
    lines = [
        "| method | optimizer | autocast | batch | seq | predicted MiB | measured MiB | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['optimizer']} | {row['autocast']} | {row['batch_size']} | {row['seq_len']} | "
            f"{row['predicted_bytes'] / 2**20:.1f} | {row['measured_bytes'] / 2**20:.1f} | {row['error']:+.1%} |"
        )
    if rows:
        worst = max(rows, key=lambda row: abs(row["error"]))
        lines.append(
            f"\nmean |error| {sum(abs(r['error']) for r in rows) / len(rows):.1%}, worst {worst['error']:+.1%} "
            f"({worst['method']}, seq {worst['seq_len']})"
        )
    return "\n".join(lines)
