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
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, Optional, Union

from .backbone import side_config
from .connections import ConnectionPlan, resolve_plan
from .methods import DEFAULT_METHODS, LORA_R, METHODS, Method, get_method

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer names as `TrainingArguments(optim=...)` spells them, and this planner's older `adamw8bit`.
OPTIMIZERS = ("adamw", "adamw_torch", "adamw8bit", "adamw_8bit", "paged_adamw_8bit")
AUTOCASTS = ("none", "bf16")  # "bf16": Trainer/TRL `bf16=True` (torch.autocast around the forward)
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 state for tensors with fewer values (its `min_8bit_size`)
BNB_BLOCK = 256  # values per fp32 absmax in bitsandbytes' blockwise 8-bit optimizer state
CARDS_GB = (8, 12, 24, 48, 80)
# The LadderConfig fields the side network's size depends on, and LadderConfig's defaults for them.
SIDE_FIELDS = {
    "reduction_factor": 8,
    "side_layers": None,
    "connections": "ladder",
    "xladder_depth": None,
    "gate": "sum",
}


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder config the memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, config) -> "Shape":
        if isinstance(config, str):
            with open(config) as handle:
                config = json.load(handle)
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        if get("text_config") is not None:
            return cls.from_config(get("text_config"))
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            hidden=hidden,
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            intermediate=int(get("intermediate_size")),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", False)),
            qkv_bias=bool(get("attention_bias", False)) or get("model_type") == "qwen2",
        )

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer."""
        d, i = self.hidden, self.intermediate
        return [(d, self.q), (d, self.kv), (d, self.kv), (self.q, d), (d, i), (d, i), (i, d)]


@dataclass(frozen=True)
class Side:
    """A Ladder side network as the tuner builds it: the plan (blocks, taps) and the blocks' shape."""

    plan: ConnectionPlan
    shape: Shape  # one side block; `layers` is the number of blocks
    gate: Union[str, float]

    @property
    def taps(self) -> int:
        return len(self.plan.tap_indices)


def _transformers_config(config):
    """A transformers config object from a config, a config dict or a config.json path (no weights)."""
    if isinstance(config, str):
        with open(config) as handle:
            config = json.load(handle)
    if isinstance(config, dict):
        from transformers import AutoConfig

        fields = dict(config)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def side_network(config, method: Method, ladder_config: Any = None, **fields: Any) -> Side:
    """The side network `method` trains on `config`: `resolve_plan` and `side_config`, as `LadderModel` calls them.

    Starts from the method's connections and LadderConfig's defaults; `ladder_config` (a `LadderConfig`, or any
    object with some of its fields) and then keyword `fields` that are not None override reduction_factor,
    side_layers, connections, xladder_depth and gate."""
    unknown = sorted(set(fields) - set(SIDE_FIELDS))
    if unknown:
        raise ValueError(f"{unknown} are not side-network fields; the planner reads {sorted(SIDE_FIELDS)}.")
    chosen = {**SIDE_FIELDS, "connections": method.connections}
    chosen.update((name, value) for name, value in method.ladder_options if name in SIDE_FIELDS)
    if ladder_config is not None:
        chosen.update({name: getattr(ladder_config, name, chosen[name]) for name in SIDE_FIELDS})
    chosen.update((name, value) for name, value in fields.items() if value is not None)
    text_config = _transformers_config(config)
    layers = int(text_config.num_hidden_layers)
    plan = resolve_plan(chosen["connections"], layers, chosen["side_layers"], chosen["xladder_depth"])
    blocks = side_config(text_config, layers, plan.side_blocks, chosen["reduction_factor"])
    return Side(plan=plan, shape=replace(Shape.from_config(blocks), layers=plan.side_blocks), gate=chosen["gate"])


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


def _linear_params(shape: Shape) -> int:
    return sum(i * o for i, o in shape.linear_shapes()) + (shape.q + 2 * shape.kv if shape.qkv_bias else 0)


def _quantized_bytes(params: int, rows: int, kind: Optional[str], dtype_bytes: int) -> float:
    if kind == "4bit":  # nf4 + double quantization: uint8 absmax per 64 values, fp32 per 256 blocks
        return params * (0.5 + 1 / 64 + 4 / (64 * 256))
    if kind == "8bit":  # int8 + one fp32 scale per output row
        return params + 4 * rows
    return params * dtype_bytes


