"""The benchmark harness: memory and speed of Ladder against full fine-tuning, LoRA and QLoRA (docs/benchmarks.md).

Run from the repository root, not installed with the package:

    python -m benchmarks --help                        # every method side by side, results as JSON, table and plot
    python -m benchmarks --validate RESULTS_JSON       # the planner's predictions against those measurements
    python -m benchmarks.quantization_memory --help    # parameter bytes per precision, Ladder-4bit vs QLoRA
    python -m benchmarks.saved_bytes_per_arch --help   # bytes saved for backward on each tested architecture

Each method runs in a fresh process on the same checkpoint and batches (`runner.py`), built by one factory
(`models.py`) from the method table the planner also reads (`peft_ladder/methods.py`).
"""
