"""The planner's terms: a model's shapes, the side network the tuner would build on it, and the bytes each part of a
training step holds (weights, optimizer state, activations saved for backward). `planner.py` adds them up.

The activation terms count the tensors autograd saves per token in transformers' Llama-family decoder layers, PEFT's
LoRA and this package's side network (checked tensor by tensor in tests/test_planner.py). No PEFT or bitsandbytes
import: a plan needs a config, not the training stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Optional, Union

from .backbone import side_config
from .connections import ConnectionPlan, resolve_plan
from .methods import LORA_R, Method

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 state for tensors with fewer values (its `min_8bit_size`)
BNB_BLOCK = 256  # values per fp32 absmax in bitsandbytes' blockwise 8-bit optimizer state
# The LadderConfig fields the side network's size depends on, and LadderConfig's defaults for them.
SIDE_FIELDS = {
    "reduction_factor": 8,
    "side_layers": None,
    "connections": "ladder",
    "xladder_depth": None,
    "gate": "sum",
    "down_rank": None,
}
# The LadderConfig fields that decide what training keeps of the taps and side blocks, and their defaults.
MEMORY_FIELDS = {"side_checkpointing": None, "saved_taps": "native", "mlp_chunk_size": None}
# Bytes per tap value a trainable down-projection keeps, by LadderConfig.saved_taps (None: the backbone's dtype), and
# per token: int8 adds an fp32 scale; "cpu" keeps nothing on the device.
TAP_VALUE_BYTES = {"native": None, "int8": 1, "cpu": 0}
TAP_TOKEN_BYTES = {"native": 0, "int8": 4, "cpu": 0}


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
    side_checkpointing: Optional[bool] = None
    saved_taps: str = "native"
    down_rank: Optional[int] = None  # LadderConfig.down_rank: low-rank down-projections d -> k -> d_s
    mlp_chunk_size: Optional[int] = None  # LadderConfig.mlp_chunk_size: the backbone's MLPs run over token chunks

    @property
    def taps(self) -> int:
        return len(self.plan.tap_indices)

    @property
    def checkpointed(self) -> bool:
        """Whether training recomputes the side blocks (`LadderSideNetwork.checkpoints_blocks`)."""
        return self.shape.layers > 1 if self.side_checkpointing is None else self.side_checkpointing

    def tap_bytes(self, d: int, b: int) -> int:
        """Bytes per token one trainable down-projection keeps of its (d,) tap on a `b`-byte-float backbone."""
        value = TAP_VALUE_BYTES[self.saved_taps]
        return (b if value is None else value) * d + TAP_TOKEN_BYTES[self.saved_taps]

    def down_mid_bytes(self, s: int) -> int:
        """Bytes per token and tap a low-rank down-projection saves besides the tap: its (k,) middle, in `s`-byte
        floats, for the second Linear's weight gradient."""
        return 0 if self.down_rank is None else s * self.down_rank


