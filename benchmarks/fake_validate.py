"""The planner against the real module code at 7B-8B sizes, run on fake tensors: no weights, no memory, no GPU.

    python -m benchmarks.fake_validate --out benchmarks/results/fake-validate.json

Each method is built as `python -m benchmarks` builds it (transformers' model class, PEFT's LoRA or this package's
Ladder tuner, transformers' gradient checkpointing, the same loss), on the `meta` device first, so PEFT wraps and
casts empty modules, and then every parameter and buffer is replaced by a `FakeTensor` of the same shape and dtype.
Two training steps run under `FakeTensorMode` (forward, backward, `torch.optim.AdamW` step, `zero_grad`); the
second one is measured by `peft_ladder.memory`'s live-storage tracker, the CPU analogue of
`torch.cuda.max_memory_allocated`, exactly as the benchmark measures a real CPU step.

What fake tensors cannot run, and what is done instead:

* Data-dependent ops, answered as for the benchmark's batches (no padding, no packed sequences, every label
  valid): boolean indexing (the chunked loss's `[valid]`) keeps every position, a boolean `.item()` answers True
  (transformers' "no padding" and "not packed" checks), any other `.item()` answers 1 (AdamW's step count).
* transformers treats fake tensors as tracing and then builds an explicit 4-D causal mask (8 MiB per layer at 2k
  tokens in fp32, and SDPA saves it) instead of SDPA's `is_causal`; a real run takes `is_causal`. Its
  `masking_utils.is_tracing` is told to ignore fake tensors for the run, so the mask code takes the real path.
* bitsandbytes' 4-bit kernels. A 4-bit backbone is emulated: each decoder-layer linear holds bitsandbytes' storage
  (packed nf4 bytes, uint8 absmax per 64 values, fp32 absmax per 256 blocks) and, as bitsandbytes' `MatMul4Bit` does
  on GPU, dequantizes a transient bf16 weight for each matmul and saves nothing but the packed weight for backward.
  The LoRA / Ladder code around it is the real code. Rows marked "4-bit (emulated)".

Fake tensors have no values, so nothing here says anything about the loss; the trackers see only sizes, which is all
a peak-memory prediction is about.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from peft_ladder.memory import _LiveStorageTracker, held_tensors
from peft_ladder.methods import METHODS, Method
from peft_ladder.planner import GIB, estimate

from .models import external_chunk_size, model_config
from .runner import _loss_fn

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_MODELS = ("qwen2.5-7b", "llama-3.1-8b")
DEFAULT_METHODS = ("lora", "qlora-gc", "qlora-gc-chunk", "ladder", "ladder-4bit")


class _FakeStepTracker(_LiveStorageTracker):
    """The live-storage tracker, answering the two data-dependent questions fake tensors cannot (module docstring)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default:  # every position valid: (n, ndim) indices
            mask = args[0]
            out = torch.empty((mask.numel(), mask.dim()), dtype=torch.long, device=mask.device)
            self.add(out, existed_before=False)
            return out
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            source, (mask,) = args[0], args[1]  # x[valid] with every position valid
            out = torch.empty((mask.numel(), *source.shape[mask.dim() :]), dtype=source.dtype, device=source.device)
            self.add(out, existed_before=False)
            return out
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        return super().__torch_dispatch__(func, types, args, kwargs)


class _Dequantize4bit(torch.autograd.Function):
    """bitsandbytes' `MatMul4Bit` on GPU: a transient dequantized weight per matmul; only the packed one is saved."""

    @staticmethod
    def forward(ctx, x, packed, shape, dtype):
        ctx.shape, ctx.dtype = shape, dtype
        ctx.save_for_backward(packed)
        return x @ torch.empty(shape, dtype=dtype, device=x.device).t()

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad @ torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device), None, None, None