def _side_params(shape: Shape, side: Side, method: Method) -> tuple[int, int]:
    """(trainable side parameters, frozen down-projection parameters), counted as `LadderSideNetwork` builds them."""
    d, ds = shape.hidden, side.shape.hidden
    down = side.taps * (d * ds + ds)
    block = _linear_params(side.shape) + 2 * ds
    gates = len(side.plan.block_to_layer) if side.gate == "learned" else 0
    trainable = side.shape.layers * block + ds + ds * d + gates + (0 if method.freeze_down else down)
    return trainable, down if method.freeze_down else 0


def _lora_layer_saved(shape: Shape, b: int, autocast: bool = False) -> int:
    """Bytes per token one LoRA'd decoder layer saves (backbone in `b`-byte floats, adapters in fp32)."""
    d, q, kv, i = shape.hidden, shape.q, shape.kv, shape.intermediate
    # PEFT casts each adapted layer's input to the adapter dtype (fp32); under autocast lora_A casts that copy back
    # to bf16 and keeps the bf16 copy instead.
    a = 2 if autocast else 4
    fp32_inputs = a * (3 * d + q + 2 * d + i)
    lora_mid = a * 7 * LORA_R
    norms = 2 * 4 * d + 8  # RMSNorm keeps its fp32 input (and rsqrt)
    mlp = 3 * b * i  # gate, up, act(gate)
    attention = b * (2 * q + 2 * kv) + 4 * shape.heads  # q, k, v, output, logsumexp
    return fp32_inputs + lora_mid + norms + mlp + attention


def _full_layer_saved(shape: Shape, b: int) -> int:
    """Bytes per token one fully trained decoder layer saves (weights and activations in `b`-byte floats)."""
    d, q, kv, i = shape.hidden, shape.q, shape.kv, shape.intermediate
    norms = 2 * (4 * d + b * d + 4)  # fp32 input, normalized output (for the weight's gradient), rsqrt
    linear_inputs = b * (d + q + d + i)  # qkv input, o input, gate/up input, down input
    mlp = 3 * b * i
    attention = b * (2 * q + 2 * kv) + 4 * shape.heads
    return norms + linear_inputs + mlp + attention


def _side_block_saved(side: Shape, s: int) -> int:
    """Bytes per token one side block saves (side network in `s`-byte floats, everything trainable)."""
    ds, i = side.hidden, side.intermediate
    o_input = side.q if side.heads > 1 else 0  # a copy only when heads are interleaved
    return s * (7 * ds + 4 * i + 2 * side.q + 2 * side.kv + o_input) + 4 * side.heads + 12


def _side_block_saved_autocast(side: Shape) -> int:
    """Bytes per token one fp32 side block saves under bf16 autocast: every linear saves its own bf16 copy of its
    input (q, k and v three copies of one normed input), the norms keep their fp32 input and a bf16 normed copy."""
    ds, i = side.hidden, side.intermediate
    o_input = side.q if side.heads > 1 else 0
    linear_inputs = 2 * (5 * ds + i)  # q, k, v, gate, up copies of the normed input; down's input
    mlp = 2 * 3 * i  # gate, up, act(gate)
    attention = 2 * (2 * side.q + 2 * side.kv + o_input) + 4 * side.heads  # q, k, v, output, logsumexp
    norms = 2 * (4 * ds + 2 * ds + 4)  # fp32 input, bf16 normed copy (for the weight's gradient), rsqrt
    return linear_inputs + mlp + attention + norms


