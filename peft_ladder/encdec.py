"""Encoder-decoder backbones (T5, BART) for `SEQ_2_SEQ_LM`: a side encoder and a side decoder, as in the original LST.

```
 encoder (EncoderGuard: no grad)           decoder (BackboneGuard: no grad up to the fusion point)
 embed -> [enc 0] -> ... -> [enc L-1] -> h_enc -------------> cross-attention of every backbone decoder layer
            |                  |                 (unchanged)
         down_e0  ...      down_e..
            v                  v
  s -> [side enc 0] -> ... -> [side enc] -> m  (side memory, width d_s, rides in encoder_outputs)
                                             |
 embed -> [dec 0] -> ... -> [dec L-1] -> h_L |--(+)--> T5: decoder.final_layer_norm -> lm_head
            |                  |             v   ^     BART: the decoder's output -> lm_head
         down_d0  ...      down_d..          |   |
            v                  v             v   |
  s -> [side dec 0] -> ... -> [side dec] ----+-> up
        (causal self-attention, cross-attention to m)
```

Where the side decoder joins: where the decoder's last hidden state leaves, as for decoder-only and encoder-only
models. T5's decoder is pre-norm and ends with `final_layer_norm`: the side output is added to its input (h_L), so the
norm and the LM head see the sum. BART's decoder is post-norm (each layer ends with its own LayerNorm; its
`layernorm_embedding` normalises the *embeddings*, before the first layer, and BART has no final `layer_norm`): the side
output is added to what the decoder returns, as for BERT (backbone.py explains why not inside the last layer).

Why the side encoder does not fuse into the encoder's output (LST did not either): every backbone decoder layer
cross-attends to the encoder's output. Changing it would make the backbone decoder's cross-attention depend on
trainable parameters, so the loss would need gradients through the frozen decoder and the backbone would be back in
autograd, which is what Ladder avoids. The side encoder's output only feeds the side decoder's cross-attention.

Generation: the side memory m is added to the encoder's `ModelOutput` under `side_memory_key(adapter)`, so
transformers expands it with `encoder_outputs` (num_beams, num_return_sequences) and hands it back to every decoder
step. Side decoder block j has `layer_idx = L_dec + j`: its self-attention keys and values, and its cross-attention keys
and values of m, live in extra slots of the backbone's own `EncoderDecoderCache` (both halves), so beam reordering and
batch selection apply to them too. The side encoder runs once per encoder forward, so once per `generate`.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import ModelOutput

from .backbone import Backbone, base_module, side_config
from .layer import BackboneGuard, ForwardState, _to_side, side_block_runner
from .side_network import BlockRunner, LadderSideNetwork

# model_type -> what its encoder-decoder wiring was tested on; other families are refused (their layer signatures and
# position schemes have not been checked).
SEQ2SEQ_TYPES = ("t5", "bart")
MEMORY_KEY = "ladder_side_memory"
# Block arguments the side blocks must not take from the backbone: T5's relative position biases have the backbone's
# head count (every side block computes its own), and the decoder's cross-attention input is the side memory.
_OWN_POSITION_BIAS = ("position_bias", "encoder_decoder_position_bias")


@dataclass(frozen=True)
class EncoderStack:
    """The encoder half of an encoder-decoder backbone; names are relative to the model passed to `find_backbone`."""

    name: str  # the encoder module (`encoder`, `model.encoder`), where the EncoderGuard sits
    layer_names: tuple[str, ...]
    config: object  # the encoder's config (T5: is_decoder=False)

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)


def side_memory_key(adapter_name: str) -> str:
    """The `encoder_outputs` key under which adapter `adapter_name`'s side memory travels."""
    return f"{MEMORY_KEY}.{adapter_name}"


# --- finding the two stacks -----------------------------------------------------------------------------------------


