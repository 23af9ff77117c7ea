"""PEFT options that mean nothing, or something else, for a Ladder adapter: refused with a fix before any change.

Ladder's promise is that LoRA code keeps working when `LoraConfig(...)` becomes `LadderConfig(...)`. Options whose
Ladder meaning is clear work (docs/how-to/options.md lists them all); the rest are refused here, by name, before the
model is touched, instead of being accepted and silently ignored.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable

from torch import nn

# LoraConfig fields (peft 0.21) a LoRA user may carry over, and what to do instead. `trainable_token_indices` is not
# here: LadderConfig has that field.
_WIDTH = "Ladder's side network has no rank; its width is hidden_size / reduction_factor: use reduction_factor"
_TARGETS = (
    "Ladder targets no modules: it taps every decoder layer and fuses at the final norm; choose which layers feed "
    "the side network with connections ('ladder', 'xladder' or a {backbone_layer: side_block} dict)"
)
LORA_ONLY_FIELDS = {
    "r": _WIDTH,
    "rank_pattern": _WIDTH,
    "lora_alpha": "Ladder has no LoRA scaling; the side output is scaled by the fusion (fusion_scale): remove it",
    "alpha_pattern": "Ladder has no LoRA scaling; the side output is scaled by the fusion (fusion_scale): remove it",
    "use_rslora": "Ladder has no LoRA scaling: remove it",
    "lora_dropout": "Ladder's side blocks use the backbone config's own dropout fields: remove it",
    "target_modules": _TARGETS,
    "exclude_modules": _TARGETS,
    "target_parameters": _TARGETS,
    "layers_to_transform": _TARGETS,
    "layers_pattern": _TARGETS,
    "layer_replication": _TARGETS,
    "fan_in_fan_out": "Ladder wraps whole decoder layers, not weights: remove it",
    "bias": "Ladder's projections have their own biases; to train a base-model module use modules_to_save",
    "lora_bias": "Ladder's projections have their own biases; to train a base-model module use modules_to_save",
    "init_lora_weights": "use init_weights (True: the adapter starts as the identity) and side_init",
    "use_dora": "DoRA is a LoRA variant; use LoraConfig for it",
    "use_qalora": "QA-LoRA is a LoRA variant; quantize the backbone with LadderConfig(quantization='4bit')",
    "loftq_config": "LoftQ initialises LoRA weights; quantize the backbone with LadderConfig(quantization='4bit')",
}
# Head modules PEFT adds to modules_to_save itself for SEQ_CLS / TOKEN_CLS / QUESTION_ANS; a model has one at most.
PEFT_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def check_config_kwargs(kwargs: dict) -> None:
    """Refuse LoraConfig-only keyword arguments passed to LadderConfig, with what to use instead."""
    for name, value in kwargs.items():
        if name in LORA_ONLY_FIELDS:
            raise TypeError(f"LadderConfig got the LoRA option {name}={value!r}; {LORA_ONLY_FIELDS[name]}.")


def check_modules_to_save(model: nn.Module, names: Iterable[str] | None, frozen: tuple[str, ...], kind: str) -> None:
    """Every `modules_to_save` entry must name a module that trains: one after the fusion point (a head, a pooler).

    Ladder runs the `frozen` modules without grad up to the fusion point: a decoder (the final norm's parent), or a
    post-norm encoder's embeddings and layer holder (`bert.embeddings`, `bert.encoder`; `bert.pooler` comes after).
    A trainable copy of a module in there (embeddings, a layer) would be counted as trainable and never get a
    gradient, and the fusion module itself is where Ladder attaches. PEFT matches entries as name suffixes.
    """
    module_names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    region = frozen[0].rpartition(".")[0] if kind == "encoder" else frozen[0]  # what the guard wraps
    for entry in names or ():
        matches = [name for name in module_names if name.endswith(entry)]
        if not matches and entry not in PEFT_HEAD_NAMES:
            heads = [n for n in module_names if n and "." not in n and not f"{region}.".startswith(f"{n}.")]
            raise ValueError(
                f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}; name a module after "
                f"the {kind}, such as {heads or ['lm_head']}."
            )
        inside = next((name for name in matches for part in frozen if _within(name, part)), None)
        if inside is not None:
            where = next(part for part in frozen if _within(inside, part)) or "(model)"
            raise ValueError(
                f"modules_to_save entry {entry!r} names `{inside}`, inside the {kind} `{where}` that Ladder runs "
                "without grad up to the fusion point: a trainable copy there would never get a gradient. Train what "
                "comes after it instead (lm_head, a score/classifier head, a pooler), or use LoraConfig to fine-tune "
                f"embeddings or {kind} layers."
            )


def _within(name: str, part: str) -> bool:
    return not part or name == part or name.startswith(f"{part}.")


# PEFT 0.21's PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers >= 5.2x deprecates in
# favour of `is_activation_checkpointing` with a FutureWarning the user can do nothing about (LoRA prints it too).
_DEPRECATED_PROBE = "`is_gradient_checkpointing` is deprecated"


def enable_activation_checkpointing(model: nn.Module, checkpointing_kwargs: dict | None = None) -> None:
    """transformers' `activation_checkpointing_enable`, or `gradient_checkpointing_enable` before the rename."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)


def install() -> None:
    """Keep PEFT's deprecated `is_gradient_checkpointing` probe quiet while a Ladder PeftModel is built (idempotent).

    Only for Ladder configs and only that one message: LoRA models and the user's own code warn as before.
    """
    from peft import PeftModel

    original = PeftModel.__init__
    if getattr(original, "_peft_ladder", False):
        return

    @functools.wraps(original)
    def init(self, model, peft_config, *args, **kwargs):
        if getattr(peft_config, "peft_type", None) != "LADDER":
            return original(self, model, peft_config, *args, **kwargs)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DEPRECATED_PROBE, category=FutureWarning)
            return original(self, model, peft_config, *args, **kwargs)

    init._peft_ladder = True
    PeftModel.__init__ = init
