"""Decoding speed with and without a Ladder adapter, per cache and compilation mode, in one process.

    python -m benchmarks.generation --model smollm2 --dtype float32 --out benchmarks/results/generation-smollm2
    python -m benchmarks.generation --model small --dtype bfloat16 --out benchmarks/results/generation-small

For each mode, the base model and a second copy of it with a default `LadderConfig` adapter (random side weights, so
the side network really runs): greedy decoding of `--new-tokens` tokens after a `--prompt-len`-token prompt, batch 1.
One warm-up `generate()` each (it also compiles), then `--repeats` timed ones each, alternating, and the median, in
`runner.Clock` time (single-threaded process CPU time on CPU, synchronized wall time on CUDA). Modes:

* `dynamic`: the default `DynamicCache`, eager;
* `static`: `cache_implementation="static"`, eager;
* `compiled`: `cache_implementation="static"` with transformers' compiled decoding forward (`compile_config`,
  inductor, `fullgraph=True`); its warm-up wall time (compilation) is reported as `compile_s`.

`smollm2` is SmolLM2-135M-Instruct from the demo's pip package (`examples/assets.py`); other names are the runner's
presets (`benchmarks/models.py`), or a model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from .runner import Clock, environment, make_batch

MODES = ("dynamic", "static", "compiled")


def generation_kwargs(mode: str, new_tokens: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if mode in ("static", "compiled"):
        kwargs["cache_implementation"] = "static"
    if mode == "compiled":
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=True, mode="default")  # "reduce-overhead" means CUDA graphs, GPU only
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told (CPU here)
        kwargs["compile_config"] = config
    return kwargs


def time_generation(models: dict, prompt: dict, mode: str, new_tokens: int, repeats: int, clock: Clock) -> dict:
    """Tokens/s of each of `models` in `mode`. Their timed runs alternate (base, Ladder, base, ...), so that load from
    other processes on shared cores, which slows the memory-bound backbone more than the small side network, falls
    on both alike."""
    kwargs = generation_kwargs(mode, new_tokens)
    records = {name: {"times_s": []} for name in models}
    with torch.no_grad():
        for name, model in models.items():
            start = time.perf_counter()
            model.generate(**prompt, **kwargs)  # warm-up (and compilation)
            if mode == "compiled":
                records[name]["compile_s"] = time.perf_counter() - start
        for _ in range(repeats):
            for name, model in models.items():
                start = clock.now()
                model.generate(**prompt, **kwargs)
                records[name]["times_s"].append(clock.now() - start)
    for record in records.values():
        record["tokens_per_s"] = new_tokens / statistics.median(record["times_s"])
    return records


def model_dir(name: str, workdir: str) -> str:
    if name == "smollm2":
        from .quality_setup import model_dir as smollm2_dir

        return smollm2_dir()
    from .models import prepare_checkpoint

    return prepare_checkpoint(name, workdir)


def run(args: argparse.Namespace) -> dict:
    import tempfile

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_ladder import LadderConfig

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    clock = Clock(device)
    with tempfile.TemporaryDirectory() as workdir:
        path = model_dir(args.model, workdir)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        ladder = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()  # its own copy
    ladder = get_peft_model(ladder, LadderConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    prompt = make_batch(base.config.get_text_config().vocab_size, 1, args.prompt_len, device, seed=0)
    prompt.pop("labels")
    results, models = {}, {"base": base, "ladder": ladder}
    for mode in args.modes.split(","):
        results[mode] = time_generation(models, prompt, mode, args.new_tokens, args.repeats, clock)
        results[mode]["ratio"] = results[mode]["ladder"]["tokens_per_s"] / results[mode]["base"]["tokens_per_s"]
        print(
            f"{mode}: base {results[mode]['base']['tokens_per_s']:.1f} tokens/s, Ladder "
            f"{results[mode]['ladder']['tokens_per_s']:.1f} tokens/s, {results[mode]['ratio']:.2f}x",
            file=sys.stderr,
            flush=True,
        )
    return {
        "environment": environment(device),
        "command": "python -m benchmarks.generation " + " ".join(sys.argv[1:]),
        "time_method": clock.method,
        "model": args.model,
        "dtype": args.dtype,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "results": results,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, a runner preset (small, ...) or a model directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--out", default=None, help="folder for results.json (default: print only)")
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes got {sorted(unknown)}; choose from {', '.join(MODES)}")
    record = run(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as handle:
            json.dump(record, handle, indent=1)
    print(json.dumps(record["results"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
