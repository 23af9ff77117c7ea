"""One factory for every method the benchmark compares, so no baseline gets a hand-tuned (dis)advantage.

Every method starts from the same saved checkpoint, loaded by `from_pretrained`; quantized backbones use transformers'
own bitsandbytes path (`BitsAndBytesConfig`, the QLoRA path). No method calls `prepare_model_for_kbit_training`
(it would upcast the embeddings, norms and LM head of the quantized baselines to fp32); LoRA dropout is 0 (it only
adds memory); gradient checkpointing is transformers' non-reentrant one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

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
    # Levers on the taps the down-projections keep for their weight gradients (issue item 5), benchmark-only:
    side_in_backbone_dtype: bool = False  # side network in bf16 like the backbone (PEFT's default upcasts to fp32)
    freeze_down: bool = False  # down-projections frozen at their random init: no tap is kept for backward


def _m(name, kind, help, **kw) -> Method:
    return Method(name=name, kind=kind, help=help, **kw)


METHODS = {m.name: m for m in [
    _m("full", "full", "full fine-tuning: every weight trained"),
    _m("lora", "lora", f"LoRA r={LORA_R} alpha={LORA_ALPHA}, all linear layers"),
    _m("qlora", "lora", "QLoRA: LoRA on a 4-bit nf4 backbone (double quantization)", quantization="4bit"),
    _m("qlora-gc", "lora", "QLoRA + gradient checkpointing", quantization="4bit", gradient_checkpointing=True),
    _m("qlora-gc-chunk", "lora", "QLoRA + gradient checkpointing + chunked loss", quantization="4bit",
       gradient_checkpointing=True, loss_chunk_size=DEFAULT_CHUNK),
    _m("ladder", "ladder", "Ladder (LadderConfig defaults: chunked loss)", loss_chunk_size=DEFAULT_CHUNK),
    _m("ladder-nochunk", "ladder", "Ladder with transformers' loss (full logits)"),
    _m("xladder", "ladder", "xLadder (LadderConfig defaults)", connections="xladder", loss_chunk_size=DEFAULT_CHUNK),
    _m("ladder-4bit", "ladder", "Ladder on a 4-bit nf4 backbone (QST)", quantization="4bit",
       loss_chunk_size=DEFAULT_CHUNK),
    _m("ladder-4bit-nochunk", "ladder", "Ladder on a 4-bit backbone, transformers' loss", quantization="4bit"),
    _m("xladder-4bit", "ladder", "xLadder on a 4-bit nf4 backbone", quantization="4bit", connections="xladder",
       loss_chunk_size=DEFAULT_CHUNK),
    _m("ladder-4bit-bf16side", "ladder", "Ladder-4bit, side network in the backbone dtype (bf16 taps, no fp32 "
       "copies)", quantization="4bit", loss_chunk_size=DEFAULT_CHUNK, side_in_backbone_dtype=True),
    _m("ladder-4bit-frozendown", "ladder", "Ladder-4bit, frozen random down-projections", quantization="4bit",
       loss_chunk_size=DEFAULT_CHUNK, freeze_down=True),
    _m("ladder-4bit-config", "ladder", "Ladder-4bit quantized by LadderConfig(quantization='4bit') instead of "
       "from_pretrained (should measure as ladder-4bit)", loss_chunk_size=DEFAULT_CHUNK,
       ladder_options=(("quantization", "4bit"),)),
    _m("ladder-8bit", "ladder", "Ladder on an 8-bit backbone (the paper's math runs)", quantization="8bit",
       loss_chunk_size=DEFAULT_CHUNK),
]}
DEFAULT_METHODS = ("full", "lora", "qlora", "qlora-gc", "qlora-gc-chunk", "ladder", "ladder-nochunk", "xladder",
                   "ladder-4bit", "ladder-4bit-nochunk", "ladder-4bit-bf16side", "ladder-4bit-frozendown",
                   "ladder-8bit")


def quantization_config(kind: Optional[str], dtype: torch.dtype):
    if kind is None:
        return None
    from transformers import BitsAndBytesConfig

    if kind == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_backbone(model_dir: str, method: Method, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    quant = quantization_config(method.quantization, dtype)
    if quant is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quant,
                                                     device_map={"": device})
    if device.type == "cpu":
        gpu_faithful_bitsandbytes(model)
    return model


def gpu_faithful_bitsandbytes(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 CPUs: memory (+119 MiB on a small model) and a code
    path no GPU runs. Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def build(model_dir: str, method: Method, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model `method` trains, in train mode, with exactly the parameters it trains requiring grad."""
    model = load_backbone(model_dir, method, dtype, device)
    model.config.use_cache = False
    if method.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method.kind == "full":
        if method.quantization is not None:
            raise ValueError(f"method {method.name!r}: full fine-tuning of a quantized backbone is not possible.")
        model.requires_grad_(True)
    elif method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA,
                                                 lora_dropout=0.0, target_modules="all-linear"))
    else:
        from peft import get_peft_model

        from peft_ladder import LadderConfig

        config = LadderConfig(task_type="CAUSAL_LM", connections=method.connections,
                              loss_chunk_size=method.loss_chunk_size, **dict(method.ladder_options))
        model = get_peft_model(model, config, autocast_adapter_dtype=not method.side_in_backbone_dtype)
        if device.type == "cpu":
            gpu_faithful_bitsandbytes(model)  # LadderConfig(quantization=...) quantizes here, after loading
        if method.freeze_down:
            for name, param in model.named_parameters():
                if ".ladder_side." in name and ".down." in name:
                    param.requires_grad_(False)
    return model.train()


def external_chunk_size(method: Method) -> Optional[int]:
    """The loss chunk size the training step applies itself (baselines); Ladder's own forward applies its own."""
    return method.loss_chunk_size if method.kind != "ladder" else None


__all__ = ["DEFAULT_METHODS", "METHODS", "Method", "build", "external_chunk_size", "gpu_faithful_bitsandbytes"]
