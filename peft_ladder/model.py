"""`LadderModel`: the PEFT tuner that attaches Ladder / xLadder side networks to a frozen decoder.

Paper: "Ladder Up, Memory Down: Low-Cost Fine-Tuning With Side Nets" (Zheng, Cerisara et al., arXiv 2512.14237),
after Ladder Side Tuning (Sung et al., 2022) and QST (Zhang et al., 2024).

```
 tokens -> embed -> [layer 0] -> [layer 1] -> ... -> [layer L-1] -> h_L --(+)--> final norm -> LM / score head
              |          |           |                    |                ^
              |       down_0      down_1               down_..             |     frozen, run without grad
 .............|..........|...........|....................|................|.................................
              v          v           v                    v                |     trainable side path
          s_0 ----> [side 0] --> [side 1] --> ... --> [side l-1] --> up ---+
```

The tuner wraps every decoder layer in a `LadderTapLayer` and the final norm in a `LadderFusionLayer` that owns each
adapter's `LadderSideNetwork`, and puts a `BackboneGuard` (the no-grad boundary) on the decoder. Because the logic
lives in those layers, the model's own forward (and TRL's fused-head forward, `generate`, and the base model's loss)
run unchanged.

How PEFT's hooks are used, per adapter: `_prepare_adapter_config` validates the config against this model and
resolves it (`AdapterSetup`); `_prepare_model` quantizes the backbone if the config asks; `_create_and_replace` wraps
each target; `_post_injection_hook` installs the guard (once per model; `unload()` removes it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import encdec
from ._registration import LADDER_PREFIX
from .backbone import Backbone, base_module, find_backbone, reference_layer_index, side_config
from .config import LadderConfig
from .connections import ConnectionPlan, resolve_plan
from .hub import MODEL_TAGS
from .layer import BackboneGuard, ForwardState, LadderFusionLayer, LadderLayer, LadderTapLayer
from .load_checks import check_saved_tensors, expected_tensor_shapes
from .loss import chunked_causal_lm_forward, chunking_blocker
from .mlp_chunks import check_mlp_chunking
from .options import check_modules_to_save
from .quantization import describe, prepare_backbone
from .side_init import check_supported, prepare_side_init
from .side_network import LadderSideNetwork, check_down_rank
from .tokens import TokenTargets, folded_head_weight, resolve_token_targets

_ADAPTER_KEY = r"((?:^|\.)" + LADDER_PREFIX + r"[^.]*)\.{adapter}(?=\.|$)"


@dataclass
class AdapterSetup:
    """What wrapping the model for one adapter needs, worked out once instead of once per wrapped module."""

    backbone: Backbone
    plan: ConnectionPlan
    side_config: object  # the backbone's decoder config at side width
    reference_index: int  # the layer whose attention inputs the side blocks reuse
    targets: dict[str, Optional[int]]  # module name -> decoder layer index; None for the final norm
    state: ForwardState  # shared by all Ladder layers of the model
    tokens: Optional[TokenTargets]  # LadderConfig.trainable_token_indices on this model (tokens.py)
    side: Optional[LadderSideNetwork] = None  # built by the first `_create_and_replace`, inside PEFT's init context
    # Encoder-decoders (encdec.py): the encoder's plan and side config, and the encoder layers' names.
    encoder_plan: Optional[ConnectionPlan] = None
    encoder_side_config: object = None
    encoder_targets: frozenset[str] = frozenset()
    reference_names: frozenset[str] = frozenset()  # the layers whose attention inputs the side blocks reuse

    @classmethod
    def resolve(cls, model: nn.Module, config: LadderConfig) -> AdapterSetup:
        """Raise a ValueError if `config` does not fit `model`; nothing is changed."""
        backbone = find_backbone(model)
        if backbone.kind == "encoder" and config.quantization is not None:
            raise ValueError(
                f"LadderConfig(quantization={config.quantization!r}) is not supported on encoder backbones yet "
                f"({type(model).__name__}): the quantizer would also turn the classifier head that modules_to_save "
                "trains into 4-bit weights. Set quantization=None."
            )
        if backbone.encoder is not None:
            encdec.check_config(model, config)
        kind = "encoder-decoder" if backbone.encoder is not None else backbone.kind
        check_modules_to_save(model, config.modules_to_save, backbone.frozen_names, kind)
        plan = resolve_plan(config.connections, backbone.num_layers, config.side_layers, config.xladder_depth)
        targets: dict[str, Optional[int]] = {name: i for i, name in enumerate(backbone.layer_names)}
        targets[backbone.norm_name] = None
        existing = (m.forward_state for m in model.modules() if isinstance(m, LadderLayer))
        if backbone.encoder is not None:
            return cls._resolve_seq2seq(model, config, backbone, plan, targets, next(existing, None))
        shrunk = side_config(backbone.config, backbone.num_layers, plan.side_blocks, config.reduction_factor)
        quantized = config.quantization is not None or describe(model) is not None
        check_supported(backbone, shrunk, config.side_init, quantized)
        check_down_rank(config.down_rank, int(shrunk.hidden_size), config.reduction_factor)
        check_mlp_chunking(model, backbone.layer_names, config.mlp_chunk_size)
        tokens = resolve_token_targets(model, config.trainable_token_indices)
        setup = cls(
            backbone,
            plan,
            shrunk,
            reference_layer_index(backbone.config, backbone.num_layers),
            targets,
            next(existing, None) or ForwardState(),
            tokens,
        )
        setup.reference_names = frozenset({backbone.layer_names[setup.reference_index]})
        setup.check_saved_weights(model, config)
        return setup

    @classmethod
    def _resolve_seq2seq(cls, model, config, backbone, plan, targets, state) -> AdapterSetup:
        """Encoder-decoders: a plan and side config per stack, the encoder's layers tapped too (encdec.py)."""
        stack, r = backbone.encoder, config.reduction_factor
        encoder_plan = resolve_plan(config.connections, stack.num_layers, config.side_layers, config.xladder_depth)
        targets.update({name: i for i, name in enumerate(stack.layer_names)})
        setup = cls(
            backbone,
            plan,
            encdec.seq2seq_side_config(backbone.config, backbone.num_layers, plan.side_blocks, r),
            reference_layer_index(backbone.config, backbone.num_layers),
            targets,
            state or encdec.Seq2SeqState(),
            None,
            encoder_plan=encoder_plan,
            encoder_side_config=encdec.seq2seq_side_config(stack.config, stack.num_layers, encoder_plan.side_blocks, r),
            encoder_targets=frozenset(stack.layer_names),
            reference_names=frozenset({backbone.layer_names[-1], stack.layer_names[-1]}),
        )
        for side in (setup.encoder_side_config, setup.side_config):
            check_down_rank(config.down_rank, int(side.hidden_size), r)
        setup.check_saved_weights(model, config)
        return setup

    def check_saved_weights(self, model: nn.Module, config: LadderConfig) -> None:
        """Compare the weights LadderConfig.from_pretrained found next to the config with the side network to build."""
        saved, config.saved_weights = config.saved_weights, None  # checked once, for the load it was read for
        if saved is not None:
            folder, shapes = saved
            expected = expected_tensor_shapes(lambda: self.build_side(model, config), self.backbone.norm_name)
            layers = self.backbone.num_layers
            check_saved_tensors(shapes, expected, folder, layers, config, "The base model is unchanged.")

    def build_side(self, model: nn.Module, config: LadderConfig) -> LadderSideNetwork:
        if self.backbone.encoder is not None:
            plans, configs = (self.encoder_plan, self.plan), (self.encoder_side_config, self.side_config)
            return encdec.build_side(model, self.backbone, plans, config, configs)
        block_cls = type(base_module(model.get_submodule(self.backbone.layer_names[0])))
        return LadderSideNetwork(
            self.plan,
            self.backbone.hidden_size,
            self.side_config,
            block_cls,
            config.gate,
            config.gate_temperature,
            config.init_weights,
            config.fusion_scale,
            self.tokens,
            config.down_rank,
        )

    def side_network(self, model: nn.Module, config: LadderConfig, adapter_name: str) -> LadderSideNetwork:
        if self.side is None:
            self.side = self.build_side(model, config)
            prepare_side_init(self.side, model, config.side_init, adapter_name)  # LadderConfig.side_init
            self.side.set_memory_options(config.side_checkpointing, config.saved_taps, config.mlp_chunk_size)
        return self.side

    def tap_side(self, name: str, model: nn.Module, config: LadderConfig, adapter_name: str) -> LadderSideNetwork:
        """The side network that reads the taps of layer `name`: an encoder-decoder's encoder taps feed its encoder."""
        side = self.side_network(model, config, adapter_name)
        return side.encoder if name in self.encoder_targets else side


