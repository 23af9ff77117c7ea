"""`python -m benchmarks.quality`: held-out quality against steps and exact training FLOPs, every method, several seeds.

    python -m benchmarks.quality --task all --methods ladder,xladder,lora --seeds 0,1,2 --jobs 2
    python -m benchmarks.quality --task gsm8k --methods ladder,lora,lora-last2,lora-last4,lora-last8,last-tap \
        --variant r4='{"reduction_factor": 4}' --seeds 0
    python -m benchmarks.quality --size ci --out /tmp/quality-ci       # about 2 minutes, what CI runs
    python -m benchmarks.quality --task minilm --methods ladder,lora --jobs 2   # the encoder: all-MiniLM-L6-v2

Each (task, method, seed) trains in a fresh single-threaded subprocess on the same batches (data order fixed by the
data seed; the method seed only changes the adapter's init, and the BBC score head's, the same for every method at a
seed). Training FLOPs are counted exactly with `FlopCounterMode` (`peft_ladder.flops.training_step_flops`) once per
distinct batch shape before training (the count depends on shapes only) and summed per step; CPU time is
`time.process_time` around each step (forward, backward, optimizer), one thread. Evaluations fall at equal fractions
of the budget, so every method is scored at the same FLOPs. Writes results.json, results.md and results.png.

Budget: gsm8k trains every method to the training FLOPs of 100 LoRA steps (the issue's workload: batch 4, <= 128
tokens, AdamW lr 1e-3, no weight decay); Ladder takes more, cheaper steps. bbc trains every method the same steps.

Default size, estimated from measured single-thread CPU time (SmolLM2, batch 4 x 128 tokens: LoRA 5.1 s/step,
Ladder 2.9 s/step) and exact FLOP counts (a Ladder step costs 0.61x a LoRA step's training FLOPs: ~165 Ladder steps
for 100 LoRA steps): gsm8k per seed LoRA 100 x 5.1 = 510 s, Ladder and xLadder ~165 x 2.9 = 480 s each, plus 5
evaluations of 32 held-out problems (~12 s each), model loading and FLOP counting: ~1,700 s per seed, ~5,100 s for
3 seeds, ~43 min with --jobs 2. bbc (shrunk: 30 steps, 160 held-out articles evaluated at steps 15 and 30): ~540 s
per seed, ~14 min for 3 seeds with --jobs 2. So `--task all` at the default size takes ~55-60 min on 2 cores, not
30: 30 minutes is not reachable at the issue's gsm8k workload with 3 seeds (`--task gsm8k` alone: ~43 min; one seed
of both tasks, `--seeds 0`: ~20 min).

`--task minilm` runs the encoder tasks `minilm-classify` and `minilm-embed` (all-MiniLM-L6-v2 on BBC News with
`benchmarks/minilm_check.py`'s data, objectives and scores) at equal FLOPs: the training FLOPs of 30 LoRA steps of
batch 8 x <= 128 tokens (Ladder: ~51 steps), 160 held-out articles scored at the middle and the end. Ladder and
LoRA with 3 seeds: 12 runs, 11.8 minutes of CPU time in all (measured; 12.2 minutes wall with --jobs 2 under
`nice` on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from . import quality_setup as setup
from .runner import Clock, environment, run_worker, worker_error, worker_result

SIZES = {
    "default": {
        "gsm8k": dict(batch_size=4, seq_len=128, eval_size=32, train_pool=1200, budget="lora-steps=100", evals=4),
        "bbc": dict(batch_size=4, seq_len=128, eval_size=160, train_pool=1600, budget="steps=30", evals=2),
        **dict.fromkeys(
            setup.MINILM_TASKS,
            dict(batch_size=8, seq_len=128, eval_size=160, train_pool=640, budget="lora-steps=30", evals=2),
        ),
    },
    "ci": {
        "gsm8k": dict(batch_size=2, seq_len=48, eval_size=4, train_pool=8, budget="lora-steps=2", evals=1),
        "bbc": dict(batch_size=2, seq_len=32, eval_size=8, train_pool=8, budget="steps=2", evals=1),
        **dict.fromkeys(
            setup.MINILM_TASKS,
            dict(batch_size=2, seq_len=32, eval_size=8, train_pool=8, budget="lora-steps=2", evals=1),
        ),
    },
}
DEFAULT_METHODS = {"default": "ladder,xladder,lora", "ci": "ladder,lora"}
TASKS = {"all": ["gsm8k", "bbc"], "minilm": list(setup.MINILM_TASKS)}  # groups; any single task by its name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--task",
        default="all",
        choices=["gsm8k", "bbc", *setup.MINILM_TASKS, *TASKS],
        help="all: gsm8k and bbc (SmolLM2); minilm: minilm-classify and minilm-embed (all-MiniLM-L6-v2)",
    )
    parser.add_argument("--methods", default=None, help="comma-separated (default: ladder,xladder,lora; ci: 2)")
    parser.add_argument("--seeds", default=None, help="comma-separated method seeds (default 0,1,2; ci: 0)")
    parser.add_argument("--size", default="default", choices=sorted(SIZES))
    parser.add_argument(
        "--budget",
        default=None,
        help="lora-steps=N (the training FLOPs of N LoRA steps), steps=N or flops=X; default: the size's per task",
    )
    parser.add_argument("--budget-flops", type=float, default=None, help="same as --budget flops=X")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a Ladder variant: LadderConfig kwargs as JSON (plus lr, weight_decay, warmup, schedule); "
        "repeatable; its NAME is then usable in --methods (added to it when not listed)",
    )
    parser.add_argument("--variants-file", default=None, help="a JSON file {name: {LadderConfig kwargs}}")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate for every method (1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=float, default=0.0, help="warm-up: a fraction of the steps (<1) or steps")
    parser.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each its own single-threaded process")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where each run trains: cpu (default; time is single-thread process CPU time) or cuda (time is "
        "synchronized wall time on a GPU that --jobs runs share, indicative only; losses and FLOPs are the same kind)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run before it is reported failed")
    parser.add_argument("--out", default="benchmarks/results/quality-cpu")
    parser.add_argument("--report", metavar="RESULTS_JSON", default=None, help="only rewrite the .md and .png")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = _variants(parser, args)
    args.methods = (args.methods or DEFAULT_METHODS[args.size]).split(",")
    args.methods += [name for name in args.variants if name not in args.methods]
    args.seeds = [int(s) for s in (args.seeds or ("0" if args.size == "ci" else "0,1,2")).split(",")]
    if args.budget_flops is not None:
        args.budget = f"flops={args.budget_flops:g}"
    args.tasks = TASKS.get(args.task, [args.task])
    for name in args.methods:
        try:
            setup.method_spec(name, args.variants)
            for task in args.tasks:
                setup.check_method_for_task(name, task)
        except ValueError as error:
            parser.error(str(error))
    return args


def _variants(parser, args) -> dict:
    variants = {}
    if args.variants_file:
        with open(args.variants_file) as handle:
            variants.update(json.load(handle))
    for item in args.variant:
        name, _, text = item.partition("=")
        try:
            variants[name.strip()] = json.loads(text)
        except json.JSONDecodeError as error:
            parser.error(f"--variant {item!r}: the part after '=' must be a JSON object ({error})")
    return variants


def parse_budget(text: str) -> tuple[str, float]:
    kind, _, value = text.partition("=")
    if kind not in ("lora-steps", "steps", "flops") or not value:
        raise ValueError(f"budget {text!r}: use lora-steps=N, steps=N or flops=X")
    return kind, float(value)


# --- one run (in the worker process) ------------------------------------------------------------------------------


def _lr_factor(step: int, total: int, warmup: float, schedule: str) -> float:
    warm = int(warmup * total) if warmup < 1 else int(warmup)
    if step < warm:
        return (step + 1) / warm
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    return 1.0


def _shape(batch: dict) -> str:
    """'4x128', or 'titles:8x12,bodies:8x128' for a batch of several inputs."""
    if "input_ids" in batch:
        return "x".join(map(str, batch["input_ids"].shape))
    return ",".join(f"{name}:{_shape(part)}" for name, part in batch.items() if isinstance(part, dict))


def shape_flops(model, batches: list[dict], cache: dict, loss_fn=None) -> list[int]:
    """Exact training FLOPs of each batch, counted once per distinct shape (the count depends on shapes only)."""
    from peft_ladder.flops import training_step_flops

    out = []
    for batch in batches:
        key = _shape(batch)
        if key not in cache:
            cache[key] = training_step_flops(model, batch, loss_fn=loss_fn)
            model.zero_grad(set_to_none=True)
        out.append(cache[key])
    return out


def plan_steps(model, train: list[dict], budget: tuple[str, float], cache: dict, loss_fn=None) -> int:
    """Steps (cycling the training batches) whose summed FLOPs first reach the budget."""
    kind, value = budget
    if kind == "steps":
        return int(value)
    total, steps = 0, 0
    while total < value:
        total += shape_flops(model, [train[steps % len(train)]], cache, loss_fn)[0]
        steps += 1
    return steps


def _to(batch: dict, device: torch.device) -> dict:
    return {key: _to(value, device) if isinstance(value, dict) else value.to(device) for key, value in batch.items()}


PROBE_STEPS = 5  # the first steps' effect on one fixed batch: the issue's "no first step raises the loss > 10%"


@torch.no_grad()
def _probe_loss(model, batch: dict, loss_fn) -> float:
    """Training loss on `batch` (the first training batch) without a step: the same batch before and after steps.
    In eval mode, so that dropout (MiniLM's 0.1) does not blur the comparison."""
    model.eval()
    try:
        return float(loss_fn(model, batch))
    finally:
        model.train()


FISHER_BATCHES = 8  # side_init="fisher": the first training batches, as LST estimates the importance


def fisher_init(model, method: dict, train: list[dict]) -> int:
    """Run `initialize_side_fisher` for a `side_init="fisher"` variant; its FLOPs (backward passes through the whole
    backbone) count against the method's budget, so every method is still compared at equal FLOPs."""
    if method.get("ladder", {}).get("side_init") != "fisher":
        return 0
    from peft_ladder import initialize_side_fisher
    from peft_ladder.flops import count_flops

    flops = count_flops(lambda: initialize_side_fisher(model, train[:FISHER_BATCHES]))
    model.zero_grad(set_to_none=True)
    return flops


def run(spec: dict) -> dict:
    """Train one (task, method, seed) and record its curve; the body of a worker process."""
    from peft_ladder.memory import measure_training_step

    torch.set_num_threads(1)
    task, method = spec["task"], spec["method"]
    loss_fn = setup.loss_fn(task)
    device = torch.device(spec.get("device", "cpu"))
    data = setup.workload(task, spec["size"], spec["data_seed"])
    data["train"], data["eval"] = [_to(b, device) for b in data["train"]], [_to(b, device) for b in data["eval"]]
    train = data["train"]
    torch.manual_seed(spec["seed"])
    model = setup.build(method, task, data["num_labels"]).to(device)
    opts = {**spec["training"], **method.get("training", {})}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts["lr"], weight_decay=opts["weight_decay"])
    init_flops = fisher_init(model, method, train)
    kind, value = spec["budget"]
    cache: dict = {}
    steps = plan_steps(model, train, (kind, value - init_flops) if kind == "flops" else (kind, value), cache, loss_fn)
    if steps < 1:
        raise ValueError(f"the budget ({value:.4g} FLOPs) is spent by the Fisher init ({init_flops:.4g}): raise it")
    batches = [train[i % len(train)] for i in range(steps)]
    flops = shape_flops(model, batches, cache, loss_fn)
    evals = spec["size"]["evals"]
    marks = sorted({min(steps, max(1, round(steps * k / evals))) for k in range(1, evals + 1)})
    timer = Clock(device)  # process CPU time; on CUDA, wall time between synchronizations
    time_key = "cuda_s_per_step" if timer.cuda else "cpu_s_per_step"
    clock = time_key.removesuffix("_per_step")  # cpu_s, or cuda_s on a GPU
    curve = [{"step": 0, "flops": init_flops, clock: 0.0, **setup.evaluate(model, data["eval"], task)}]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps, opts["warmup"], opts["schedule"])
    )
    cpu, total, times, losses, probe = 0.0, init_flops, [], [], [_probe_loss(model, train[0], loss_fn)]
    for step, batch in enumerate(batches, start=1):
        start = timer.now()
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        times.append(timer.now() - start)
        losses.append(loss.item())  # after the timer: the read synchronizes
        if step <= PROBE_STEPS:
            probe.append(_probe_loss(model, train[0], loss_fn))
        cpu, total = cpu + times[-1], total + flops[step - 1]
        if step in marks:
            curve.append({"step": step, "flops": total, clock: cpu, **setup.evaluate(model, data["eval"], task)})
    memory = measure_training_step(model, optimizer, train[0], loss_fn=loss_fn)
    trainable, all_params = model.get_nb_trainable_parameters() if hasattr(model, "peft_config") else _count(model)
    return {
        "task": task,
        "method": method["name"],
        "spec": method,
        "seed": spec["seed"],
        "training": opts,
        "steps": steps,
        "trainable_params": trainable,
        "total_params": all_params,
        "peak_bytes": memory.peak_bytes,
        "saved_bytes": memory.saved_bytes,
        "memory_shape": _shape(train[0]),
        time_key: statistics.median(times),
        "flops_per_shape": dict(cache),
        "flops_per_step": (total - init_flops) / steps,
        "init_flops": init_flops,
        "curve": curve,
        "train_losses": losses,
        "probe_losses": probe,
        "data": {k: v for k, v in data.items() if k not in ("train", "eval", "pad_id")},
    }


