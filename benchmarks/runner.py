"""Runs one method on the same model and batches, in a fresh process, and measures it.

Per (batch size, sequence length): one warm-up step (AdamW creates its state there, so later steps peak higher),
`steps` timed steps, then one step under the memory trackers. Peak memory is `track_peak_memory` around that whole
optimizer step (forward, backward, `optimizer.step`, `zero_grad`), starting from the weights, optimizer state and
batch held at entry. Step time is single-threaded process CPU time on CPU (wall time swings with other processes on
shared cores, CPU time tracks FLOP ratios) and synchronized wall time on CUDA.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Optional

import torch

from peft_ladder.loss import chunked_causal_lm_forward
from peft_ladder.memory import held_tensors, measure_training_step, storage_bytes
from peft_ladder.methods import METHODS

from .models import build, check_precision, external_chunk_size, make_optimizer, precision_context

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: workers run `-m benchmarks`


def make_batch(vocab_size: int, batch_size: int, seq_len: int, device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed + 1000 * seq_len + batch_size)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def train_step(model, batch: dict, optimizer, chunk_size: Optional[int], autocast: str = "none") -> float:
    """One unmeasured step (warm-up and timing), the same work `measure_training_step` does."""
    loss = _loss_fn(chunk_size, autocast)(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float().item()


def _loss_fn(chunk_size: Optional[int], autocast: str = "none"):
    """The step's forward and loss; with `autocast="bf16"` inside `torch.autocast`, as Trainer's bf16=True runs
    them (backward and the optimizer step outside it)."""

    def loss_fn(model, batch):
        with precision_context(autocast, next(model.parameters()).device):
            if chunk_size is None:
                return model(**batch).loss  # the output (and its logits) is dropped before backward
            return chunked_causal_lm_forward(model, chunk_size, **batch).loss

    return loss_fn


class Clock:
    """CPU: process CPU time (single-threaded). CUDA: wall time between synchronizations."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "torch.cuda.synchronize + time.perf_counter" if self.cuda else "time.process_time (1 thread)"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def measure(
    model, optimizer, batch: dict, steps: int, chunk_size: Optional[int], device: torch.device, autocast: str = "none"
) -> dict:
    clock = Clock(device)
    train_step(model, batch, optimizer, chunk_size, autocast)  # warm-up: optimizer state appears
    times = []
    for _ in range(steps):
        start = clock.now()
        train_step(model, batch, optimizer, chunk_size, autocast)
        times.append(clock.now() - start)
    loss_fn = _loss_fn(chunk_size, autocast)
    step = measure_training_step(model, optimizer, batch, device=device, loss_fn=loss_fn)
    median = statistics.median(times)
    tokens = batch["input_ids"].numel()
    return {
        "peak_bytes": step.peak_bytes,
        "baseline_bytes": step.baseline_bytes,
        "memory_method": step.method,
        "weights_bytes": storage_bytes(held_tensors(model)),
        "optimizer_bytes": storage_bytes(held_tensors(optimizer=optimizer)),
        "saved_bytes": step.saved_bytes,
        "step_time_s": median,
        "step_times_s": times,
        "time_method": clock.method,
        "tokens_per_s": tokens / median if median > 0 else None,
        "final_loss": step.loss,
    }


def run_method(spec: dict) -> dict:
    """Worker body: build `spec["method"]` and measure it at every requested shape."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    method = METHODS[spec["method"]]
    torch.manual_seed(spec["seed"])
    model = build(spec["model_dir"], method, dtype, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Older specs (and results.json files) have neither: AdamW without autocast, what every run measured before.
    optimizer_name, autocast = spec.get("optimizer", "adamw"), spec.get("autocast", "none")
    check_precision(optimizer_name, autocast, spec["dtype"], spec["device"])
    optimizer = make_optimizer(optimizer_name, trainable, spec["lr"])
    chunk = external_chunk_size(method)
    vocab = model.config.get_text_config().vocab_size
    record = {
        "method": method.name,
        "description": method.help,
        "method_spec": asdict(method),
        "optimizer": optimizer_name,
        "optimizer_class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "autocast": autocast,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "runs": [],
    }
    for batch_size, seq_len in spec["shapes"]:
        run = {"batch_size": batch_size, "seq_len": seq_len}
        try:
            batch = make_batch(vocab, batch_size, seq_len, device, spec["seed"])
            run.update(measure(model, optimizer, batch, spec["steps"], chunk, device, autocast))
        except torch.OutOfMemoryError as error:
            run["error"] = f"out of memory: {error}".splitlines()[0]
            torch.cuda.empty_cache() if device.type == "cuda" else None
        record["runs"].append(run)
    return record


def run_generation(spec: dict) -> dict:
    """Worker body for the generation target: greedy decoding speed of the base model and of the same model with a
    Ladder adapter (side KV cache), in one process, same prompt, same number of new tokens."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_ladder import LadderConfig

    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(device).eval()
    vocab = model.config.get_text_config().vocab_size
    prompt = make_batch(vocab, 1, spec["prompt_len"], device, spec["seed"])
    prompt.pop("labels")
    new = spec["new_tokens"]
    clock = Clock(device)

    def speed(m) -> float:
        kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            m.generate(**prompt, **kwargs)  # warm-up
            start = clock.now()
            m.generate(**prompt, **kwargs)
        return new / (clock.now() - start)

    base = speed(model)
    ladder = get_peft_model(model, LadderConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    with_ladder = speed(ladder)
    return {
        "method": "generation",
        "prompt_len": spec["prompt_len"],
        "new_tokens": new,
        "time_method": clock.method,
        "base_tokens_per_s": base,
        "ladder_tokens_per_s": with_ladder,
        "ratio": with_ladder / base,
    }


def run_worker(module: str, spec: dict, timeout: Optional[float], threads: int) -> subprocess.CompletedProcess:
    """`python -m <module> --worker SPEC.json` in a fresh process from the repository root, `threads` OpenMP threads.

    Raises `subprocess.TimeoutExpired` past `timeout` seconds.
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        return subprocess.run(
            [sys.executable, "-m", module, "--worker", handle.name],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        )
    finally:
        os.unlink(handle.name)


def worker_result(done: subprocess.CompletedProcess) -> Optional[dict]:
    """The JSON line a worker printed last, or None if it printed none."""
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def worker_error(done: subprocess.CompletedProcess) -> str:
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    return f"worker exited with {done.returncode}: {tail}"


def run_in_subprocess(spec: dict, timeout: Optional[float] = None) -> dict:
    """Run one method in a fresh Python process (nothing cached, allocator and bitsandbytes state fresh)."""
    done = run_worker("benchmarks", spec, timeout, spec["threads"])
    result = worker_result(done)
    return result if result is not None else {"method": spec["method"], "error": worker_error(done), "runs": []}


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": str(device),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # optional
        env["bitsandbytes"] = None
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = platform.processor() or _cpu_name()
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        return ""