class LadderModel(BaseTuner):
    """Creates a Ladder side-network model from a transformers decoder. Use it through `peft.get_peft_model`.

    Example:

    ```py
    >>> from transformers import AutoModelForCausalLM
    >>> from peft import get_peft_model
    >>> from peft_ladder import LadderConfig
    >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")  # doctest: +SKIP
    >>> model = get_peft_model(model, LadderConfig(task_type="CAUSAL_LM", connections="xladder"))  # doctest: +SKIP
    ```
    """

    prefix: str = LADDER_PREFIX
    tuner_layer_cls = LadderLayer
    target_module_mapping: dict = {}
    adapter_setup: Optional[AdapterSetup] = None  # the adapter being injected; None between injections
    guard: Optional[BackboneGuard] = None  # the no-grad boundary around the decoder, one per model

    # --- wrapping the model, one adapter at a time ------------------------------------------------------------------

    def _backbone(self) -> Backbone:
        return find_backbone(self.model)

    def _prepare_adapter_config(self, peft_config: LadderConfig, model_config: dict) -> LadderConfig:
        # Validate against this model before it is quantized or any module replaced: a bad config leaves it untouched.
        self.adapter_setup = AdapterSetup.resolve(self.model, peft_config)
        # The token rows live in the side network. PEFT would also act on the field (a TrainableTokensWrapper around
        # the embedding, which runs inside the no-grad backbone and never learns): it sees None until
        # `inject_adapter` puts the value back, so the saved config keeps it.
        peft_config.trainable_token_indices = None
        return peft_config

    def _prepare_model(self, peft_config: LadderConfig, model: nn.Module) -> None:
        prepare_backbone(model, peft_config)  # quantize as configured, or record the backbone's quantization

    def _check_target_module_exists(self, peft_config: LadderConfig, key: str) -> bool:
        return key in self.adapter_setup.targets

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict] = None,
    ) -> None:
        # A state_dict only tells PEFT which modules hold weights; Ladder must also wrap the weightless taps.
        config = self.peft_config[adapter_name]
        token_indices = config.trainable_token_indices  # hidden from PEFT by `_prepare_adapter_config`
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict=None)
        finally:
            config.trainable_token_indices = token_indices
            self.adapter_setup = None  # the side network now lives in the fusion layer only

    def _create_and_replace(
        self,
        peft_config: LadderConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        setup = self.adapter_setup
        layer_index = setup.targets[current_key]
        if layer_index is None and not isinstance(target, LadderFusionLayer):
            at_output = setup.backbone.fusion == "output"
            target = self._swap(parent, target_name, LadderFusionLayer(target, setup.state, at_output))
        elif layer_index is not None and not isinstance(target, LadderTapLayer):
            reference = current_key in setup.reference_names
            target = self._swap(parent, target_name, LadderTapLayer(target, layer_index, setup.state, reference))
        target.update_layer(adapter_name, setup.tap_side(current_key, self.model, peft_config, adapter_name))
        if layer_index is None and target.at_output:
            # A post-norm encoder's taps sit inside its fusion layer (`bert.encoder`), and PEFT skips the modules
            # inside an existing tuner layer: adapters after the first reach the taps from here.
            for name, index in setup.targets.items():
                tap = self.model.get_submodule(name) if index is not None else None
                if isinstance(tap, LadderTapLayer):
                    tap.update_layer(adapter_name, setup.tap_side(name, self.model, peft_config, adapter_name))

    def _swap(self, parent: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
        self._replace_module(parent, name, new_module, new_module.base_layer)
        return new_module

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Ladder wraps whole decoder layers and the norm; there is no `.weight` to rebind as LoRA does.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: LadderConfig, adapter_name: str) -> None:
        # Adapters added later (add_adapter, load_adapter) reuse the guard installed here; unload() removes it.
        name, fusion = next((n, m) for n, m in model.named_modules() if isinstance(m, LadderFusionLayer))
        if getattr(model.config, "is_encoder_decoder", False):
            self.guard = encdec.install_guards(model, fusion, find_backbone(model))
        else:
            decoder = model.get_submodule(name.rpartition(".")[0])  # the final norm's parent
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            self.guard = fusion.install_guard(decoder, model.get_input_embeddings(), head)
        # PEFT's model card lists the base model's tags: mark the adapter as a Ladder one on the Hub.
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(list(MODEL_TAGS))

    # --- the training loss ------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        # Training with labels: the loss over token chunks without the full logits (LadderConfig.loss_chunk_size,
        # loss.py), the same loss and gradients. Anything else, or a model whose loss the chunks would not reproduce,
        # runs the model's own forward unchanged.
        if getattr(self.model.config, "is_encoder_decoder", False):
            # Called, not `.forward`: the EncoderGuard's model hooks carry the side memory (encdec.py).
            return self.model(*args, **kwargs)
        side = self.guard.fusion.active_side() if self.guard is not None else None
        tokens = side.tokens if side is not None else None
        if tokens is not None and kwargs.get("fused_lm_head"):
            return self._forward_with_folded_head(tokens, *args, **kwargs)
        chunk_size = self._loss_chunk_size(side)
        if chunk_size is None or chunking_blocker(self.model, kwargs) is not None:
            if self.guard is not None and self.guard.decoder is self.model:
                # A bare encoder or decoder (AutoModel, FEATURE_EXTRACTION) is the guarded module itself: call it,
                # not its `.forward` as PEFT does, so the guard's hooks (the no-grad boundary) run.
                return self.model(*args, **kwargs)
            return self.model.forward(*args, **kwargs)
        head_rows = tokens.head() if tokens is not None else None
        return chunked_causal_lm_forward(self.model, chunk_size, *args, head_rows=head_rows, **kwargs)

    def _forward_with_folded_head(self, tokens, *args, **kwargs):
        # TRL's fused LM head multiplies by `lm_head.weight` without calling the module, past the head-rows hook: it
        # gets the weight with the rows added for this one call (tokens.folded_head_weight).
        with folded_head_weight(self.model, tokens) as weights:
            if weights is None:
                return self.model.forward(*args, **kwargs)
            return torch.func.functional_call(self.model, weights, args, kwargs, tie_weights=False, strict=False)

    def _loss_chunk_size(self, side: Optional[LadderSideNetwork]) -> Optional[int]:
        if side is None:
            return None  # adapter disabled: the plain base model, logits included
        return getattr(self.peft_config.get(self.active_adapters[0]), "loss_chunk_size", None)

    # --- what PEFT may and may not do ---------------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "merge_and_unload() is not possible with Ladder: the side network is a separate network fed by the "
            "backbone's hidden states, not a weight delta. Use `model.unload()` to get the plain base model back, or "
            "keep the adapter attached for inference."
        )

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        if self.guard is not None:
            self.guard.fusion.remove_guard()
            self.guard = None
        model = super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)
        # A post-norm encoder's taps sit inside its fusion layer, which PEFT unwraps first and then cannot find them
        # under their wrapped names: unwrap what is left.
        for name, module in list(model.named_modules()):
            if isinstance(module, LadderTapLayer):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.get_base_layer())
        return model

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        # PEFT loads with strict=False: missing keys only warn and unexpected ones pass silently (a partial load).
        expected = {
            cls._checkpoint_key(key, adapter_name): tuple(tensor.shape)
            for key, tensor in model.state_dict().items()
            if f".ladder_side.{adapter_name}." in key
        }
        saved = {cls._checkpoint_key(key, ""): tuple(tensor.shape) for key, tensor in state_dict.items()}
        layers = find_backbone(model.get_base_model() if hasattr(model, "get_base_model") else model).num_layers
        check_saved_tensors(saved, expected, "this state dict", layers, config, "Nothing was loaded.")
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    @classmethod
    def _checkpoint_key(cls, key: str, adapter_name: str) -> str:
        key = cls._remove_adapter_name_from_key(key, adapter_name) if adapter_name else key
        return key if key.startswith("base_model.model.") else "base_model.model." + key

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # `...norm.ladder_side.<adapter>.blocks.0...` -> `...norm.ladder_side.blocks.0...`: the adapter name sits in
        # the middle of deep keys, where PEFT's default (last or second-to-last component) does not look.
        return re.sub(_ADAPTER_KEY.format(adapter=re.escape(adapter_name)), r"\1", key)


__all__ = ["LadderModel"]
