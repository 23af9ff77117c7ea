"""One factory for every method the benchmark compares, so no baseline gets a hand-tuned (dis)advantage.

Every method starts from the same saved checkpoint, loaded by `from_pretrained`; quantized backbones use transformers'
own bitsandbytes path (`BitsAndBytesConfig`, the QLoRA path). No method calls `prepare_model_for_kbit_training`
(it would upcast the embeddings, norms and LM head of the quantized baselines to fp32); LoRA dropout is 0 (it only
adds memory); gradient checkpointing is transformers' non-reentrant one. The methods themselves are data, in
`peft_ladder/methods.py`, shared with the planner.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch
from torch import nn

from peft_ladder.methods import LORA_ALPHA, LORA_R, Method
from peft_ladder.options import enable_activation_checkpointing
from peft_ladder.planner import AUTOCASTS, OPTIMIZERS
from peft_ladder.quantization import as_bitsandbytes_config

# Built-in models (transformers configs, random weights): no download needed.
MODEL_PRESETS = {
    # For tests: seconds per method.
    "tiny": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=1024,
    ),
    # Qwen2.5-7B's proportions (MLP 5.3x hidden, GQA, vocab / hidden = 42, untied head) scaled down to run on a CPU,
    # written as a Llama config (no QKV bias) so the published results stay comparable run to run.
    "small": dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=1344,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=10880,
    ),
}


def model_config(model: str):
    """A transformers config from a preset name, a config.json file or a model directory."""
    from transformers import AutoConfig

    if model in MODEL_PRESETS:
        fields = dict(MODEL_PRESETS[model])
        return AutoConfig.for_model(
            fields.pop("model_type"), max_position_embeddings=32768, tie_word_embeddings=False, **fields
        )
    if os.path.isfile(model):
        with open(model) as handle:
            fields = json.load(handle)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(model)


def prepare_checkpoint(model: str, workdir: str, seed: int = 0) -> str:
    """A directory every method loads from: `model` itself if it holds weights, else random weights saved once."""
    if os.path.isdir(model) and any(name.endswith((".safetensors", ".bin")) for name in os.listdir(model)):
        return model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(model_config(model)).save_pretrained(workdir)
    return workdir


def quantization_config(kind: Optional[str], dtype: torch.dtype):
    """The `BitsAndBytesConfig` of a method's backbone: nf4 with double quantization (QLoRA's), or int8."""
    if kind is None:
        return None
    return as_bitsandbytes_config(
        {
            "quantization": kind,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
        }
    )


def gpu_faithful_bitsandbytes(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for AVX512-BF16 CPUs: memory (+119 MiB on a small model) and a code
    path no GPU runs. Returns how many layers were switched."""
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def load_backbone(model_dir: str, method: Method, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    quant = quantization_config(method.quantization, dtype)
    if quant is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, quantization_config=quant, device_map={"": device}
        )
    if device.type == "cpu":
        gpu_faithful_bitsandbytes(model)
    return model


def build(model_dir: str, method: Method, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model `method` trains, in train mode, with exactly the parameters it trains requiring grad."""
    model = load_backbone(model_dir, method, dtype, device)
    model.config.use_cache = False
    if method.gradient_checkpointing:
        enable_activation_checkpointing(model, {"use_reentrant": False})
    if method.kind == "full":
        if method.quantization is not None:
            raise ValueError(f"method {method.name!r}: full fine-tuning of a quantized backbone is not possible.")
        model.requires_grad_(True)
    elif method.kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type="CAUSAL_LM", r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear"
            ),
        )
    else:
        from peft import get_peft_model

        from peft_ladder import LadderConfig

        config = LadderConfig(
            task_type="CAUSAL_LM",
            connections=method.connections,
            loss_chunk_size=method.loss_chunk_size,
            **dict(method.ladder_options),
        )
        model = get_peft_model(model, config, autocast_adapter_dtype=not method.side_in_backbone_dtype)
        if device.type == "cpu":
            gpu_faithful_bitsandbytes(model)  # LadderConfig(quantization=...) quantizes here, after loading
        if method.freeze_down:
            for name, param in model.named_parameters():
                if ".ladder_side." in name and ".down." in name:
                    param.requires_grad_(False)
    return model.train()


def check_precision(optimizer: str, autocast: str, dtype: str, device: str) -> None:
    """Raise a ValueError if the benchmark cannot run or the planner cannot model these options (`--optimizer`,
    `--autocast`): each error names the option, the value and what to use instead."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}.")
    if autocast not in AUTOCASTS:
        raise ValueError(f"autocast={autocast!r} is unknown; choose one of {', '.join(AUTOCASTS)}.")
    if autocast == "bf16" and dtype != "bfloat16":
        raise ValueError(
            f"autocast='bf16' with dtype={dtype!r}: the benchmark measures Trainer's bf16=True on a bf16 backbone "
            "(fp32 adapters and side network computed in bf16), which is what the planner models; use --dtype bfloat16."
        )
    if optimizer == "paged_adamw_8bit" and not str(device).startswith("cuda"):
        raise ValueError(
            f"optimizer='paged_adamw_8bit' on device={device!r}: paged optimizer state lives in CUDA unified memory, "
            "and on CPU bitsandbytes falls back to plain 8-bit AdamW (the same bytes). Use --optimizer adamw_8bit on "
            "CPU, or run on a CUDA device."
        )


def make_optimizer(name: str, params: list, lr: float) -> torch.optim.Optimizer:
    """The optimizer `TrainingArguments(optim=name)` builds: torch's AdamW, or bitsandbytes' (paged) 8-bit AdamW
    (blockwise 8-bit state; its CPU kernels need bitsandbytes >= 0.50). Trainer's default betas, eps and weight
    decay 0."""
    if name in ("adamw", "adamw_torch"):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    from packaging.version import Version

    from peft_ladder.quantization import bitsandbytes_version

    version = bitsandbytes_version()
    if version is None or Version(version) < Version("0.50"):
        raise ImportError(
            f"--optimizer {name} needs bitsandbytes >= 0.50 (its 8-bit optimizers run on CPU from 0.50); found "
            f"{version or 'none'}. Run: pip install 'bitsandbytes>=0.50', or use --optimizer adamw."
        )
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=0.0)


def precision_context(autocast: str, device: torch.device):
    """What Trainer wraps the forward and the loss in: `torch.autocast(device, bfloat16)` for bf16=True."""
    if autocast == "bf16":
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


def external_chunk_size(method: Method) -> Optional[int]:
    """The loss chunk size the training step applies itself (baselines); Ladder's own forward applies its own."""
    return method.loss_chunk_size if method.kind != "ladder" else None