def find_encoder_decoder(model: nn.Module, supported: str) -> Backbone:
    """The `Backbone` of an encoder-decoder model: the decoder's layers and fusion point, with `encoder` filled."""
    config = model.config
    if config.model_type not in SEQ2SEQ_TYPES:
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model of type {config.model_type!r}, which Ladder has not "
            f"been tested on; Ladder supports {supported}."
        )
    if not (hasattr(model, "get_encoder") and hasattr(model, "get_decoder")):
        raise ValueError(f"{type(model).__name__} has no get_encoder()/get_decoder(); Ladder supports {supported}.")
    names = {id(module): name for name, module in model.named_modules()}
    encoder, decoder = model.get_encoder(), model.get_decoder()
    encoder_name, decoder_name = names[id(encoder)], names[id(decoder)]
    encoder_layers = _layer_names(names, base_module(encoder))
    decoder_layers = _layer_names(names, base_module(decoder))
    decoder_config = base_module(decoder).config
    stack = EncoderStack(encoder_name, encoder_layers, base_module(encoder).config)
    frozen = (encoder_name, decoder_name, names[id(model.get_input_embeddings())])
    norm = getattr(base_module(decoder), "final_layer_norm", None)
    if isinstance(norm, nn.Module):  # T5: pre-norm, ends with a final norm
        norm_name = f"{decoder_name}.final_layer_norm"
        fusion = "norm_input"
    else:  # BART: post-norm, the decoder's output is the last hidden state that leaves (module docstring)
        norm_name, fusion = decoder_name, "output"
    return Backbone(decoder_layers, norm_name, decoder_config, int(config.d_model), fusion, "decoder", frozen, stack)


def _layer_names(names: dict[int, str], stack: nn.Module) -> tuple[str, ...]:
    layers = next(child for child in stack.children() if isinstance(child, nn.ModuleList))
    return tuple(names[id(layer)] for layer in layers)


# --- the side network -----------------------------------------------------------------------------------------------


