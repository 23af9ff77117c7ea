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

from ..memory import SavedTensorCounter, held_tensors, track_peak_memory
from .methods import METHODS, build, external_chunk_size

# Built-in models (transformers configs, random weights): no download needed.
PRESETS = {
    # For tests: seconds per method.
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1024),
    # Qwen2.5-7B's proportions (MLP 5.3x hidden, GQA, vocab / hidden = 42, untied head) scaled down to run on a CPU.
    # A Llama config (explicit head_dim) rather than Qwen2's, whose side blocks do not keep the rotary head size.
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=1344, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=10880),
}


def model_config(model: str):
    """A transformers config from a preset name, a config.json file or a model directory."""
    from transformers import AutoConfig

    if model in PRESETS:
        fields = dict(PRESETS[model])
        return AutoConfig.for_model(fields.pop("model_type"), max_position_embeddings=32768, tie_word_embeddings=False,
                                    **fields)
    if os.path.isfile(model):
        with open(model) as handle:
            fields = json.load(handle)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(model)


def prepare_checkpoint(model: str, workdir: str, seed: int = 0) -> str:
    """A directory every method loads from: `model` itself if it holds weights, else random weights saved once."""
    if os.path.isdir(model) and any(name.endswith((".safetensors", ".bin")) for name in os.listdir(model)):
        return model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(model_config(model)).save_pretrained(workdir)
    return workdir


def make_batch(vocab_size: int, batch_size: int, seq_len: int, device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed + 1000 * seq_len + batch_size)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def train_step(model, batch: dict, optimizer, chunk_size: Optional[int]) -> float:
    if chunk_size is None:
        loss = model(**batch).loss  # the output (and its logits) is dropped before backward, as Trainer does
    else:
        from ..loss import chunked_causal_lm_forward

        loss = chunked_causal_lm_forward(model, chunk_size, **batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float().item()


class _Clock:
    """CPU: process CPU time (single-threaded). CUDA: wall time between synchronizations."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.method = "torch.cuda.synchronize + time.perf_counter" if self.cuda else "time.process_time (1 thread)"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if id(storage) not in seen:
            seen.add(id(storage))
            total += storage.nbytes()
    return total


def measure(model, optimizer, batch: dict, steps: int, chunk_size: Optional[int], device: torch.device) -> dict:
    clock = _Clock(device)
    train_step(model, batch, optimizer, chunk_size)  # warm-up: optimizer state appears
    times = []
    for _ in range(steps):
        start = clock.now()
        train_step(model, batch, optimizer, chunk_size)
        times.append(clock.now() - start)
    counter = SavedTensorCounter(model)
    with track_peak_memory(device, model=model, optimizer=optimizer, tensors=list(batch.values())) as peak:
        with counter.track():
            loss = train_step(model, batch, optimizer, chunk_size)
    median = statistics.median(times)
    tokens = batch["input_ids"].numel()
    return {
        "peak_bytes": peak.peak_bytes, "baseline_bytes": peak.baseline_bytes, "memory_method": peak.method,
        "weights_bytes": _bytes(held_tensors(model)), "optimizer_bytes": _bytes(held_tensors(optimizer=optimizer)),
        "saved_bytes": counter.bytes, "step_time_s": median, "step_times_s": times, "time_method": clock.method,
        "tokens_per_s": tokens / median if median > 0 else None, "final_loss": loss,
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
    optimizer = torch.optim.AdamW(trainable, lr=spec["lr"])
    chunk = external_chunk_size(method)
    vocab = model.config.get_text_config().vocab_size
    record = {"method": method.name, "description": method.help, "method_spec": asdict(method),
              "trainable_params": sum(p.numel() for p in trainable),
              "total_params": sum(p.numel() for p in model.parameters()), "runs": []}
    for batch_size, seq_len in spec["shapes"]:
        run = {"batch_size": batch_size, "seq_len": seq_len}
        try:
            batch = make_batch(vocab, batch_size, seq_len, device, spec["seed"])
            run.update(measure(model, optimizer, batch, spec["steps"], chunk, device))
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
    clock = _Clock(device)

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
    return {"method": "generation", "prompt_len": spec["prompt_len"], "new_tokens": new, "time_method": clock.method,
            "base_tokens_per_s": base, "ladder_tokens_per_s": with_ladder, "ratio": with_ladder / base}


def run_in_subprocess(spec: dict, timeout: Optional[float] = None) -> dict:
    """Run one method in a fresh Python process (nothing cached, allocator and bitsandbytes state fresh)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(spec, handle)
    try:
        done = subprocess.run([sys.executable, "-m", "peft_ladder.benchmark", "--worker", handle.name],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(spec["threads"])})
    finally:
        os.unlink(handle.name)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = "\n".join(done.stderr.strip().splitlines()[-5:])
    return {"method": spec["method"], "error": f"worker exited with {done.returncode}: {tail}", "runs": []}


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "device": str(device),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
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
