"""PEFT tuner layers: a tap around every decoder layer, the fusion point at the final norm, and the no-grad guard.

```
 decoder (BackboneGuard: autograd off from the embeddings to the final norm's input; starts the ForwardState)
 embed -> [tap 0: layer 0] -> ... -> [tap L-1: layer L-1] -> [fusion: h_L + up(side) -> final norm] -> head
              |                           |                       ^
              +------- record_tap --------+--> ForwardState -take-+  side network (caller's grad mode)
```

The side network of each adapter lives in the fusion layer (`ladder_side`). One `ForwardState`, shared by all layers
of a model, carries what one forward pass collects for it: the projected taps and the attention inputs (mask, rotary,
cache) the side blocks reuse. The guard starts it when the decoder is entered, the fusion layer takes it.
"""

from __future__ import annotations

import functools
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.utils.checkpoint
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import output_capturing

from .cache import reserve_side_slots
from .mlp_chunks import chunked_mlp
from .side_network import BlockRunner, LadderSideNetwork
from .tokens import add_head_rows, record_token_ids

GC_WARNING = (
    "Gradient checkpointing has no effect on Ladder: the frozen backbone runs without grad and keeps no activations "
    "for backward, and LadderConfig.side_checkpointing alone decides whether the side blocks are checkpointed "
    "(default: whenever the side network trains). gradient_checkpointing=False (TRL's SFTConfig turns it on by "
    "default) trains the same."
)
# What recomputes a side block in backward: non-reentrant, whatever the backbone's checkpointing was enabled with.
CHECKPOINT = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)

# The decoder returned without running the fusion layer's forward: something replaced it on the instance.
FUSION_BYPASSED = (
    "Ladder's fusion layer (the wrapped final norm) did not run: its forward was replaced after the adapter was "
    "attached, so the side network would never be used nor trained. Liger kernels do this (use_liger_kernel=True "
    "patches the final RMSNorm): keep Liger's fused loss without its norm with "
    "liger_kernel_config={'rms_norm': False}, or set use_liger_kernel=False."
)


class ForwardState:
    """What one forward pass through the backbone collects for the side network (plain Python: never saved).

    Started by the `BackboneGuard` when the decoder is entered, filled by the tap layers, taken (and so emptied) by
    the fusion layer, and cleared when the decoder returns, so nothing stays alive between steps.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.side: Optional[LadderSideNetwork] = None  # the adapter this forward runs; None: the plain backbone
        self.grad_enabled = True  # the caller's grad mode, which the side path runs in
        self.token_ids: Optional[torch.Tensor] = None  # what the input embedding read (trainable_token_indices)
        self._taps: dict[int, torch.Tensor] = {}
        self._block_args: tuple = ()
        self._block_kwargs: dict = {}

    def start(self, side: Optional[LadderSideNetwork]) -> None:
        self.clear()
        self.side = side
        self.grad_enabled = torch.is_grad_enabled()

    def side_grad(self) -> torch.autograd.grad_mode.set_grad_enabled:
        """Context in which trainable side computations run: the caller's grad mode, not the backbone's."""
        return torch.set_grad_enabled(self.grad_enabled)

    def record_tap(self, index: int, hidden: torch.Tensor) -> None:
        """Down-project backbone hidden state `hidden[index]` if the side network reads it.

        Layer i records its input (index i) and its output (index i + 1), so an inner hidden state is offered twice:
        as layer i - 1's output and as layer i's input, the same tensor. It is projected once."""
        if self.side is not None and self.side.reads(index) and index not in self._taps:
            with self.side_grad():
                self._taps[index] = self.side.project(index, hidden, self.token_ids)

    def record_block_inputs(self, args: tuple, kwargs: dict) -> None:
        """The reference layer's attention inputs (mask, rotary, cache), which the side blocks reuse."""
        self._block_args, self._block_kwargs = args, kwargs

    def has_taps(self) -> bool:
        return bool(self._taps)

    def take(self) -> tuple[dict[int, torch.Tensor], tuple, dict]:
        """The projected taps and block inputs of this forward; the state keeps nothing of them."""
        taps, args, kwargs = self._taps, self._block_args, self._block_kwargs
        self._taps, self._block_args, self._block_kwargs = {}, (), {}
        return taps, args, kwargs


