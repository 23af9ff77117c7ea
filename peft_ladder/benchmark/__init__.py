"""Memory and speed of Ladder against full fine-tuning, LoRA and QLoRA, measured side by side (docs/benchmarks.md).

Run `python -m peft_ladder.benchmark --help`. Each method runs in a fresh process on the same checkpoint and batches;
results go to JSON (with the environment), a markdown table and a PNG plot.
"""

from .methods import DEFAULT_METHODS, METHODS, Method, build
from .report import markdown_table, plot, ratio
from .runner import PRESETS, model_config, run_method

__all__ = ["DEFAULT_METHODS", "METHODS", "Method", "PRESETS", "build", "markdown_table", "model_config", "plot",
           "ratio", "run_method"]
