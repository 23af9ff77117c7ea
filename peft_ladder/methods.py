"""The training methods the benchmark compares and the planner predicts: pure data, no torch.

`python -m benchmarks` builds each one (`benchmarks/models.py`); `python -m peft_ladder.planner` predicts its peak
memory from a config alone. Both read this one table, so a method means the same thing in a measurement and in a
prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

LORA_R, LORA_ALPHA = 16, 32  # the paper's QLoRA baseline: all linear layers
DEFAULT_CHUNK = 256


@dataclass(frozen=True)
class Method:
    name: str
    kind: Literal["full", "lora", "ladder"]
    help: str
    quantization: Optional[Literal["4bit", "8bit"]] = None
    gradient_checkpointing: bool = False
    connections: str = "ladder"
    loss_chunk_size: Optional[int] = None  # tokens per loss chunk (peft_ladder.loss), None: transformers' loss
    ladder_options: tuple = ()  # extra LadderConfig fields, as (name, value) pairs
    # Levers on the taps the down-projections keep for their weight gradients (docs/benchmarks.md, "Shrinking the
    # taps"); benchmark-only, LadderConfig has no such fields:
    side_in_backbone_dtype: bool = False  # side network in bf16 like the backbone (PEFT's default upcasts to fp32)
    freeze_down: bool = False  # down-projections frozen at their random init: no tap is kept for backward


def _m(name, kind, help, **kw) -> Method:
    return Method(name=name, kind=kind, help=help, **kw)


METHODS = {
    m.name: m
    for m in [
        _m("full", "full", "full fine-tuning: every weight trained"),
        _m("lora", "lora", f"LoRA r={LORA_R} alpha={LORA_ALPHA}, all linear layers"),
        _m("qlora", "lora", "QLoRA: LoRA on a 4-bit nf4 backbone (double quantization)", quantization="4bit"),
        _m("qlora-gc", "lora", "QLoRA + gradient checkpointing", quantization="4bit", gradient_checkpointing=True),
        _m(
            "qlora-gc-chunk",
            "lora",
            "QLoRA + gradient checkpointing + chunked loss",
            quantization="4bit",
            gradient_checkpointing=True,
            loss_chunk_size=DEFAULT_CHUNK,
        ),
        _m("ladder", "ladder", "Ladder (LadderConfig defaults: chunked loss)", loss_chunk_size=DEFAULT_CHUNK),
        _m("ladder-nochunk", "ladder", "Ladder with transformers' loss (full logits)"),
        _m(
            "xladder", "ladder", "xLadder (LadderConfig defaults)", connections="xladder", loss_chunk_size=DEFAULT_CHUNK
        ),
        _m(
            "ladder-4bit",
            "ladder",
            "Ladder on a 4-bit nf4 backbone (QST)",
            quantization="4bit",
            loss_chunk_size=DEFAULT_CHUNK,
        ),
        _m("ladder-4bit-nochunk", "ladder", "Ladder on a 4-bit backbone, transformers' loss", quantization="4bit"),
        _m(
            "xladder-4bit",
            "ladder",
            "xLadder on a 4-bit nf4 backbone",
            quantization="4bit",
            connections="xladder",
            loss_chunk_size=DEFAULT_CHUNK,
        ),
        _m(
            "ladder-4bit-bf16side",
            "ladder",
            "Ladder-4bit, side network in the backbone dtype (bf16 taps, no fp32 copies)",
            quantization="4bit",
            loss_chunk_size=DEFAULT_CHUNK,
            side_in_backbone_dtype=True,
        ),
        _m(
            "ladder-4bit-nockpt",
            "ladder",
            "Ladder-4bit without side-block checkpointing (side_checkpointing=False)",
            quantization="4bit",
            loss_chunk_size=DEFAULT_CHUNK,
            ladder_options=(("side_checkpointing", False),),
        ),
        _m(
            "ladder-4bit-int8taps",
            "ladder",
            "Ladder-4bit, taps kept for backward as per-token int8 (saved_taps='int8')",
            quantization="4bit",
            loss_chunk_size=DEFAULT_CHUNK,
            ladder_options=(("saved_taps", "int8"),),
        ),
        _m(
            "ladder-4bit-cputaps",
            "ladder",
            "Ladder-4bit, taps offloaded to pinned CPU memory (saved_taps='cpu', CUDA only)",
            quantization="4bit",
            loss_chunk_size=DEFAULT_CHUNK,
            ladder_options=(("saved_taps", "cpu"),),
        ),
        _m(
            "ladder-4bit-frozendown",
            "ladder",
            "Ladder-4bit, frozen random down-projections",
            quantization="4bit",
            loss_chunk_size=DEFAULT_CHUNK,
            freeze_down=True,
        ),
        _m(
            "ladder-4bit-lowrank",
            "ladder",
            "Ladder-4bit, rank-16 down-projections d -> 16 -> d_s (QST; LadderConfig(down_rank=16))",
            quantization="4bit",
            loss_chunk_size=DEFAULT_CHUNK,
            ladder_options=(("down_rank", 16),),
        ),
        _m(
            "ladder-4bit-config",
            "ladder",
            "Ladder-4bit quantized by LadderConfig(quantization='4bit') instead of "
            "from_pretrained (should measure as ladder-4bit)",
            loss_chunk_size=DEFAULT_CHUNK,
            ladder_options=(("quantization", "4bit"),),
        ),
        _m(
            "ladder-8bit",
            "ladder",
            "Ladder on an 8-bit backbone (the paper's math runs)",
            quantization="8bit",
            loss_chunk_size=DEFAULT_CHUNK,
        ),
    ]
}
DEFAULT_METHODS = (
    "full",
    "lora",
    "qlora",
    "qlora-gc",
    "qlora-gc-chunk",
    "ladder",
    "ladder-nochunk",
    "xladder",
    "ladder-4bit",
    "ladder-4bit-nochunk",
    "ladder-4bit-nockpt",
    "ladder-4bit-int8taps",
    "ladder-4bit-bf16side",
    "ladder-4bit-frozendown",
    "ladder-8bit",
)  # not ladder-4bit-lowrank: its rank 16 needs a side width above 16, which `--model tiny` (width 8) does not have


def get_method(name: str) -> Method:
    """The method called `name`, or a ValueError naming the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method={name!r} is unknown; choose one of {sorted(METHODS)}.") from None


__all__ = ["DEFAULT_CHUNK", "DEFAULT_METHODS", "LORA_ALPHA", "LORA_R", "METHODS", "Method", "get_method"]
