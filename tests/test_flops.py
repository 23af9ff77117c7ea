"""Exact FLOP counts of a training step (peft_ladder.flops), bitsandbytes' matmuls included."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import batch, ladder, tiny_causal_lm
from peft import LoraConfig, get_peft_model

from peft_ladder.flops import count_flops, training_step_flops


def test_a_linear_layer_counts_forward_and_weight_gradient_exactly():
    layer = torch.nn.Linear(8, 4)
    inputs = torch.randn(3, 8)
    assert training_step_flops(layer, {"input": inputs}, loss_fn=lambda m, b: m(**b).sum()) == 2 * (2 * 3 * 8 * 4)
    inputs.requires_grad_(True)  # now the input gradient is a third matmul
    assert training_step_flops(layer, {"input": inputs}, loss_fn=lambda m, b: m(**b).sum()) == 3 * (2 * 3 * 8 * 4)


def test_ladder_counts_the_frozen_forward_and_less_backward_than_lora():
    inputs = {**batch(length=32), "labels": batch(length=32)["input_ids"]}
    base = tiny_causal_lm("llama")
    with torch.no_grad():
        forward = count_flops(lambda: base(**inputs))
    lora = get_peft_model(tiny_causal_lm("llama"), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    side = ladder("llama")
    lora_flops, ladder_flops = training_step_flops(lora.train(), inputs), training_step_flops(side.train(), inputs)
    assert forward < ladder_flops < lora_flops
    assert lora_flops > 2 * forward  # LoRA backpropagates through every layer


@pytest.mark.bitsandbytes
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_backbones_count_their_matmuls_like_float_ones(kind):
    inputs = batch(size=1, length=1 if kind == "4bit" else 8)  # one token: bitsandbytes' gemv_4bit path
    float_model = tiny_causal_lm("llama")
    quantized = ladder(tiny_causal_lm("llama"), quantization=kind, bnb_4bit_compute_dtype="float32")
    with torch.no_grad():
        expected = count_flops(lambda: float_model(**inputs))
        with quantized.disable_adapter():
            got = count_flops(lambda: quantized(**inputs))
    assert got == expected


def test_attention_on_a_cpu_counts_what_the_cuda_kernels_count():
    # torch counts the CPU flash-attention kernel as 0 FLOPs; peft_ladder.flops gives it the CUDA kernels' formulas.
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    query = torch.randn(2, 4, 16, 8, requires_grad=True)
    shape = query.shape

    def attention():
        return torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True)

    assert count_flops(attention) == sdpa_flop_count(shape, shape, shape) > 0
    both = count_flops(lambda: attention().sum().backward())
    assert both == sdpa_flop_count(shape, shape, shape) + sdpa_backward_flop_count(shape, shape, shape, shape)
