"""Quantized backbones: parameter bytes per precision, and a training step's peak memory, Ladder-4bit vs QLoRA.

1. Parameter bytes of one backbone in fp32 / bf16 / 8-bit / 4-bit (nf4, double quantization), split into the decoder's
   linear layers (what bitsandbytes quantizes) and the rest (embeddings, norms, LM head: kept as QLoRA keeps them).
   Quantization constants (absmax, codebooks, int8 scales) are counted with the weights.
2. Peak allocated memory of one full training step (forward, backward, AdamW step) on the *same* 4-bit backbone, at the
   same batch and sequence length, measured side by side in one run with `peft_ladder.memory.track_peak_memory`:
   QLoRA (LoRA r=16, alpha 32, all linear layers), QLoRA + gradient checkpointing, Ladder-4bit with the model's own
   loss, and Ladder-4bit with the package defaults. The second step is measured (AdamW creates its state in the first).

The models are built from transformers configs with random weights (no download): `smollm2-135m` has
SmolLM2-135M's shapes (30 layers, width 576, vocab 49,152, tied embeddings), `qwen2.5-0.5b` Qwen2.5-0.5B's.
bitsandbytes' CPU repacking of 4-bit weights for AVX512-BF16 CPUs (a second copy of every 4-bit weight, which no GPU
keeps) is switched off.

    python -m benchmarks.quantization_memory [--model smollm2-135m] [--batch 2] [--length 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import time
import warnings

import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_ladder import LadderConfig
from peft_ladder.memory import held_tensors, measure_training_step, saved_bytes, storage_bytes
from peft_ladder.options import enable_activation_checkpointing
from peft_ladder.quantization import LadderQuantizationWarning, quantize_in_place

from .models import gpu_faithful_bitsandbytes

MODELS = {
    "smollm2-135m": lambda: tf.LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "qwen2.5-0.5b": lambda: tf.Qwen2Config(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
}
PRECISIONS = {  # name -> (dtype of the float parts, bitsandbytes quantization)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "8-bit": (torch.bfloat16, "8bit"),
    "4-bit nf4": (torch.bfloat16, "4bit"),
}
FOUR_BIT = {
    "quantization": "4bit",
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": True,
    "bnb_4bit_compute_dtype": "bfloat16",
}


def build(model_name: str, dtype: torch.dtype, kind) -> nn.Module:
    """The same random weights every time; quantized by the code LadderConfig(quantization=...) runs."""
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(MODELS[model_name](), dtype=dtype)
    if kind is not None:
        fields = (
            dict(FOUR_BIT)
            if kind == "4bit"
            else {
                "quantization": "8bit",
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": None,
            }
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LadderQuantizationWarning)
            quantize_in_place(model, fields)
    gpu_faithful_bitsandbytes(model)  # no CPU-only repacked weight copies
    return model


def parameter_bytes(model: nn.Module) -> dict:
    """Bytes of the decoder's linear layers (with their quantization constants) and of everything else."""
    linear = [
        tensor
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name  # Linear4bit / Linear8bitLt subclass nn.Linear
        for tensor in held_tensors(module)
    ]
    linear_bytes, total = storage_bytes(linear), storage_bytes(held_tensors(model))
    return {"decoder_linear_bytes": linear_bytes, "other_bytes": total - linear_bytes, "total_bytes": total}


def peft_config(method: str):
    if method.startswith("qlora"):
        return LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    extra = {}
    if method == "ladder-4bit, model's loss" and "loss_chunk_size" in {
        f.name for f in dataclasses.fields(LadderConfig)
    }:
        extra["loss_chunk_size"] = None  # the same full-logits loss QLoRA computes
    return LadderConfig(task_type="CAUSAL_LM", **extra)


def training_step(model_name: str, method: str, inputs: dict) -> dict:
    base = build(model_name, torch.bfloat16, "4bit")
    if method == "qlora + gradient checkpointing":
        enable_activation_checkpointing(base)
        base.enable_input_require_grads()
    model = get_peft_model(base, peft_config(method)).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    record = {
        "method": method,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtype": str(trainable[0].dtype),
    }
    for step in (1, 2):
        cpu_start = time.process_time()
        measured = measure_training_step(model, optimizer, inputs)
        record[f"step{step}"] = {
            "peak_bytes": measured.peak_bytes,
            "baseline_bytes": measured.baseline_bytes,
            "cpu_seconds": round(time.process_time() - cpu_start, 2),
        }
    record["saved_for_backward_bytes"] = saved_bytes(model, inputs)  # forward only: no checkpoint recompute counted
    record["method_of_measurement"] = measured.method
    return record


def parameter_table(result: dict) -> str:
    """The parameter bytes of a results file as markdown, one row per precision."""
    lines = [
        "| precision | decoder linear layers | embeddings, norms, head | total | total / fp32 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    fp32 = result["parameter_bytes"]["fp32"]["total_bytes"]
    for name, sizes in result["parameter_bytes"].items():
        lines.append(
            f"| {name} | {sizes['decoder_linear_bytes'] / 2**20:,.1f} MiB | {sizes['other_bytes'] / 2**20:,.1f} MiB "
            f"| {sizes['total_bytes'] / 2**20:,.1f} MiB | {sizes['total_bytes'] / fp32:.3f} |"
        )
    return "\n".join(lines)


def training_table(result: dict) -> str:
    """The training steps of a results file as markdown, with each peak over QLoRA's."""
    lines = [
        "| method | trainable params | peak (step 2) | held at entry | saved for backward | peak / QLoRA | CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    qlora_peak = result["training_step"][0]["step2"]["peak_bytes"]
    for record in result["training_step"]:
        step = record["step2"]
        lines.append(
            f"| {record['method']} | {record['trainable_params']:,} | {step['peak_bytes'] / 2**20:,.1f} MiB | "
            f"{step['baseline_bytes'] / 2**20:,.1f} MiB | {record['saved_for_backward_bytes'] / 2**20:,.1f} MiB | "
            f"{step['peak_bytes'] / qlora_peak:.2f} | {step['cpu_seconds']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "results" / "quantization_memory.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    import bitsandbytes
    import peft

    result = {
        "model": args.model,
        "config": MODELS[args.model]().to_diff_dict(),
        "batch": args.batch,
        "length": args.length,
        "environment": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "transformers": tf.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "device": "cpu",
            "threads": args.threads,
        },
    }

    result["parameter_bytes"] = {}
    for name, (dtype, kind) in PRECISIONS.items():
        result["parameter_bytes"][name] = parameter_bytes(build(args.model, dtype, kind))
    print(f"## Parameter bytes, {args.model}-like backbone (random weights)\n")
    print(parameter_table(result))

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, MODELS[args.model]().vocab_size, (args.batch, args.length), generator=generator)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    methods = ("qlora", "qlora + gradient checkpointing", "ladder-4bit, model's loss", "ladder-4bit, defaults")
    result["training_step"] = [training_step(args.model, method, inputs) for method in methods]
    print(
        f"\n## Training step peak memory, 4-bit nf4 backbone (bf16 float parts), batch {args.batch} x {args.length}\n"
    )
    print(training_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