class BackboneGuard:
    """Runs the frozen decoder, from the embeddings to the final norm's input, with autograd off.

    Active while a Ladder adapter is; it switches grad back on when the fusion layer is entered, so the side path,
    the norm and whatever the decoder does after it (e.g. GPT-2's reshape) run in the caller's grad mode. Installed
    once per model by `LadderModel._post_injection_hook`, removed by `unload()`.

    Frozen weights alone are not enough: `enable_input_require_grads()` (gradient checkpointing, k-bit preparation)
    makes the embedding output require grad, and every backbone activation would then be saved for backward.
    """

    def __init__(
        self, decoder: nn.Module, fusion: LadderFusionLayer, embedding: nn.Module, head: Optional[nn.Module]
    ) -> None:
        self.fusion = fusion
        self.decoder = decoder  # the guarded module: a decoder, or what holds a post-norm encoder's embeddings
        self.state = fusion.forward_state
        self.first_tap = next(m for m in decoder.modules() if isinstance(m, LadderTapLayer))
        self.warned_checkpointing = False  # GC_WARNING is given once per model, not once per layer and step
        self._switched = False
        # The frozen backbone ends at the fusion point: entering the final norm, or when a post-norm encoder's layer
        # holder returns (LadderFusionLayer.at_output).
        if fusion.at_output:
            release = fusion.base_layer.register_forward_hook(self._release_after)
        else:
            release = fusion.register_forward_pre_hook(self._release)
        self.handles = [
            decoder.register_forward_pre_hook(self._enter),
            release,
            decoder.register_forward_hook(self._exit, always_call=True),  # restores grad mode even on error
            # LadderConfig.trainable_token_indices (tokens.py): the ids the side stream's input rows need, and the
            # head rows added to the logits. Both do nothing for adapters without token rows.
            embedding.register_forward_pre_hook(record_token_ids(self.state), with_kwargs=True),
        ]
        if head is not None:
            self.handles.append(head.register_forward_hook(add_head_rows(fusion.active_side)))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        side = self.fusion.active_side()
        self.state.start(side)
        if side is not None:
            self._warn_if_checkpointed()
        self._switched = side is not None and self.state.grad_enabled
        if self._switched:
            torch.set_grad_enabled(False)

    def _warn_if_checkpointed(self) -> None:
        tap = self.first_tap
        if tap.training and getattr(tap.base_layer, "gradient_checkpointing", False) and not self.warned_checkpointing:
            self.warned_checkpointing = True
            warnings.warn(GC_WARNING, stacklevel=4)

    def _release(self, module: nn.Module, args: tuple) -> None:
        if self._switched:
            torch.set_grad_enabled(True)
            self._switched = False

    def _release_after(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._release(module, args)

    def _exit(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._release(module, args)  # also when the forward raised before reaching the fusion point
        bypassed = output is not None and self.state.has_taps()
        self.state.clear()
        if bypassed:
            raise RuntimeError(FUSION_BYPASSED)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class LadderLayer(nn.Module, BaseTunerLayer):
    """Common base of Ladder's tuner layers, so PEFT's adapter switching reaches both kinds."""

    def __getattr__(self, name: str) -> Any:
        # Models read attributes off the layers they iterate over (e.g. `decoder_layer.attention_type`).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(
            "A Ladder side network cannot be merged into the base weights: it is a separate network fed by the "
            "backbone's hidden states. Use `model.unload()` to get the base model back."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("Ladder adapters are never merged, so there is nothing to unmerge.")


class LadderTapLayer(LadderLayer):
    """Runs one frozen decoder layer (without grad, under the `BackboneGuard`) and records what the side reads."""

    other_param_names = ("ladder_taps",)

    def __init__(self, base_layer: nn.Module, layer_index: int, state: ForwardState, reference: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.is_reference = reference  # its attention inputs are reused by the side blocks
        self.forward_state = state
        self.ladder_taps: dict[str, tuple[int, ...]] = {}  # adapter -> hidden-state indices read around this layer
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, side: LadderSideNetwork) -> None:
        index = self.layer_index
        self.ladder_taps[adapter_name] = tuple(i for i in (index, index + 1) if side.reads(i))
        self.set_adapter(self.active_adapters)

    def _get_available_adapters(self) -> set[str]:
        return set(self.ladder_taps)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = self.forward_state
        if self.disable_adapters or state.side is None:
            return self.base_layer(hidden_states, *args, **kwargs)

        state.record_tap(self.layer_index, hidden_states)
        with chunked_mlp(self.base_layer, state.side.mlp_chunk_size, hidden_states):  # LadderConfig.mlp_chunk_size
            output = self.base_layer(hidden_states, *args, **kwargs)  # frozen: runs under the BackboneGuard's no_grad
        state.record_tap(self.layer_index + 1, output[0] if isinstance(output, tuple) else output)
        if self.is_reference:
            state.record_block_inputs(args, kwargs)
        return output

    def __repr__(self) -> str:
        return "ladder_tap." + super().__repr__()


class LadderFusionLayer(LadderLayer):
    """Wraps the fusion point: the final norm (adds the active adapter's side output to the last layer's output, then
    norms) or, with `at_output`, a post-norm encoder's layer holder (adds it to the last hidden state it returns)."""

    adapter_layer_names = ("ladder_side",)

    def __init__(self, base_layer: nn.Module, state: ForwardState, at_output: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.forward_state = state
        self.at_output = at_output  # backbone.Backbone.fusion == "output"
        self.guard: Optional[BackboneGuard] = None  # installed by LadderModel once the adapter is injected
        self.ladder_side = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self._gain: Optional[tuple[tuple, torch.Tensor]] = None  # (what it was measured on, norm_gain): `_norm_gain`

    def update_layer(self, adapter_name: str, side: LadderSideNetwork) -> None:
        self.ladder_side[adapter_name] = side.train(self.base_layer.training)  # follow the model's mode (dropout)
        # An offloaded norm (device_map with "cpu"/"disk" offload) holds meta weights: its execution device counts.
        self._move_adapter_to_device_of_base_layer(adapter_name, _execution_device(self.base_layer))
        self.set_adapter(self.active_adapters)

    def install_guard(self, decoder: nn.Module, embedding: nn.Module, head: Optional[nn.Module]) -> BackboneGuard:
        """Put the no-grad boundary around `decoder` (the final norm's parent), once per model; hook the token rows
        into the input `embedding` and the output embedding `head` (None for a model without one)."""
        if self.guard is None:
            self.guard = BackboneGuard(decoder, self, embedding, head)
        return self.guard

    def remove_guard(self) -> None:
        if self.guard is not None:
            self.guard.remove()
            self.guard = None

    def active_side(self) -> Optional[LadderSideNetwork]:
        if self.disable_adapters or not self.active_adapters:
            return None
        return self.ladder_side[self.active_adapters[0]] if self.active_adapters[0] in self.ladder_side else None

    def forward(self, hidden_states: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> Any:
        if self.at_output:  # a layer holder, maybe called with keywords only (BART's decoder)
            return self._fuse_output(*(() if hidden_states is None else (hidden_states,)), *args, **kwargs)
        side = self.active_side()
        taps, block_args, block_kwargs = self.forward_state.take()  # keep nothing alive between steps
        if side is None or not taps:
            return self.base_layer(hidden_states, *args, **kwargs)
        return self.base_layer(self._fuse(side, hidden_states, taps, block_args, block_kwargs), *args, **kwargs)

    def _fuse_output(self, *args: Any, **kwargs: Any) -> Any:
        """Post-norm encoders: run the layer holder (the taps fill during it), then add the side output to the last
        hidden state it returns (a ModelOutput, a tuple or a tensor); no norm follows, so no gain to divide by."""
        output = self.base_layer(*args, **kwargs)  # frozen: the guard releases grad only when this returns
        side = self.active_side()
        taps, block_args, block_kwargs = self.forward_state.take()
        if side is None or not taps:
            return output
        if isinstance(output, torch.Tensor):
            return self._fuse(side, output, taps, block_args, block_kwargs, gain=False)
        fused = self._fuse(side, output[0], taps, block_args, block_kwargs, gain=False)
        if isinstance(output, tuple):
            return (fused, *output[1:])
        output[next(iter(output.keys()))] = fused  # ModelOutput: `last_hidden_state`, attribute and key
        return output

    def _fuse(
        self,
        side: LadderSideNetwork,
        hidden_states: torch.Tensor,
        taps: dict,
        block_args: tuple,
        block_kwargs: dict,
        gain: bool = True,
    ) -> torch.Tensor:
        """h_L + the side network's output (B, T, d), in h_L's dtype and on the side network's device."""
        if side.up.weight.is_meta:
            raise RuntimeError(
                f"Adapter {self.active_adapters[0]!r} has no weights yet: it was created with low_cpu_mem_usage=True, "
                "which makes empty (meta) weights for loading. Load them (set_peft_model_state_dict, load_adapter) "
                "or call get_peft_model without low_cpu_mem_usage to train a new adapter."
            )
        # The side network may sit on another device than the last decoder layer (device_map across devices).
        hidden_states = hidden_states.to(side.up.weight.device)
        block_args, block_kwargs = _to_side((block_args, block_kwargs), side.dtype, side.up.weight.device)
        reserve_side_slots(_find_cache(block_args, block_kwargs), side.side_config)  # each adapter its own depth

        with side_block_runner(side, block_args, block_kwargs) as run_block:
            gain = self._norm_gain(hidden_states) if gain and side.fusion_scale == "rms_gain" else None
            side_out = side(taps, run_block, hidden_states, gain)  # (B, T, d)
        return hidden_states + side_out.to(hidden_states.dtype)

    def _norm_gain(self, stream: torch.Tensor) -> torch.Tensor:
        """`norm_gain` of the final norm, measured again only when its weights (pointer or in-place version) or the
        stream's dtype or device change, not at every forward (every generated token)."""
        if torch.compiler.is_compiling():
            return norm_gain(self.base_layer, stream)  # traced into the graph once; a Python-side cache would break it
        weights = tuple((p.data_ptr(), p._version) for p in self.base_layer.parameters())
        key = (stream.dtype, stream.device, weights)
        if self._gain is None or self._gain[0] != key:
            self._gain = (key, norm_gain(self.base_layer, stream))
        return self._gain[1]

    def __repr__(self) -> str:
        return "ladder_fusion." + super().__repr__()


@torch.no_grad()
def norm_gain(norm: nn.Module, stream: torch.Tensor) -> torch.Tensor:
    """The final norm's per-dimension gain |g| (d,), whatever its parametrisation (Gemma's 1 + w, LayerNorm's bias).

    Measured rather than read off `norm.weight`: a probe e of +-1 entries has mean 0 and RMS 1, so an RMSNorm or a
    LayerNorm maps e to g * e (+ bias) and (norm(e) - norm(-e)) / 2 = g * e, up to the norm's eps (a common factor,
    which the fusion's ratio median|g| / |g_k| does not see).
    """
    probe = torch.ones(stream.shape[-1], dtype=stream.dtype, device=stream.device)
    probe[1::2] = -1.0
    return ((norm(probe[None]) - norm(-probe[None]))[0] / 2 * probe).abs()  # (d,)


@contextmanager
def _side_checkpointing(blocks: nn.ModuleList, enabled: bool) -> Iterator[None]:
    """Checkpoint the side blocks during this fusion or not, as `LadderSideNetwork.checkpoints_blocks` decided.

    The side blocks are the backbone's decoder-layer class, so transformers' `gradient_checkpointing_enable()` (Trainer,
    TRL) flags them too; their flag is set here for the side pass and put back after, so that flag changes nothing and
    `model.is_gradient_checkpointing` reads as before. transformers' layer checkpoints its `forward` inside its
    `__call__`, so module hooks (FSDP2's) stay outside the recompute.
    """
    layers = [block for block in blocks if isinstance(block, GradientCheckpointingLayer)]
    before = [(layer.gradient_checkpointing, getattr(layer, "_gradient_checkpointing_func", None)) for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing, layer._gradient_checkpointing_func = enabled, CHECKPOINT
    try:
        yield
    finally:
        for layer, (flag, func) in zip(layers, before, strict=True):
            layer.gradient_checkpointing = flag
            if func is None:
                del layer._gradient_checkpointing_func
            else:
                layer._gradient_checkpointing_func = func


@contextmanager
def side_block_runner(side: LadderSideNetwork, block_args: tuple, block_kwargs: dict) -> Iterator[BlockRunner]:
    """The function that runs one side block on the reused attention inputs, checkpointed when
    `side.checkpoints_blocks()` says so (call it in the side pass's grad mode), with the side blocks kept out of
    `output_hidden_states` / `output_attentions`."""
    checkpointed = side.checkpoints_blocks()
    if checkpointed:
        # A recomputed block would write its keys and values a second time; a training forward does not need them
        # (transformers' checkpointed layers drop the cache the same way).
        block_args, block_kwargs = _without_cache(block_args, block_kwargs)

    def run_block(block: nn.Module, side_hidden: torch.Tensor) -> torch.Tensor:
        if checkpointed and not isinstance(block, GradientCheckpointingLayer):
            out = CHECKPOINT(block, side_hidden, *block_args, **block_kwargs)
        else:
            out = block(side_hidden, *block_args, **block_kwargs)
        return out[0] if isinstance(out, tuple) else out

    with _not_recorded(), _side_checkpointing(side.blocks, checkpointed):
        yield run_block


@contextmanager
def _not_recorded() -> Iterator[None]:
    """Keep the side blocks out of `output_hidden_states` / `output_attentions`.

    transformers records those with hooks on every module of the decoder-layer class, and the side blocks share that
    class; pausing its (private) collector for the side pass keeps the backbone's outputs exactly as without Ladder.
    """
    collector = getattr(output_capturing, "_active_collector", None)
    if collector is None:
        yield
        return
    token = collector.set(None)
    try:
        yield
    finally:
        collector.reset(token)


def _find_cache(args: tuple, kwargs: dict):
    from transformers.cache_utils import Cache

    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def _without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The block inputs with the KV cache (positional, as GPT-2 passes it, or keyword) replaced by None."""
    from transformers.cache_utils import Cache

    args = tuple(None if isinstance(value, Cache) else value for value in args)
    kwargs = {key: None if isinstance(value, Cache) else value for key, value in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _execution_device(module: nn.Module) -> Optional[torch.device]:
    """The device accelerate runs `module` on (its `_hf_hook`), or None: then its weights' device counts."""
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # a SequentialHook holds several
    devices = [getattr(h, "execution_device", None) for h in hooks]
    device = next((d for d in devices if d is not None), None)
    return None if device is None else torch.device(device if not isinstance(device, int) else f"cuda:{device}")


def _to_side(obj: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Move the reused attention inputs (rotary cos/sin, masks, positions) to the side network's device, and cast the
    floating ones to its dtype."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_side(item, dtype, device) for item in obj)
    if isinstance(obj, list):
        return [_to_side(item, dtype, device) for item in obj]
    if isinstance(obj, dict):
        return {key: _to_side(value, dtype, device) for key, value in obj.items()}
    return obj
