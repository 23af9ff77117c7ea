"""`python -m benchmarks`: train the same model on the same batches with each method and compare.

Example (CPU, a few minutes; run from the repository root):

    python -m benchmarks --model small --seq-lens 256,512,1024,2048 --out benchmarks/results/small-cpu

Writes `results.json` (environment, arguments, every measurement), `results.md` (the table) and `results.png`
(peak memory and step time against sequence length) into `--out`. `--validate RESULTS_JSON` compares the planner's
predictions (`python -m peft_ladder.planner`) with such a run instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

from peft_ladder.methods import DEFAULT_METHODS, METHODS
from peft_ladder.planner import AUTOCASTS, OPTIMIZERS

from .models import MODEL_PRESETS, check_precision, prepare_checkpoint
from .report import markdown_table, plot
from .runner import environment, run_generation, run_in_subprocess, run_method
from .validate import validate, validation_table


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default="small",
        help=f"a preset ({', '.join(MODEL_PRESETS)}; random weights), a config.json (random weights) or "
        "a local model directory / Hub id (its weights). Default: small.",
    )
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help="comma-separated methods (see --list-methods). Default: every method except "
        f"{', '.join(m for m in METHODS if m not in DEFAULT_METHODS)}.",
    )
    parser.add_argument("--list-methods", action="store_true", help="print the methods and exit")
    parser.add_argument("--batch-sizes", type=_ints, default=[1], help="comma-separated, default 1")
    parser.add_argument("--seq-lens", type=_ints, default=[256, 512, 1024, 2048], help="comma-separated")
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="timed steps per shape, after one warm-up step and before the memory-measured step. Default 2.",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weights / compute dtype (also the 4-bit compute dtype). Default bfloat16.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--optimizer",
        "--optim",
        default="adamw",
        choices=OPTIMIZERS,
        help="every method's optimizer, as TrainingArguments(optim=...) names it: adamw (torch, the default), "
        "adamw_8bit (bitsandbytes AdamW8bit; runs on CPU from bitsandbytes 0.50) or paged_adamw_8bit (CUDA only).",
    )
    parser.add_argument(
        "--autocast",
        default="none",
        choices=AUTOCASTS,
        help="bf16: every method's forward and loss run under torch.autocast(device, bfloat16), as Trainer's "
        "bf16=True does, with fp32 adapters and side network (needs --dtype bfloat16). Default none.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (CPU). Default 1: CPU time then tracks FLOPs even on shared cores.",
    )
    parser.add_argument("--jobs", type=int, default=1, help="methods run at once (CPU only; each in its own process)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, the same for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per method before it is reported failed")
    parser.add_argument("--out", default=None, help="output directory. Default: benchmarks/results/<model>-<device>")
    parser.add_argument(
        "--generate",
        type=int,
        default=0,
        metavar="NEW_TOKENS",
        help="also time greedy generation of NEW_TOKENS tokens (32-token prompt) with and without a "
        "Ladder adapter (its side KV cache). Default 0: skip.",
    )
    parser.add_argument(
        "--report",
        metavar="RESULTS_JSON",
        default=None,
        help="only rewrite results.md and results.png next to an existing results.json",
    )
    parser.add_argument(
        "--validate",
        metavar="RESULTS_JSON",
        default=None,
        help="only print the planner's predictions against the peak memory measured in a results.json",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method spec
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    try:
        check_precision(args.optimizer, args.autocast, args.dtype, args.device)
    except ValueError as error:
        parser.error(str(error))
    if args.jobs > 1 and args.device.startswith("cuda"):
        parser.error("--jobs > 1 would let methods share one GPU and its memory counters; use --jobs 1 on CUDA")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        with open(args.worker) as handle:
            spec = json.load(handle)
        print(json.dumps(run_generation(spec) if spec["method"] == "generation" else run_method(spec)))
        return 0
    if args.report:
        with open(args.report) as handle:
            results = json.load(handle)
        write_reports(results, os.path.dirname(os.path.abspath(args.report)))
        return 0
    if args.validate:
        print(validation_table(validate(args.validate)))
        return 0
    if args.list_methods:
        for name, method in METHODS.items():
            print(f"{name:22s} {method.help}")
        return 0
    out = args.out or os.path.join("benchmarks", "results", f"{os.path.basename(args.model.rstrip('/'))}-{args.device}")
    os.makedirs(out, exist_ok=True)
    shapes = [(b, t) for b in args.batch_sizes for t in sorted(args.seq_lens)]
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = prepare_checkpoint(args.model, workdir, args.seed)
        base = {
            "model_dir": model_dir,
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "seed": args.seed,
            "lr": args.lr,
            "steps": args.steps,
            "shapes": shapes,
            "optimizer": args.optimizer,
            "autocast": args.autocast,
        }
        methods = args.methods.split(",")

        def one(name: str) -> dict:
            record = run_in_subprocess({**base, "method": name}, args.timeout)
            print(f"  {name}: {'failed' if record.get('error') else 'done'}", file=sys.stderr, flush=True)
            return record

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            records = list(pool.map(one, methods))
        generation = None
        if args.generate:
            generation = run_in_subprocess(
                {**base, "method": "generation", "prompt_len": 32, "new_tokens": args.generate}, args.timeout
            )
    results = {
        "environment": environment(torch.device(args.device)),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "list_methods", "validate")},
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "methods": records,
        "generation": generation,
    }
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    print(write_reports(results, out))
    return 0 if not any(r.get("error") for r in records) else 1


def write_reports(results: dict, out: str) -> str:
    """results.md and results.png in `out`; returns the table."""
    generation = results.get("generation")
    table = markdown_table(results)
    if generation and "error" not in generation:
        table += (
            f"\n\nGeneration ({generation['new_tokens']} new tokens, greedy, {generation['time_method']}): base "
            f"{generation['base_tokens_per_s']:.1f} tokens/s, with Ladder {generation['ladder_tokens_per_s']:.1f}"
            f" tokens/s, ratio {generation['ratio']:.2f}"
        )
    elif generation:
        table += f"\n\nGeneration failed: {generation['error']}"
    with open(os.path.join(out, "results.md"), "w") as handle:
        handle.write(f"`{results['command']}`\n\n{table}\n")
    plot(results, os.path.join(out, "results.png"))
    return table


if __name__ == "__main__":
    sys.exit(main())
