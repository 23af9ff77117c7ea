"""Finding the parts Ladder needs in any decoder-only transformers model, without per-model code.

Ladder needs three things from a backbone: the `nn.ModuleList` of decoder layers (each gets a no-grad tap), the
final norm (the fusion point: the side output is added to its input), and the decoder config (to build side blocks
from the backbone's own decoder-layer class at a reduced width).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_norm", "norm_f", "final_layernorm")
SUPPORTED = (
    "decoder-only transformers models whose decoder keeps its layers in one nn.ModuleList and ends with a final norm "
    "(tested: Llama, Qwen2, Qwen3, Mistral, Gemma3 text, OPT, GPT-2)"
)


@dataclass(frozen=True)
class Backbone:
    """Where Ladder attaches in one model: names are relative to the model passed to `find_backbone`."""

    layer_names: tuple[str, ...]  # one per decoder layer, in order
    norm_name: str  # the final norm: the fusion point
    config: object  # the decoder's text config
    hidden_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


def base_module(module: nn.Module) -> nn.Module:
    # A layer already wrapped by a PEFT tuner layer (second adapter, reload) exposes the original as `base_layer`.
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def find_backbone(model: nn.Module) -> Backbone:
    """Locate the decoder layer stack and final norm of `model`, or raise a `ValueError` naming what is supported."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"Ladder needs a transformers model with a `.config`; got {type(model).__name__}. Supported: {SUPPORTED}."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model ({config.model_type}); Ladder supports {SUPPORTED}."
        )
    text_config = config.get_text_config(decoder=True)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if any(part.startswith("ladder_") for part in name.split(".")):
            continue  # an attached side network's own blocks are not the backbone
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers:
            decoder_name = name.rpartition(".")[0]
            decoder = model.get_submodule(decoder_name) if decoder_name else model
            norm_child = next((n for n in FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)), None)
            if norm_child is None:
                raise ValueError(
                    f"{type(model).__name__}: the decoder `{decoder_name or type(model).__name__}` has no final norm "
                    f"(looked for {FINAL_NORM_NAMES}), which is where Ladder fuses the side network. Supported: "
                    f"{SUPPORTED}."
                )
            prefix = f"{decoder_name}." if decoder_name else ""
            return Backbone(
                layer_names=tuple(f"{name}.{i}" for i in range(num_layers)),
                norm_name=f"{prefix}{norm_child}",
                config=text_config,
                hidden_size=int(text_config.hidden_size),
            )
    raise ValueError(
        f"{type(model).__name__} has no decoder layer stack (an nn.ModuleList of config.num_hidden_layers="
        f"{num_layers} layers); Ladder supports {SUPPORTED}."
    )


def reference_layer_index(config, num_layers: int) -> int:
    """The backbone layer whose attention inputs (mask, rotary) the side blocks reuse: the last full-attention one."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types and "full_attention" in layer_types[:num_layers]:
        return max(i for i, t in enumerate(layer_types[:num_layers]) if t == "full_attention")
    return num_layers - 1


def _uses_rotary(config) -> bool:
    return any(getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta", "rope_scaling"))


def side_config(config, num_layers: int, side_blocks: int, reduction_factor: int):
    """The backbone's decoder config shrunk to side width `hidden_size / reduction_factor`.

    Side block j is built with `layer_idx = num_layers + j`, so it owns its own layer slots in the generation cache and
    in per-layer config lists; its attention type matches the reference layer whose mask and rotary it reuses.
    """
    hidden = int(config.hidden_size)
    if hidden % reduction_factor:
        divisors = [r for r in (2, 4, 8, 16, 32) if hidden % r == 0]
        raise ValueError(
            f"reduction_factor={reduction_factor} gives side width {hidden / reduction_factor:.1f} for hidden_size "
            f"{hidden}; choose a divisor of {hidden} such as {divisors[-1] if divisors else 1}."
        )
    side_width = hidden // reduction_factor
    heads = int(config.num_attention_heads)
    side = copy.deepcopy(config)
    side.hidden_size = side_width
    if _uses_rotary(config):
        # Rotary models: keep the backbone's head size so the side blocks reuse its (cos, sin) unchanged. Set it
        # explicitly: configs without `head_dim` (Qwen2) would derive it from the side width and heads instead.
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        side_heads = max(1, side_width // head_dim)
        side.head_dim = head_dim
    else:
        # Absolute-position models (OPT, GPT-2) derive head size from width: pick a head count that divides it.
        side_heads = max(1, side_width // (hidden // heads))
        while side_width % side_heads:
            side_heads -= 1
    side.num_attention_heads = side_heads
    if hasattr(side, "num_key_value_heads"):
        side.num_key_value_heads = side_heads
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        if hasattr(side, name):
            width = getattr(config, name) or 4 * hidden
            setattr(side, name, max(1, int(width) // reduction_factor))
            break
    side.num_hidden_layers = num_layers + side_blocks
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        ref_type = layer_types[reference_layer_index(config, num_layers)]
        side.layer_types = list(layer_types[:num_layers]) + [ref_type] * side_blocks
    return side
