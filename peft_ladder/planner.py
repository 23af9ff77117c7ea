"""Memory planner: peak training memory of a method from a model config alone (no weights), in the paper's terms.

Peak = M1 weights + M2 optimizer state (+ gradients and the optimizer's scratch) + M3 activations saved for backward
+ the loss over the logits (tokens x vocab), as the paper's Figure 3b splits it. The activation terms count the
tensors autograd saves per token in transformers' Llama-family decoder layers (Llama, Qwen2/2.5/3, Mistral: gated MLP,
RMSNorm, rotary, grouped-query attention) with flash / memory-efficient SDPA (no sequence x sequence term), PEFT's
LoRA (adapters in fp32, inputs cast to fp32) and this package's side network; they were checked tensor by tensor
against `peft_ladder.memory.SavedTensorCounter` and the whole prediction against `python -m benchmarks`
(`--validate`; docs/benchmarks.md states the error). The side network's shape comes from the tuner's own rules:
`connections.resolve_plan` for the blocks and taps, `backbone.side_config` for the block width and heads. Not
modelled: allocator rounding and fragmentation (CUDA reserves more than it allocates), CUDA context / cuBLAS
workspaces (about 0.5-1 GiB), kernels' internal scratch.

    python -m peft_ladder.planner --config benchmarks/configs/qwen2.5-7b.json --seq-len 2048

This module imports neither PEFT nor bitsandbytes: a plan needs a config, not the training stack.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Union

from .methods import DEFAULT_METHODS, LORA_R, METHODS, Method, get_method
from .planner_terms import (
    BYTES,
    Shape,
    Side,
    linear_params,
    optimizer_state,
    quantized_bytes,
    saved_activations,
    side_network,
    side_params,
    trainable_tensor_sizes,
    vector_params,
)

GIB = 2**30
# Optimizer names as `TrainingArguments(optim=...)` spells them, and this planner's older `adamw8bit`.
OPTIMIZERS = ("adamw", "adamw_torch", "adamw8bit", "adamw_8bit", "paged_adamw_8bit")
AUTOCASTS = ("none", "bf16")  # "bf16": Trainer/TRL `bf16=True` (torch.autocast around the forward)
CARDS_GB = (8, 12, 24, 48, 80)


@dataclass
class Estimate:
    """Predicted peak training memory in bytes, split as in the paper (M1, M2, M3, logits)."""

    method: str
    batch_size: int
    seq_len: int
    trainable_params: int
    weights: int  # M1: frozen and trainable weights as stored (4/8-bit, bf16, fp32 adapters)
    optimizer: int  # M2: optimizer state
    gradients: int  # of the trainable parameters (and the optimizer step's scratch when it is the peak)
    activations: int  # M3: saved for backward
    logits: int  # the loss over the vocabulary: transformers' loss, or one chunk with the chunked loss

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.gradients + self.activations + self.logits

    def gib(self) -> dict:
        parts = ("weights", "optimizer", "gradients", "activations", "logits", "total")
        return {name: round(getattr(self, name) / GIB, 2) for name in parts}


def estimate(
    config,
    method: str = "ladder",
    batch_size: int = 1,
    seq_len: int = 2048,
    dtype: str = "bfloat16",
    optimizer: str = "adamw",
    reduction_factor: Optional[int] = None,
    loss_chunk_size: Union[int, None, Literal["method"]] = "method",
    ladder_config: Any = None,
    autocast: Optional[str] = None,
) -> Estimate:
    """Predict peak training memory of `method` (a name in `peft_ladder.methods.METHODS`) for `config` (a
    transformers config, a config dict or a config.json path).

    `loss_chunk_size="method"` uses the method's. For Ladder methods, `ladder_config` (a `LadderConfig` or any
    object with its fields) sets the side network (see `side_network`); `reduction_factor`, when given, overrides
    its reduction factor. `optimizer` takes `TrainingArguments.optim` names: `"adamw"` / `"adamw_torch"`,
    `"adamw_8bit"` / `"paged_adamw_8bit"` (bitsandbytes' blockwise 8-bit state; paged state is counted as
    resident). `autocast="bf16"` is Trainer/TRL's `bf16=True` on a bf16 backbone: fp32 adapters and side network
    (fp32 weights, gradients and AdamW state) computed in bf16 under `torch.autocast`."""
    spec = get_method(method)
    autocast = _check_options(optimizer, dtype, autocast)
    shape, b = Shape.from_config(config), BYTES[dtype]
    side = _side(config, spec, ladder_config, reduction_factor)
    chunk = spec.loss_chunk_size if loss_chunk_size == "method" else loss_chunk_size
    tokens, d, V, L = batch_size * seq_len, shape.hidden, shape.vocab, shape.layers
    linear = L * linear_params(shape)
    rows = L * sum(o for _, o in shape.linear_shapes())
    other = V * d * (1 if shape.tied else 2) + (2 * L + 1) * d
    weights = quantized_bytes(linear, rows, spec.quantization, b) + other * b

    if spec.kind == "full":
        trainable, param_bytes = linear + other, b
    elif spec.kind == "lora":
        trainable, param_bytes = L * sum(LORA_R * (i + o) for i, o in shape.linear_shapes()), 4
    else:
        trainable, frozen_down = side_params(shape, side, spec)
        param_bytes = b if spec.side_in_backbone_dtype else 4
        weights += frozen_down * param_bytes
    if spec.kind != "full":
        weights += trainable * param_bytes
    sizes = trainable_tensor_sizes(shape, spec, side)
    assert sum(sizes) == trainable  # the two counts describe one model
    state = optimizer_state(optimizer, sizes, param_bytes)
    grads = trainable * param_bytes

    activations, recompute = saved_activations(shape, spec, tokens, b, side, autocast)
    if autocast and param_bytes == 4:
        # torch.autocast caches a bf16 copy of every fp32 weight that requires grad until the forward ends, and
        # backward keeps the copies it needs: one bf16 copy of the trainable parameters (the norms' are not cast).
        activations += 2 * (trainable - vector_params(shape, spec, side))
    if chunk is None:
        logits = tokens * V * 12  # bf16 logits, their fp32 copy, the log-softmax output and its gradient
    else:
        logits = min(chunk, tokens) * V * 6 + 2 * tokens * d * b  # one chunk (bf16 + fp32) + hidden-state gradients
    logits = max(logits, recompute)  # with checkpointing, the backward's recompute can peak above the loss
    if spec.kind == "ladder":
        # The frozen backbone keeps nothing, but each layer's MLP holds three (tokens, intermediate) tensors at once
        # during the forward (act(gate), up and their product): at long context, with the side blocks checkpointed,
        # that working set peaks above the loss (measured on `small` at 8k tokens: 63 of 132 MiB).
        # LadderConfig.mlp_chunk_size runs the MLP over chunks of the sequence: (batch x chunk) tokens at once.
        mlp_tokens = tokens if side.mlp_chunk_size is None else batch_size * min(seq_len, side.mlp_chunk_size)
        logits = max(logits, 3 * mlp_tokens * shape.intermediate * b)
    if spec.kind == "full":
        # The gradients do not exist yet when the loss peaks (zero_grad(set_to_none=True)), except the head's; the
        # optimizer step holds all of them plus AdamW's scratch (one copy of the state).
        head_grad = V * d * b
        step_peak = grads + trainable * param_bytes
        if step_peak > activations + logits + head_grad:
            activations, logits, grads = 0, 0, step_peak
        else:
            grads = head_grad
    return Estimate(
        method=method,
        batch_size=batch_size,
        seq_len=seq_len,
        trainable_params=int(trainable),
        weights=int(weights),
        optimizer=int(state),
        gradients=int(grads),
        activations=int(activations),
        logits=int(logits),
    )


def saved_activation_bytes(
    config,
    method: str,
    batch_size: int = 1,
    seq_len: int = 2048,
    dtype: str = "bfloat16",
    reduction_factor: Optional[int] = None,
    ladder_config: Any = None,
    autocast: Optional[str] = None,
) -> int:
    """M3 alone: what autograd keeps for backward (the loss's log-softmax output excluded), wherever the peak falls.
    Activations only: autocast's bf16 weight copies, which `estimate` adds to its activation term, are not in it."""
    spec = get_method(method)
    autocast = _check_options("adamw", dtype, autocast)
    side = _side(config, spec, ladder_config, reduction_factor)
    shape = Shape.from_config(config)
    return saved_activations(shape, spec, batch_size * seq_len, BYTES[dtype], side, autocast)[0]


def _check_options(optimizer: str, dtype: str, autocast: Optional[str]) -> bool:
    """Validate the precision options; True when bf16 autocast is on."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; choose one of {OPTIMIZERS}.")
    if dtype not in BYTES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of {sorted(BYTES)}.")
    if autocast not in (None, *AUTOCASTS):
        raise ValueError(f"autocast={autocast!r} is unknown; choose None, 'none' or 'bf16'.")
    if autocast == "bf16" and dtype != "bfloat16":
        raise ValueError(
            f"autocast='bf16' with dtype={dtype!r} is not modelled; autocast='bf16' models a bf16 backbone "
            "(dtype='bfloat16') with fp32 adapters, as Trainer's bf16=True runs QLoRA and Ladder."
        )
    return autocast == "bf16"


def _side(config, spec: Method, ladder_config: Any, reduction_factor: Optional[int]) -> Optional[Side]:
    if spec.kind != "ladder":
        return None
    return side_network(config, spec, ladder_config, reduction_factor=reduction_factor)


def fits(config, cards_gb=CARDS_GB, methods=DEFAULT_METHODS, **kwargs) -> dict[str, dict[int, bool]]:
    """{method: {card GB: fits}} for each method (see `fits_card`)."""
    return {method: {gb: fits_card(estimate(config, method, **kwargs), gb) for gb in cards_gb} for method in methods}


def fits_card(estimate_: Estimate, gb: int) -> bool:
    """Whether the estimate fits a `gb` GB card (GiB, as GPUs count), keeping 10% for the CUDA context,
    cuBLAS workspaces and fragmentation."""
    return estimate_.total <= 0.9 * gb * GIB


TERMS = ("weights", "optimizer", "gradients", "activations", "logits")


@dataclass
class LongestContext:
    """The longest sequence (batch 1) whose predicted peak fits a card, and the estimate at that length."""

    method: str
    gb: float
    seq_len: int  # 0: not even one token fits (the weights and optimizer state alone are too large)
    estimate: Estimate

    @property
    def dominant(self) -> str:
        """The largest term of the peak at that length (one of `TERMS`)."""
        return max(TERMS, key=lambda term: getattr(self.estimate, term))

    @property
    def limiting(self) -> str:
        """The larger of the two terms that grow with the length ("activations" or "logits"): what to shrink to go
        longer on the same card."""
        return max(("activations", "logits"), key=lambda term: getattr(self.estimate, term))


def longest_context(config, gb: float, method: str = "ladder-4bit", max_seq_len: int = 2**20, **kwargs: Any):
    """The longest sequence length (batch 1) at which `method` fits a `gb` GB card (see `fits_card`), found by
    binary search up to `max_seq_len` tokens; `kwargs` go to `estimate` (optimizer, autocast, ladder_config, ...).

    Example:

    ```py
    >>> from peft_ladder.planner import longest_context
    >>> llama_8b = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    ...             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    ...             "vocab_size": 128256}
    >>> answer = longest_context(llama_8b, 12, "qlora-gc-chunk", optimizer="adamw_8bit", autocast="bf16")
    >>> answer.seq_len > 8192, answer.dominant
    (True, 'weights')

    ```
    """
    for name in ("seq_len", "batch_size"):
        if name in kwargs:
            raise ValueError(f"longest_context searches the sequence length at batch 1; do not pass {name}=.")
    if gb <= 0 or max_seq_len < 1:
        raise ValueError(f"gb={gb!r} and max_seq_len={max_seq_len!r} must be positive.")

    def at(tokens: int) -> Estimate:
        return estimate(config, method, batch_size=1, seq_len=tokens, **kwargs)

    low, high = 0, max_seq_len  # invariant: `low` fits (0 trivially), everything above `high` does not
    while low < high:
        middle = (low + high + 1) // 2
        if fits_card(at(middle), gb):
            low = middle
        else:
            high = middle - 1
    return LongestContext(method=method, gb=gb, seq_len=low, estimate=at(max(low, 1)))


def longest_context_markdown(config, gb: float, methods=DEFAULT_METHODS, **kwargs) -> str:
    lines = [
        f"| method | longest context on {gb:g} GB (batch 1) | total GiB there | largest term (GiB) | "
        "growing term (GiB) |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for method in methods:
        answer = longest_context(config, gb, method, **kwargs)
        g = answer.estimate.gib()
        length = f"{answer.seq_len:,}" if answer.seq_len else "none (weights + optimizer do not fit)"
        lines.append(
            f"| {method} | {length} | {g['total']} | {answer.dominant} ({g[answer.dominant]}) | "
            f"{answer.limiting} ({g[answer.limiting]}) |"
        )
    return "\n".join(lines)


def markdown(config, methods=DEFAULT_METHODS, cards_gb=CARDS_GB, **kwargs) -> str:
    head = (
        "| method | trainable | M1 weights | M2 optimizer | grads | M3 activations | logits | total GiB | "
        + " | ".join(f"{gb} GB" for gb in cards_gb)
        + " |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for method in methods:
        e = estimate(config, method, **kwargs)
        g = e.gib()
        ok = ["yes" if fits_card(e, gb) else "no" for gb in cards_gb]
        lines.append(
            f"| {method} | {e.trainable_params / 1e6:.1f}M | {g['weights']} | {g['optimizer']} | "
            f"{g['gradients']} | {g['activations']} | {g['logits']} | **{g['total']}** | " + " | ".join(ok) + " |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peft_ladder.planner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="a config.json (a model directory's, or benchmarks/configs/)")
    parser.add_argument(
        "--method", default=None, help=f"one of {sorted(METHODS)}; default: {', '.join(DEFAULT_METHODS)}"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 1)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 2048)")
    parser.add_argument(
        "--gpu-gb",
        type=float,
        default=None,
        help="instead of a table at one length: the longest context (batch 1) each method fits on this card",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    parser.add_argument(
        "--optimizer", default="adamw", choices=OPTIMIZERS, help="TrainingArguments.optim (default adamw)"
    )
    parser.add_argument(
        "--autocast",
        default="none",
        choices=AUTOCASTS,
        help="bf16: Trainer/TRL bf16=True (fp32 adapters computed in bf16); default none",
    )
    parser.add_argument("--reduction-factor", type=int, default=8, help="Ladder's r (LadderConfig.reduction_factor)")
    parser.add_argument(
        "--side-layers", type=int, default=None, help="LadderConfig.side_layers (default: one per backbone layer)"
    )
    parser.add_argument("--xladder-depth", type=int, default=None, help="LadderConfig.xladder_depth (xladder methods)")
    parser.add_argument("--gate", default="sum", help="LadderConfig.gate: sum, learned or a float weight")
    parser.add_argument(
        "--down-rank", type=int, default=None, help="LadderConfig.down_rank: low-rank down-projections (e.g. 16)"
    )
    parser.add_argument(
        "--mlp-chunk-size",
        type=int,
        default=None,
        help="LadderConfig.mlp_chunk_size: the frozen backbone's MLPs run over chunks of this many tokens",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config is required (a config.json or a model directory)")
    config = os.path.join(args.config, "config.json") if os.path.isdir(args.config) else args.config
    if args.gpu_gb is not None and (args.seq_len, args.batch_size) != (None, None):
        parser.error("--gpu-gb searches the longest sequence at batch 1; drop --seq-len and --batch-size")
    methods = [args.method] if args.method else list(DEFAULT_METHODS)
    gate = args.gate if args.gate in ("sum", "learned") else float(args.gate)
    kwargs = dict(
        dtype=args.dtype, optimizer=args.optimizer, reduction_factor=args.reduction_factor, autocast=args.autocast
    )
    chosen = dict(
        side_layers=args.side_layers,
        xladder_depth=args.xladder_depth,
        gate=None if gate == "sum" else gate,
        down_rank=args.down_rank,
        mlp_chunk_size=args.mlp_chunk_size,
    )
    if any(value is not None for value in chosen.values()):
        # Only the options given: a method's own LadderConfig fields (ladder-4bit-lowrank's down_rank) stay.
        kwargs["ladder_config"] = argparse.Namespace(
            **{name: value for name, value in chosen.items() if value is not None}
        )
    if args.gpu_gb is not None:
        if args.json:
            answers = [longest_context(config, args.gpu_gb, method, **kwargs) for method in methods]
            rows = [
                {**asdict(a), "dominant": a.dominant, "limiting": a.limiting, "gib": a.estimate.gib()} for a in answers
            ]
            print(json.dumps(rows, indent=1))
        else:
            print(longest_context_markdown(config, args.gpu_gb, methods, **kwargs))
        return 0
    kwargs.update(batch_size=args.batch_size or 1, seq_len=args.seq_len or 2048)
    if args.json:
        estimates = [estimate(config, method, **kwargs) for method in methods]
        print(json.dumps([{**asdict(e), "gib": e.gib()} for e in estimates], indent=1))
    else:
        print(markdown(config, methods, **kwargs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