class Emulated4bitLinear(nn.Module):
    """An nf4 `Linear4bit`'s storage (double quantization) and its GPU matmul, for fake tensors only."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        n = out_features * in_features
        self.shape, self.dtype = (out_features, in_features), dtype
        self.weight = nn.Parameter(torch.empty(n // 2, 1, dtype=torch.uint8, device="meta"), requires_grad=False)
        self.register_buffer("absmax", torch.empty(n // 64, dtype=torch.uint8, device="meta"))
        self.register_buffer("absmax2", torch.empty(n // (64 * 256), dtype=torch.float32, device="meta"))
        # The nf4 code book, the nested state's 8-bit code book and its offset: constant, about 1 KiB per layer.
        self.register_buffer("code", torch.empty(16, dtype=torch.float32, device="meta"))
        self.register_buffer("code2", torch.empty(256, dtype=torch.float32, device="meta"))
        self.register_buffer("offset", torch.empty((), dtype=torch.float32, device="meta"))
        self.bias = linear.bias
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Dequantize4bit.apply(x.to(self.dtype), self.weight, self.shape, self.dtype)
        return out + self.bias if self.bias is not None else out


def _emulate_4bit(model: nn.Module, dtype: torch.dtype) -> None:
    """Replace the decoder layers' linears (a LoRA layer's `base_layer` included) by `Emulated4bitLinear`."""
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}." or "ladder_side" in name or "lora_" in name:
            continue
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear and "lora_" not in child_name:
                setattr(module, child_name, Emulated4bitLinear(child, dtype))


def build_fake(config, method: Method, mode: FakeTensorMode, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """`method`'s model on fake tensors: built on `meta` (PEFT's casts and `.to()` happen there), then each
    parameter and buffer replaced by a fake tensor of the same shape, dtype and `requires_grad`."""
    import transformers

    from peft_ladder.options import enable_activation_checkpointing

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    if method.gradient_checkpointing:
        enable_activation_checkpointing(model, {"use_reentrant": False})
    if method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        from peft_ladder.methods import LORA_ALPHA, LORA_R

        adapter = LoraConfig(
            task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear"
        )
        model = get_peft_model(model, adapter)
    elif method.kind == "ladder":
        from peft import get_peft_model

        from peft_ladder import LadderConfig

        adapter = LadderConfig(
            task_type="CAUSAL_LM",
            connections=method.connections,
            loss_chunk_size=method.loss_chunk_size,
            **dict(method.ladder_options),  # e.g. saved_taps, side_checkpointing, down_rank
        )
        model = get_peft_model(model, adapter, autocast_adapter_dtype=not method.side_in_backbone_dtype)
    else:
        raise ValueError(f"method {method.name!r}: only LoRA and Ladder methods run on fake tensors here.")
    if method.quantization == "4bit":
        _emulate_4bit(model, dtype)
    elif method.quantization is not None:
        raise ValueError(f"method {method.name!r}: only 4-bit backbones are emulated, not {method.quantization}.")
    _materialize(model, mode)
    return model.train()


def _materialize(model: nn.Module, mode: FakeTensorMode) -> None:
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                with mode:
                    fake = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                module._parameters[name] = nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                with mode:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")


def fake_step_peak(config, method_name: str, seq_len: int, batch_size: int = 1, autocast: bool = False) -> dict:
    """Peak live bytes of the second of two fake training steps of `method_name` on `config` (see module docs).
    `autocast`: the forward under `torch.autocast("cpu", torch.bfloat16)`, as Trainer's `bf16=True` runs it."""
    method = METHODS[method_name]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = build_fake(config, method, mode)
    loss_fn = _loss_fn(external_chunk_size(method))
    vocab = config.get_text_config().vocab_size
    with mode:
        input_ids = torch.randint(0, vocab, (batch_size, seq_len))
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with _real_mask_path(), mode, _FakeStepTracker("cpu") as warmup:
        step()  # AdamW creates its state
    warmup.close()
    tracker = _FakeStepTracker("cpu")
    for tensor in held_tensors(model, optimizer, batch.values()):
        tracker.add(tensor, existed_before=True)
    baseline = tracker.current
    with _real_mask_path(), mode, tracker:
        step()
    tracker.close()
    return {"peak_bytes": tracker.peak, "baseline_bytes": baseline}


@contextlib.contextmanager
def _real_mask_path():
    """transformers' mask code, told that fake tensors are not a trace (module docstring)."""
    from transformers import masking_utils

    original = masking_utils.is_tracing
    masking_utils.is_tracing = lambda tensor=None: original(None)
    try:
        yield
    finally:
        masking_utils.is_tracing = original


def compare(model: str, method: str, seq_len: int, autocast: bool = False) -> dict:
    config = model_config(os.path.join(CONFIGS, f"{model}.json"))
    start = time.perf_counter()
    fake = fake_step_peak(config, method, seq_len, autocast=autocast)
    predicted = estimate(config, method, seq_len=seq_len, autocast="bf16" if autocast else None)
    return {
        "model": model,
        "method": method,
        "seq_len": seq_len,
        "autocast": "bf16" if autocast else "none",
        "backbone": "4-bit (emulated)" if METHODS[method].quantization == "4bit" else "bf16",
        "fake_peak_bytes": fake["peak_bytes"],
        "fake_baseline_bytes": fake["baseline_bytes"],
        "predicted_bytes": predicted.total,
        "predicted_gib": predicted.gib(),
        "error": predicted.total / fake["peak_bytes"] - 1,
        "seconds": round(time.perf_counter() - start, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | backbone | autocast | tokens | fake-tensor peak GiB | planner GiB | error |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['method']} | {row['backbone']} | {row['autocast']} | {row['seq_len']:,} | "
            f"{row['fake_peak_bytes'] / GIB:.2f} | {row['predicted_bytes'] / GIB:.2f} | {row['error']:+.1%} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fake_validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="names of benchmarks/configs/*.json")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--seq-lens", default="2048,8192")
    parser.add_argument("--autocast", default="none,bf16", help="none, bf16 or both (the default)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    autocasts = args.autocast.split(",")
    unknown = sorted(set(autocasts) - {"none", "bf16"})
    if unknown:
        parser.error(f"--autocast {args.autocast!r}: {unknown} unknown; use none, bf16 or none,bf16")
    rows = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for seq_len in (int(item) for item in args.seq_lens.split(",")):
                for autocast in autocasts:
                    rows.append(compare(model, method, seq_len, autocast == "bf16"))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump({"torch": torch.__version__, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
