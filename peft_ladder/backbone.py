"""Finding the parts Ladder needs in a decoder-only or encoder-only transformers model, without per-model code.

Encoder-decoder models (T5, BART) are found by `encdec.find_encoder_decoder`: a `Backbone` of the decoder, with its
`encoder` half filled in.

Ladder needs three things from a backbone: the `nn.ModuleList` of layers (each gets a no-grad tap), the fusion point
(where the side output joins the last hidden state), and the layer config (to build side blocks from the backbone's
own layer class at a reduced width).

Where the fusion point sits:

* Pre-norm stacks (every decoder; ModernBERT among encoders) end with a final norm: the side output is added to its
  input, h_L, and the norm and head see the sum (`Backbone.fusion == "norm_input"`).
* Post-norm encoders (BERT, RoBERTa) have no final norm: each layer ends with its own LayerNorm, so the last layer's
  output already is the last hidden state that leaves the encoder. The side output is added to what the module
  holding the layers (`bert.encoder`) returns (`Backbone.fusion == "output"`): that is where the encoder's last hidden
  state leaves, so the pooler, a classifier and a sentence-embedding user (`AutoModel(...).last_hidden_state`) all see
  the sum, and every tapped layer, the last one included, has run before the side network needs its taps. Fusing
  inside the last layer, at the input of its output LayerNorm, would normalise the side output away with the
  residual stream and leave the side network without the last layer's output (hidden state L) as a tap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from torch import nn

if TYPE_CHECKING:
    from .encdec import EncoderStack

FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_norm", "norm_f", "final_layernorm")
SUPPORTED = (
    "decoder-only transformers models whose decoder keeps its layers in one nn.ModuleList and ends with a final norm "
    "(tested: Llama, Qwen2, Qwen3, Mistral, Gemma3 text, OPT, GPT-2), encoder-only models whose encoder keeps its "
    "layers in one nn.ModuleList (tested: BERT, RoBERTa, ModernBERT), and the encoder-decoder families T5 and BART "
    "(SEQ_2_SEQ_LM); other encoder-decoder families (mT5, mBART, Pegasus, Marian, ...) are refused as untested"
)
Fusion = Literal["norm_input", "output"]  # add the side output to the fusion module's input (a final norm) or output
# Families whose attention derives the head size from the width (hidden_size / num_attention_heads) and ignores
# `config.head_dim`: their rotary side blocks need a side width that is a multiple of the backbone's head size.
HEAD_SIZE_FROM_WIDTH = ("modernbert",)


@dataclass(frozen=True)
class Backbone:
    """Where Ladder attaches in one model: names are relative to the model passed to `find_backbone`."""

    layer_names: tuple[str, ...]  # one per decoder / encoder layer, in order
    norm_name: str  # the fusion module: the final norm, or a post-norm encoder's layer holder (`bert.encoder`)
    config: object  # the decoder's text config, or the encoder's config
    hidden_size: int
    fusion: Fusion = "norm_input"  # where the side output joins the last hidden state (module docstring)
    kind: Literal["decoder", "encoder"] = "decoder"  # causal or bidirectional layers
    # The modules that run without grad before the fusion point (`modules_to_save` may not name anything inside):
    # the whole decoder for a norm fusion; a post-norm encoder's embeddings and layer holder, not its pooler.
    frozen_names: tuple[str, ...] = ()
    # An encoder-decoder's encoder half (encdec.py); the fields above then describe its decoder.
    encoder: Optional[EncoderStack] = None

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


def base_module(module: nn.Module) -> nn.Module:
    # A layer already wrapped by a PEFT tuner layer (second adapter, reload) exposes the original as `base_layer`.
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def is_bidirectional(layer: nn.Module) -> bool:
    """Whether `layer`'s self-attention sees the whole sequence (an encoder layer): no submodule is causal."""
    flags = [m.is_causal for m in layer.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and not any(flags)


def find_backbone(model: nn.Module) -> Backbone:
    """Locate the layer stack and fusion point of `model`, or raise a `ValueError` naming what is supported."""
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"Ladder needs a transformers model with a `.config`; got {type(model).__name__}. Supported: {SUPPORTED}."
        )
    if getattr(config, "is_encoder_decoder", False):
        from .encdec import find_encoder_decoder  # encdec builds on this module

        return find_encoder_decoder(model, SUPPORTED)
    text_config = config.get_text_config(decoder=True)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if any(part.startswith("ladder_") for part in name.split(".")):
            continue  # an attached side network's own blocks are not the backbone
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and num_layers:
            layer_names = tuple(f"{name}.{i}" for i in range(num_layers))
            kind = "encoder" if is_bidirectional(base_module(module[0])) else "decoder"
            decoder_name = name.rpartition(".")[0]
            decoder = model.get_submodule(decoder_name) if decoder_name else model
            norm_child = next((n for n in FINAL_NORM_NAMES if isinstance(getattr(decoder, n, None), nn.Module)), None)
            prefix = f"{decoder_name}." if decoder_name else ""
            if norm_child is not None:
                norm_name = f"{prefix}{norm_child}"
                return Backbone(
                    layer_names,
                    norm_name,
                    text_config,
                    int(text_config.hidden_size),
                    kind=kind,
                    frozen_names=(decoder_name,),
                )
            if kind == "encoder" and decoder_name:
                # `bert.encoder.base_layer` once Ladder wrapped the holder: the fusion module is the wrapper.
                return _post_norm_encoder(model, layer_names, decoder_name.removesuffix(".base_layer"), text_config)
            raise ValueError(
                f"{type(model).__name__}: the decoder `{decoder_name or type(model).__name__}` has no final norm "
                f"(looked for {FINAL_NORM_NAMES}), which is where Ladder fuses the side network. Supported: "
                f"{SUPPORTED}."
            )
    raise ValueError(
        f"{type(model).__name__} has no decoder layer stack (an nn.ModuleList of config.num_hidden_layers="
        f"{num_layers} layers); Ladder supports {SUPPORTED}."
    )


def _post_norm_encoder(model: nn.Module, layer_names: tuple[str, ...], encoder_name: str, config) -> Backbone:
    """BERT-style: fuse at the output of `encoder_name` (the layers' holder, `bert.encoder`); see the module docstring.

    The no-grad region is the holder's parent (`bert`): its embeddings and the encoder run frozen, its pooler (after
    the fusion point) runs in the caller's grad mode.
    """
    region = encoder_name.rpartition(".")[0]
    prefix = f"{region}." if region else ""
    embedding = model.get_input_embeddings()
    embedding_name = next(n for n, m in model.named_modules() if m is embedding)
    # The region's child that holds the input embedding (`bert.embeddings`), or the embedding itself.
    embeddings = prefix + embedding_name[len(prefix) :].split(".")[0]
    return Backbone(
        layer_names,
        encoder_name,
        config,
        int(config.hidden_size),
        fusion="output",
        kind="encoder",
        frozen_names=(embeddings, encoder_name),
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
        if getattr(config, "model_type", None) in HEAD_SIZE_FROM_WIDTH and side_width % head_dim:
            multiples = [r for r in (2, 4, 8, 16, 32) if hidden % r == 0 and (hidden // r) % head_dim == 0]
            raise ValueError(
                f"reduction_factor={reduction_factor} gives side width {side_width}, which {config.model_type} side "
                f"blocks cannot split into rotary heads of the backbone's size {head_dim}; choose a reduction_factor "
                f"that makes the side width a multiple of {head_dim}, such as {multiples[-1] if multiples else 1}."
            )
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