def _count(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- orchestration ------------------------------------------------------------------------------------------------


def run_in_subprocess(spec: dict, timeout) -> dict:
    try:
        done = run_worker("benchmarks.quality", spec, timeout, threads=1)
    except subprocess.TimeoutExpired:
        return {**_ids(spec), "error": f"timed out after {timeout} s"}
    result = worker_result(done)
    return result if result is not None else {**_ids(spec), "error": worker_error(done)}


def _ids(spec: dict) -> dict:
    return {"task": spec["task"], "method": spec["method"]["name"], "seed": spec["seed"]}


def lora_budget_flops(task: str, size: dict, steps: int, data_seed: int, timeout, device: str = "cpu") -> float:
    """The training FLOPs of `steps` LoRA steps on the task's batches, counted in a subprocess."""
    spec = {"task": task, "size": size, "data_seed": data_seed, "lora_steps": steps, "device": device}
    done = run_worker("benchmarks.quality", spec, timeout, threads=1)
    result = worker_result(done)
    if done.returncode != 0 or result is None:
        raise RuntimeError(f"counting the LoRA budget failed: {done.stderr.strip()[-2000:]}")
    return float(result["flops"])


def _worker(path: str) -> dict:
    with open(path) as handle:
        spec = json.load(handle)
    if "lora_steps" not in spec:
        return run(spec)
    torch.set_num_threads(1)
    device = torch.device(spec.get("device", "cpu"))
    data = setup.workload(spec["task"], spec["size"], spec["data_seed"])
    model = setup.build(setup.method_spec("lora", {}), spec["task"], data["num_labels"]).to(device)
    train, cache = [_to(b, device) for b in data["train"]], {}
    batches = [train[i % len(train)] for i in range(spec["lora_steps"])]
    flops = shape_flops(model, batches, cache, setup.loss_fn(spec["task"]))
    return {"flops": sum(flops)}


def _write_json(results: dict, path: str) -> None:
    with open(path + ".tmp", "w") as handle:
        json.dump(results, handle, indent=1)
    os.replace(path + ".tmp", path)


def _environment(device: str) -> dict:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but torch sees no CUDA device; use --device cpu")
    return environment(torch.device(device))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker)))
        return 0
    from .quality_report import write_reports

    if args.report:
        with open(args.report) as handle:
            results = json.load(handle)
        print(write_reports(results, os.path.dirname(os.path.abspath(args.report))))
        return 0
    env = _environment(args.device)
    tasks = args.tasks
    for task in tasks:
        missing = setup.missing_packages(task)
        if missing:
            print(f"error: task {task} needs packages that are not installed. Run:\n    " + "\n    ".join(missing))
            return 2
    if set(tasks) - set(setup.MINILM_TASKS):
        setup.model_dir()  # convert SmolLM2 once, before the workers start
    training = {"lr": args.lr, "weight_decay": args.weight_decay, "warmup": args.warmup, "schedule": args.schedule}
    specs, budgets = [], {}
    for task in tasks:
        size = SIZES[args.size][task]
        kind, value = parse_budget(args.budget or size["budget"])
        if kind == "lora-steps":
            budget = ("flops", lora_budget_flops(task, size, int(value), args.data_seed, args.timeout, args.device))
        else:
            budget = (kind, value)
        budgets[task] = {"spec": args.budget or size["budget"], "kind": budget[0], "value": budget[1]}
        for name in args.methods:
            for seed in args.seeds:
                specs.append(
                    {
                        "task": task,
                        "method": setup.method_spec(name, args.variants),
                        "seed": seed,
                        "size": size,
                        "data_seed": args.data_seed,
                        "budget": budget,
                        "training": training,
                        "device": args.device,
                    }
                )

    results = {
        "environment": {**env, "threads_per_run": 1, "jobs": args.jobs},
        "command": "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "report")},
        "sizes": {task: SIZES[args.size][task] for task in tasks},
        "budgets": budgets,
        "runs": [],
    }
    os.makedirs(args.out, exist_ok=True)
    lock = threading.Lock()

    def one(spec: dict) -> dict:
        record = run_in_subprocess(spec, args.timeout)
        state = "failed: " + record["error"].splitlines()[-1] if record.get("error") else "done"
        print(f"  {spec['task']} {spec['method']['name']} seed {spec['seed']}: {state}", file=sys.stderr, flush=True)
        with lock:  # results.json holds every finished run, so an interrupted sweep keeps them (rerun --report)
            results["runs"].append(record)
            _write_json(results, os.path.join(args.out, "results.json"))
        return record

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results["runs"] = list(pool.map(one, specs))  # the specs' order, not the finishing order
    records = results["runs"]
    _write_json(results, os.path.join(args.out, "results.json"))
    print(write_reports(results, args.out))
    return 0 if not any(r.get("error") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
