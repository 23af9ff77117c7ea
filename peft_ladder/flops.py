"""Exact FLOPs of a training step, counted by torch's `FlopCounterMode`, bitsandbytes' quantized matmuls included.

Counting, not estimating: every matmul, attention and convolution the step dispatches is counted from its real
shapes, so a frozen backbone's forward, the side network's forward and backward, and LoRA's backward through every
layer all count what they actually do. Element-wise ops (norms, activations, the optimizer) are not counted, as in
`torch.utils.flop_counter` and the usual 6N rule.

Two kinds of op `FlopCounterMode` does not know are registered here:

* bitsandbytes runs some quantized matmuls as its own ops (`gemv_4bit` for 4-bit inputs of one token, the `int8_*`
  matmuls of 8-bit layers); their formulas are those of `aten.mm` (2 x rows x in x out). 4-bit layers on other inputs
  dequantize and call `aten` matmuls, which are counted already.
* On a CPU, `scaled_dot_product_attention` runs `_scaled_dot_product_flash_attention_for_cpu` (and its backward),
  which torch counts as 0 FLOPs; they get torch's own formulas for the CUDA flash kernels, so an attention costs the
  same count on either device.
"""

from __future__ import annotations

from math import prod
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import (
    FlopCounterMode,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

_REGISTERED = False


def _matmul_flops(rows_shape, out_features: int, in_features: int) -> int:
    return 2 * prod(rows_shape) * out_features * in_features


def _register_missing_ops() -> None:
    """Teach `FlopCounterMode` the CPU attention kernels and bitsandbytes' matmuls (once; the module docstring)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    _register_cpu_attention()
    _register_bitsandbytes()


def _register_cpu_attention() -> None:
    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _sdpa_cpu(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _register_bitsandbytes() -> None:
    ops = getattr(torch.ops, "bitsandbytes", None)
    if ops is None or not hasattr(ops, "gemv_4bit"):
        return

    # Registered on the op packet (not `.default`): FlopCounterMode looks up the packet of the op it sees.
    @register_flop_formula(ops.gemv_4bit, get_raw=True)
    def _gemv_4bit(a, b, shape_b, *args, out_val=None, **kwargs) -> int:
        # a: (..., in), shape_b: (out, in) of the packed 4-bit weight
        return _matmul_flops(a.shape[:-1], shape_b[0], shape_b[1])

    def int8_matmul(a, weight) -> int:  # a: (..., in); weight: (out, in) int8
        return _matmul_flops(a.shape[:-1], weight.shape[0], weight.shape[1])

    formulas = {
        "int8_linear_matmul": lambda a, b, *args, **kwargs: int8_matmul(a, b),  # (A, B)
        "int8_scaled_mm": lambda a, b, *args, **kwargs: int8_matmul(a, b),  # (A, B, row_stats, col_stats, ...)
        "int8_mixed_scaled_mm": lambda a, ca, cb, *args, **kwargs: int8_matmul(a, cb),  # (A, CA, CB, ...)
    }
    for name, formula in formulas.items():
        if hasattr(ops, name):
            register_flop_formula(getattr(ops, name), get_raw=True)(formula)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs dispatched while `fn()` runs."""
    _register_missing_ops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def training_step_flops(model: nn.Module, batch: dict, loss_fn: Optional[Callable] = None) -> int:
    """FLOPs of one forward and backward pass of `model` on `batch` (gradients are left in `.grad`).

    `loss_fn(model, batch)` computes the loss; by default `model(**batch).loss`.

    Example:

    ```py
    >>> import torch
    >>> from peft_ladder.flops import training_step_flops
    >>> layer = torch.nn.Linear(8, 4)
    >>> # forward and weight gradient, 2 x 3 x 8 x 4 each; the input needs no gradient
    >>> training_step_flops(layer, {"input": torch.randn(3, 8)}, loss_fn=lambda m, b: m(**b).sum())
    384

    ```
    """

    def step() -> None:
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        loss.backward()

    return count_flops(step)


__all__ = ["count_flops", "training_step_flops"]