def transformers_config(config):
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
    side_layers, connections, xladder_depth, gate, down_rank, side_checkpointing, saved_taps and mlp_chunk_size."""
    known = {**SIDE_FIELDS, **MEMORY_FIELDS}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{unknown} are not side-network fields; the planner reads {sorted(known)}.")
    chosen = {**known, "connections": method.connections}
    chosen.update((name, value) for name, value in method.ladder_options if name in known)
    if ladder_config is not None:
        chosen.update({name: getattr(ladder_config, name, chosen[name]) for name in known})
    chosen.update((name, value) for name, value in fields.items() if value is not None)
    text_config = transformers_config(config)
    layers = int(text_config.num_hidden_layers)
    plan = resolve_plan(chosen["connections"], layers, chosen["side_layers"], chosen["xladder_depth"])
    blocks = side_config(text_config, layers, plan.side_blocks, chosen["reduction_factor"])
    return Side(
        plan=plan,
        shape=replace(Shape.from_config(blocks), layers=plan.side_blocks),
        gate=chosen["gate"],
        side_checkpointing=chosen["side_checkpointing"],
        saved_taps=chosen["saved_taps"],
        down_rank=chosen["down_rank"],
        mlp_chunk_size=chosen["mlp_chunk_size"],
    )


def linear_params(shape: Shape) -> int:
    return sum(i * o for i, o in shape.linear_shapes()) + (shape.q + 2 * shape.kv if shape.qkv_bias else 0)


def quantized_bytes(params: int, rows: int, kind: Optional[str], dtype_bytes: int) -> float:
    if kind == "4bit":  # nf4 + double quantization: uint8 absmax per 64 values, fp32 per 256 blocks
        return params * (0.5 + 1 / 64 + 4 / (64 * 256))
    if kind == "8bit":  # int8 + one fp32 scale per output row
        return params + 4 * rows
    return params * dtype_bytes


def side_params(shape: Shape, side: Side, method: Method) -> tuple[int, int]:
    """(trainable side parameters, frozen down-projection parameters), counted as `LadderSideNetwork` builds them."""
    d, ds = shape.hidden, side.shape.hidden
    k = side.down_rank
    down = side.taps * ((d * ds if k is None else k * (d + ds)) + ds)  # Linear(d, d_s) or d -> k (no bias) -> d_s
    block = linear_params(side.shape) + 2 * ds
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


def saved_activations(
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
        # While the recomputed layer runs backward, the gradient of the MLP down-projection's input is in flight in
        # fp32 (PEFT casts each adapted input to fp32) and, under autocast, also as a bf16 copy.
        in_flight = 2 * b * d + (4 + (2 if autocast else 0)) * shape.intermediate
        recompute = tokens * (layer + in_flight) if spec.gradient_checkpointing else 0
    else:
        per_token, recompute = _side_saved(side, spec, tokens, d, b, autocast)
    return tokens * (per_token + 4 * d), recompute  # + the final norm's fp32 input


def _side_saved(side: Side, spec: Method, tokens: int, d: int, b: int, autocast: bool) -> tuple[int, int]:
    """(bytes per token a Ladder step keeps for backward, bytes the side blocks' recompute adds during backward).

    Taps: each trainable down-projection keeps its tap as `saved_taps` says (taps.py), never an fp32 copy. Side
    blocks: all their activations, or with checkpointing each block's input, and one block rebuilt in backward."""
    fp32_under_autocast = autocast and not spec.side_in_backbone_dtype
    s = b if spec.side_in_backbone_dtype else 4  # the side network's dtype
    stream = 2 if fp32_under_autocast else s  # the side stream between blocks: bf16 under autocast
    block = _side_block_saved_autocast(side.shape) if fp32_under_autocast else _side_block_saved(side.shape, s)
    ds = side.shape.hidden
    recompute = 0
    if side.checkpointed:
        blocks = side.shape.layers * stream * ds
        recompute = tokens * (block + 2 * stream * ds)  # one block's activations, plus gradients in flight
    else:
        blocks = side.shape.layers * block
    # a low-rank down-projection also keeps its (k,) middle for the second Linear's weight gradient
    taps = 0 if spec.freeze_down else side.taps * (side.tap_bytes(d, b) + side.down_mid_bytes(stream))
    mixes = len(side.plan.block_to_layer) if side.gate == "learned" else 0  # mu * side, (1 - mu) * tap
    # The side's final norm (its input and output) and the up-projection's input; the output scale's rms(h_L) and
    # the norm's inverse RMS, 4 bytes each. Under autocast: the norm's fp32 input and a bf16 normed copy.
    head = 8 * ds if fp32_under_autocast else 3 * s * ds + 8
    return taps + blocks + mixes * 2 * stream * ds + head, recompute


def optimizer_state(optimizer: str, sizes: list[int], param_bytes: int) -> float:
    """M2 for trainable tensors of `sizes` values each: AdamW's two states in the parameters' dtype, or bitsandbytes'
    8-bit AdamW: per tensor of at least 4,096 values one byte per state and value plus an fp32 absmax per 256
    values; fp32 states for smaller tensors (norms, biases, gates, and small matrices; its `min_8bit_size`)."""
    if optimizer in ("adamw", "adamw_torch"):
        return 2 * sum(sizes) * param_bytes
    return sum(2 * (n + 4 * -(-n // BNB_BLOCK)) if n >= BNB_MIN_8BIT_SIZE else 2 * 4 * n for n in sizes)


def trainable_tensor_sizes(shape: Shape, spec: Method, side: Optional[Side]) -> list[int]:
    """The number of values of each trainable tensor, as the model holds them (what 8-bit AdamW decides on)."""
    if spec.kind == "full":
        biases = [shape.q, shape.kv, shape.kv] if shape.qkv_bias else []
        layer = [i * o for i, o in shape.linear_shapes()] + biases + [shape.hidden] * 2
        head = [] if shape.tied else [shape.vocab * shape.hidden]
        return layer * shape.layers + [shape.vocab * shape.hidden, *head, shape.hidden]
    if spec.kind == "lora":
        return [LORA_R * n for i, o in shape.linear_shapes() for n in (i, o)] * shape.layers
    d, block, k = shape.hidden, side.shape, side.down_rank
    biases = [block.q, block.kv, block.kv] if block.qkv_bias else []
    blocks = ([i * o for i, o in block.linear_shapes()] + biases + [block.hidden] * 2) * block.layers
    down = [d * block.hidden] if k is None else [k * d, block.hidden * k]
    downs = [] if spec.freeze_down else (down + [block.hidden]) * side.taps
    gates = [len(side.plan.block_to_layer)] if side.gate == "learned" else []
    return blocks + downs + [block.hidden, block.hidden * d] + gates


def vector_params(shape: Shape, spec: Method, side: Optional[Side]) -> int:
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