def seq2seq_side_config(config, num_layers: int, side_blocks: int, reduction_factor: int):
    """One stack's config at side width; `side_config` does the width and heads, this the enc-dec field names."""
    side = side_config(config, num_layers, side_blocks, reduction_factor)
    heads = int(side.num_attention_heads)
    for name in ("encoder_attention_heads", "decoder_attention_heads"):  # BART: one field per stack
        if hasattr(side, name):
            setattr(side, name, heads)
    for name in ("d_ff", "encoder_ffn_dim", "decoder_ffn_dim"):
        if hasattr(side, name):
            setattr(side, name, max(1, int(getattr(config, name)) // reduction_factor))
    for name in ("encoder_layers", "decoder_layers"):  # cache slots follow num_hidden_layers (BART: encoder_layers)
        if hasattr(side, name):
            setattr(side, name, num_layers + side_blocks)
    return side


def block_factory(block_cls: type, config) -> Any:
    """T5 side blocks each get their own relative position bias (the backbone's has its head count, not theirs)."""
    if config.model_type == "t5":
        return functools.partial(block_cls, has_relative_attention_bias=True)
    return block_cls


class SideEncoder(LadderSideNetwork):
    """The side encoder: bidirectional side blocks over the encoder's taps; its output m is the side memory.

    `up` here is the side memory's output projection, d_s -> d_s, identity at init: m is not added to anything of
    the backbone (module docstring), it is what the side decoder cross-attends to.
    """

    def __init__(
        self, plan, hidden_size: int, side_config, block_cls: type, gate, gate_temperature: float, down_rank=None
    ) -> None:
        super().__init__(plan, hidden_size, side_config, block_cls, gate, gate_temperature, down_rank=down_rank)
        width = int(side_config.hidden_size)
        self.up = nn.Linear(width, width, bias=False)
        nn.init.eye_(self.up.weight)

    def encode(self, taps: dict[int, torch.Tensor], run_block: BlockRunner) -> torch.Tensor:
        """The side memory (B, S, d_s) from the projected encoder taps."""
        side = taps[self.plan.source]
        for j, block in enumerate(self.blocks):
            layer = self.plan.block_to_layer.get(j)
            if layer is not None:
                side = self.mix(j, side, taps[layer + 1])
            side = run_block(block, side)
        return self.up(self.norm(side))


class LadderSeq2SeqSide(LadderSideNetwork):
    """One adapter's side network on an encoder-decoder backbone: the side decoder, owning the side `encoder`."""

    def __init__(self, encoder: SideEncoder, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.encoder = encoder

    def set_memory_options(self, checkpointing: Optional[bool], saved_taps: str, mlp_chunk_size=None) -> None:
        """`side_checkpointing` and `saved_taps` apply to both side stacks (`mlp_chunk_size` is refused here)."""
        super().set_memory_options(checkpointing, saved_taps)
        self.encoder.set_memory_options(checkpointing, saved_taps)


def build_side(model: nn.Module, backbone, plans: tuple, config, side_configs: tuple) -> LadderSeq2SeqSide:
    """The side encoder and decoder for `backbone` (`plans`, `side_configs`: encoder's, then decoder's)."""
    encoder_plan, decoder_plan = plans
    encoder_config, decoder_config = side_configs
    encoder_cls = type(base_module(model.get_submodule(backbone.encoder.layer_names[0])))
    decoder_cls = type(base_module(model.get_submodule(backbone.layer_names[0])))
    encoder = SideEncoder(
        encoder_plan,
        backbone.hidden_size,
        encoder_config,
        block_factory(encoder_cls, encoder_config),
        config.gate,
        config.gate_temperature,
        down_rank=config.down_rank,
    )
    return LadderSeq2SeqSide(
        encoder,
        decoder_plan,
        backbone.hidden_size,
        decoder_config,
        block_factory(decoder_cls, decoder_config),
        config.gate,
        config.gate_temperature,
        config.init_weights,
        config.fusion_scale,
        down_rank=config.down_rank,
    )


def check_config(model: nn.Module, config) -> None:
    """Refuse, before anything changes, the LadderConfig options the encoder-decoder wiring does not implement.

    `loss_chunk_size` is documented for causal-LM training only: a seq2seq model always computes its own loss.
    """
    refused = {
        "quantization": config.quantization,
        "trainable_token_indices": config.trainable_token_indices,
        "side_init": None if config.side_init == "default" else config.side_init,
        "mlp_chunk_size": config.mlp_chunk_size,
    }
    for name, value in refused.items():
        if value is not None:
            default = "'default'" if name == "side_init" else "None"
            raise ValueError(
                f"LadderConfig({name}={value!r}) is not supported on encoder-decoder backbones yet "
                f"({type(model).__name__}); set {name}={default}."
            )


# --- one forward pass -----------------------------------------------------------------------------------------------


def side_block_inputs(side: nn.Module, args: tuple, kwargs: dict, memory: Optional[torch.Tensor]) -> tuple:
    """The reference layer's inputs (`args`, `kwargs`, hidden states excluded) rewritten for `side`'s blocks.

    T5's position biases are dropped (each side block computes its own at side head count); a decoder block's
    `encoder_hidden_states` becomes the side memory. Each argument keeps its place, positional or keyword: gradient
    checkpointing recomputes the positional ones and drops a `cache` passed by keyword, as for the backbone's layers.
    """
    if not len(side.blocks):
        return args, kwargs
    names = list(inspect.signature(type(side.blocks[0]).forward).parameters)[2:]  # after self, hidden_states
    args, kwargs = list(args), dict(kwargs)

    def replace(name: str, value: Optional[torch.Tensor]) -> None:
        if name in kwargs:
            kwargs[name] = value
        elif name in names and names.index(name) < len(args):
            args[names.index(name)] = value

    for name in _OWN_POSITION_BIAS:
        replace(name, None)
    given = {**dict(zip(names, args, strict=False)), **kwargs}  # more names than positional arguments
    if given.get("encoder_hidden_states") is not None:
        if memory is None:
            raise RuntimeError(
                "Ladder's side decoder needs the side encoder's output, and this decoder call has none: the "
                "`encoder_outputs` passed in were computed without the active Ladder adapter (under "
                "disable_adapter(), with another adapter, or as a tuple with return_dict=False). Let the model run its "
                "encoder, or compute encoder_outputs with model.get_encoder() while this adapter is active."
            )
        replace("encoder_hidden_states", memory)
    return tuple(args), kwargs


class Seq2SeqState(ForwardState):
    """`ForwardState` for an encoder-decoder: it also holds the side memory between the encoder and the decoder."""

    def __init__(self) -> None:
        self.memory: Optional[torch.Tensor] = None  # the active adapter's side memory, during a model forward only
        self.in_model_forward = False
        super().__init__()

    def record_block_inputs(self, args: tuple, kwargs: dict) -> None:
        super().record_block_inputs(*side_block_inputs(self.side, args, kwargs, self.memory))


class EncoderGuard:
    """The encoder's no-grad region, the side encoder run after it, and the side memory's lifetime.

    * encoder entered: autograd off (as `BackboneGuard`), the shared state records the encoder's taps;
    * encoder returned: autograd back to the caller's mode, the side encoder runs over the taps, and its output m is
      added to the encoder's output (`side_memory_key`) so that it travels with `encoder_outputs`;
    * model entered: m is taken from `encoder_outputs` if given (generation), else from the encoder run inside;
      model returned: m is dropped, so nothing stays alive between steps.
    """

    def __init__(self, model: nn.Module, encoder: nn.Module, fusion: nn.Module) -> None:
        self.fusion = fusion
        self.state = fusion.forward_state
        self._grad_enabled: Optional[bool] = None
        self.handles = [
            encoder.register_forward_pre_hook(self._enter),
            encoder.register_forward_hook(self._exit, always_call=True),
            model.register_forward_pre_hook(self._model_enter, with_kwargs=True),
            model.register_forward_hook(self._model_exit, always_call=True),
        ]

    def _key(self) -> str:
        return side_memory_key(self.fusion.active_adapters[0])

    def _enter(self, module: nn.Module, args: tuple) -> None:
        side = self.fusion.active_side()
        self.state.start(side.encoder if side is not None else None)
        self._grad_enabled = torch.is_grad_enabled() if side is not None else None
        if self._grad_enabled:
            torch.set_grad_enabled(False)

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> Any:
        grad_enabled, self._grad_enabled = self._grad_enabled, None
        if grad_enabled:
            torch.set_grad_enabled(True)
        side = self.state.side
        taps, block_args, block_kwargs = self.state.take()
        self.state.side = None
        if side is None or output is None or not taps:
            return None
        device = side.up.weight.device
        block_args, block_kwargs = _to_side((block_args, block_kwargs), side.dtype, device)

        # Grad mode first: the runner checkpoints the side encoder's blocks only when they train.
        with torch.set_grad_enabled(bool(grad_enabled)), side_block_runner(side, block_args, block_kwargs) as run_block:
            memory = side.encode(taps, run_block)  # (B, S, d_s)
        if self.state.in_model_forward:
            self.state.memory = memory
        if isinstance(output, ModelOutput):
            output[self._key()] = memory
        return output

    def _model_enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.state.in_model_forward = True
        encoder_outputs = kwargs.get("encoder_outputs")
        side = self.fusion.active_side()
        memory = None
        if side is not None and isinstance(encoder_outputs, dict):  # a ModelOutput from the encoder
            memory = encoder_outputs.get(self._key())
        self.state.memory = memory

    def _model_exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.state.memory = None
        self.state.in_model_forward = False

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def install_guards(model: nn.Module, fusion: nn.Module, backbone: Backbone) -> BackboneGuard:
    """The decoder's `BackboneGuard` and the `EncoderGuard`, once per model; `unload()` removes both.

    T5's guard sits on the decoder (the final norm's parent). BART's fusion layer wraps the decoder itself, and the
    guard must outlive the side decoder run that follows the decoder's return: it sits on the fusion layer.
    """
    if fusion.guard is not None:
        return fusion.guard
    decoder = fusion if fusion.at_output else model.get_submodule(backbone.norm_name.rpartition(".")[0])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    guard = fusion.install_guard(decoder, model.get_input_embeddings(), head)
    encoder_guard = EncoderGuard(model, model.get_submodule(backbone.encoder.name), fusion)
    guard.handles.extend(encoder_guard.handles)  # removed with the decoder's guard
    return guard
