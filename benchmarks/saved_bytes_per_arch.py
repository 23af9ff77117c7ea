"""Bytes saved for backward by one training step of Ladder, xLadder and LoRA on each tested architecture.

The device-independent M3 figure (activations kept for backward), measured with
`torch.autograd.graph.saved_tensors_hooks` on the tiny models the tests use (4 layers, width 64, vocab 96).

    python -m benchmarks.saved_bytes_per_arch [--batch 2] [--length 128]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from conftest import ARCHS, batch, tiny_causal_lm  # noqa: E402  (the tests' tiny-model case table)

from peft_ladder import LadderConfig  # noqa: E402
from peft_ladder.memory import saved_bytes  # noqa: E402


def measure(arch: str, method: str, inputs: dict, switched: bool = False) -> int:
    model = tiny_causal_lm(arch).train()
    if switched:  # what QLoRA recipes switch on; Ladder must not let it bring the backbone graph back
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method == "lora":
        config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    else:
        config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, connections=method)
    return saved_bytes(get_peft_model(model, config).train(), inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    inputs = batch(size=args.batch, length=args.length)
    inputs = dict(inputs, labels=inputs["input_ids"])
    print(f"bytes saved for backward, batch {args.batch} x {args.length} tokens, reduction_factor=4\n")
    print("| arch | LoRA r=16 all-linear | Ladder | xLadder | Ladder / LoRA | xLadder / LoRA | Ladder, k-bit prep |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch in ARCHS:
        lora, ladder, xladder = (measure(arch, m, inputs) for m in ("lora", "ladder", "xladder"))
        prepared = measure(arch, "ladder", inputs, switched=True)
        print(
            f"| {arch} | {lora:,} | {ladder:,} | {xladder:,} | {ladder / lora:.2f} | {xladder / lora:.2f} | "
            f"{prepared:,} |"
        )


if __name__ == "__main__":
    main()
