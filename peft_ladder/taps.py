"""The taps a down-projection keeps for its weight gradient, at the backbone's precision or cheaper.

A trainable down-projection W (d -> d_s) needs its input x for grad_W = grad_y^T x. With an fp32 side network on a bf16
backbone, `nn.Linear(x.float())` keeps an fp32 copy of every tapped hidden state, (B, T, d) x 4 bytes per tap: after
the side blocks' activations, the largest thing Ladder holds (docs/benchmarks.md, "Shrinking the taps"). `TapLinear`
casts the tap on the fly instead and keeps it as `LadderConfig.saved_taps` says:

```
 tap (B, T, d), backbone dtype --cast--> x (side dtype) --W--> y      forward: x is a transient copy
        |
        +-- saved: "native" the tap itself (a reference, no copy)     backward: grad_W = grad_y^T cast(saved)
                   "int8"   int8 codes + a per-token absmax scale (B, T, 1), about half of bf16
                   "cpu"    a pinned CPU copy, made during the forward (CUDA only), nothing on the device
```

The forward output and, with "native", the gradients are those of `nn.Linear` on the cast tap (tested). The tap needs
no gradient (it is detached from the backbone); the side stream's token rows (tokens.py) do, and get it.
"""

from __future__ import annotations

from typing import Literal, Optional, get_args

import torch
import torch.nn.functional as F
from torch import nn

SavedTaps = Literal["native", "int8", "cpu"]  # LadderConfig.saved_taps
SAVED_TAPS: tuple[str, ...] = get_args(SavedTaps)
INT8_MAX = 127.0


def cpu_offload_error(device: torch.device) -> ValueError:
    return ValueError(
        f"saved_taps='cpu' offloads the taps kept for backward to pinned CPU memory, which needs a CUDA device; this "
        f"tap is on {device.type}. Use LadderConfig(saved_taps='native') (the default) or saved_taps='int8'."
    )


def quantize_per_token(tap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (..., d) and fp32 scales (..., 1) with tap ~= codes * scale: symmetric, absmax per token."""
    values = tap.float()
    scale = values.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    return values.div_(scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.to(torch.float32) * scale).to(dtype)


class _TapLinearFunction(torch.autograd.Function):
    """y = cast(tap) W^T + b, keeping the tap as `saved` says rather than its cast copy."""

    @staticmethod
    def forward(ctx, tap, weight, bias, dtype, saved):
        x = tap.to(dtype)
        out = F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.dtype, ctx.saved, ctx.has_bias = dtype, saved, bias is not None
        ctx.offloaded = None
        if not ctx.needs_input_grad[1]:  # frozen down-projection: the tap is not needed
            ctx.save_for_backward(weight)
        elif saved == "native":
            ctx.save_for_backward(weight, tap)
        elif saved == "int8":
            ctx.save_for_backward(weight, *quantize_per_token(tap))
        else:
            host = torch.empty(tap.shape, dtype=tap.dtype, device="cpu", pin_memory=True)
            ctx.offloaded = (host.copy_(tap, non_blocking=True), tap.device)  # not a saved tensor: host memory
            ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, *kept = ctx.saved_tensors
        grad_out = grad_out.to(ctx.dtype)
        grad_tap = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # the side stream's token rows (tokens.py)
            grad_tap = grad_out @ weight.to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            x = _restore(ctx, kept).to(ctx.dtype)
            grad_weight = (grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_tap, grad_weight, grad_bias, None, None


def _restore(ctx, kept: list[torch.Tensor]) -> torch.Tensor:
    if ctx.saved == "native":
        return kept[0]
    if ctx.saved == "int8":
        return dequantize_per_token(kept[0], kept[1], ctx.dtype)
    host, device = ctx.offloaded
    return host.to(device, non_blocking=True)


class TapLinear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) that reads a tap in the backbone's dtype and keeps it for the
    weight gradient as `saved_taps` says. The side network sets `saved_taps` (`LadderConfig.saved_taps`)."""

    saved_taps: SavedTaps = "native"

    def forward(self, tap: torch.Tensor) -> torch.Tensor:
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in (self.weight, self.bias) if p is not None)
        if not trains or self.weight.is_meta:  # no_grad, frozen, or empty weights (raises later): nothing to keep
            return F.linear(tap.to(self.weight.dtype), self.weight, self.bias)
        if self.saved_taps == "cpu" and tap.device.type != "cuda":
            raise cpu_offload_error(tap.device)
        dtype = _compute_dtype(tap.device, self.weight.dtype)
        with torch.autocast(tap.device.type, enabled=False):  # `dtype` already is what autocast would pick
            return _TapLinearFunction.apply(tap, self.weight, self.bias, dtype, self.saved_taps)


def _compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype `F.linear` computes in here: autocast's (bf16 under Trainer's bf16=True), else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


def tap_reader(down: nn.Module) -> Optional[TapLinear]:
    """The module that reads the tap in a down-projection (a `TapLinear`, or the first of an `nn.Sequential`)."""
    first = down[0] if isinstance(down, nn.Sequential) else down
    return first if isinstance(first, TapLinear) else None


__all__ = ["SAVED_TAPS", "SavedTaps", "TapLinear", "dequantize_per_token", "quantize_per_token", "tap_reader"]