def _saved_activations(
    shape: Shape, spec: Method, tokens: int, b: int, side: Optional[Side], autocast: bool = False
) -> tuple[int, int]:
    """(M3: bytes saved for backward at the end of the forward pass, the logits' log-softmax excluded;
    the extra bytes a checkpointed layer rebuilds during backward)."""
    d, L = shape.hidden, shape.layers
    recompute = 0  # gradient checkpointing: one layer's activations rebuilt during backward, plus gradients in flight
    if spec.kind == "full":
        per_token = L * _full_layer_saved(shape, b)
    elif spec.kind == "lora":
        layer = _lora_layer_saved(shape, b, autocast)
        per_token = L * b * d if spec.gradient_checkpointing else L * layer  # checkpoints: each layer's input
        recompute = tokens * (layer + 2 * b * d) if spec.gradient_checkpointing else 0
    elif autocast and not spec.side_in_backbone_dtype:
        # fp32 side network under bf16 autocast: each tap's fp32 copy is cast back to a bf16 copy, which is kept
        tap_bytes = 0 if spec.freeze_down else 2 * d
        mixes = len(side.plan.block_to_layer) if side.gate == "learned" else 0
        ds = side.shape.hidden
        per_token = (
            side.taps * tap_bytes
            + side.shape.layers * _side_block_saved_autocast(side.shape)
            + mixes * 2 * 2 * ds
            + 8 * ds  # the side's final norm (fp32 input, bf16 normed copy) and the up-projection's bf16 input
        )
    else:
        s = b if spec.side_in_backbone_dtype else 4
        tap_bytes = 0 if spec.freeze_down else (b * d if s == b else 4 * d)  # the tap, or its fp32 copy
        mixes = len(side.plan.block_to_layer) if side.gate == "learned" else 0  # mu * side, (1 - mu) * tap
        per_token = (
            side.taps * tap_bytes
            + side.shape.layers * _side_block_saved(side.shape, s)
            + mixes * 2 * s * side.shape.hidden
            + 2 * 4 * d
        )
    return tokens * (per_token + 4 * d), recompute  # + the final norm's fp32 input


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
    linear = L * _linear_params(shape)
    rows = L * sum(o for _, o in shape.linear_shapes())
    other = V * d * (1 if shape.tied else 2) + (2 * L + 1) * d
    weights = _quantized_bytes(linear, rows, spec.quantization, b) + other * b

    if spec.kind == "full":
        trainable, param_bytes = linear + other, b
    elif spec.kind == "lora":
        trainable, param_bytes = L * sum(LORA_R * (i + o) for i, o in shape.linear_shapes()), 4
    else:
        trainable, frozen_down = _side_params(shape, side, spec)
        param_bytes = b if spec.side_in_backbone_dtype else 4
        weights += frozen_down * param_bytes
    if spec.kind != "full":
        weights += trainable * param_bytes
    state = _optimizer_state(optimizer, trainable, _vector_params(shape, spec, side), param_bytes)
    grads = trainable * param_bytes

    activations, recompute = _saved_activations(shape, spec, tokens, b, side, autocast)
    if autocast and param_bytes == 4:
        # torch.autocast caches a bf16 copy of every fp32 weight that requires grad until the forward ends, and
        # backward keeps the copies it needs: one bf16 copy of the trainable parameters (the norms' are not cast).
        activations += 2 * (trainable - _vector_params(shape, spec, side))
    if chunk is None:
        logits = tokens * V * 12  # bf16 logits, their fp32 copy, the log-softmax output and its gradient
    else:
        logits = min(chunk, tokens) * V * 6 + 2 * tokens * d * b  # one chunk (bf16 + fp32) + hidden-state gradients
    logits = max(logits, recompute)  # with checkpointing, the backward's recompute can peak above the loss
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
    return _saved_activations(shape, spec, batch_size * seq_len, BYTES[dtype], side, autocast)[0]


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


def _optimizer_state(optimizer: str, trainable: int, vectors: int, param_bytes: int) -> float:
    """M2: AdamW's two states in the parameters' dtype, or bitsandbytes' 8-bit AdamW: one byte per state and value
    plus an fp32 absmax per 256 values, and fp32 states for tensors under 4,096 values (norms, biases, gates)."""
    if optimizer in ("adamw", "adamw_torch"):
        return 2 * trainable * param_bytes
    large = trainable - vectors
    return 2 * (large * (1 + 4 / BNB_BLOCK) + vectors * 4)


def _vector_params(shape: Shape, spec: Method, side: Optional[Side]) -> int:
    """Trainable parameters in 1-D tensors (norm weights, biases, gates): never cast by autocast, and under 4,096
    values each, so 8-bit AdamW keeps fp32 state for them."""
    if spec.kind == "full":
        biases = shape.layers * (shape.q + 2 * shape.kv) if shape.qkv_bias else 0
        return (2 * shape.layers + 1) * shape.hidden + biases
    if spec.kind == "lora":
        return 0
    block = side.shape
    biases = block.q + 2 * block.kv if block.qkv_bias else 0
    gates = len(side.plan.block_to_layer) if side.gate == "learned" else 0
    down_biases = 0 if spec.freeze_down else side.taps * block.hidden
    return block.layers * (2 * block.hidden + biases) + block.hidden + down_biases + gates


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
    if (args.side_layers, args.xladder_depth, gate) != (None, None, "sum"):
        kwargs["ladder_config"] = argparse.Namespace(
            side_layers=args.side_layers, xladder_depth=args.xladder_depth, gate=gate
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
