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

The tuner wraps every decoder layer in a `LadderTapLayer` (the no-grad boundary) and the final norm in a
`LadderFusionLayer` that owns each adapter's `LadderSideNetwork`. Because the logic lives in those layers, the
model's own forward (and TRL's fused-head forward, `generate`, and the base model's loss) run unchanged.
"""

from __future__ import annotations

import re
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ._registration import LADDER_PREFIX
from .backbone import Backbone, base_module, find_backbone, reference_layer_index, side_config
from .config import LadderConfig
from .connections import resolve_plan
from .hub import MODEL_TAGS
from .layer import LadderFusionLayer, LadderLayer, LadderTapLayer, TapBuffer
from .loss import chunked_causal_lm_forward, chunking_blocker
from .quantization import prepare_backbone
from .side_network import LadderSideNetwork

_ADAPTER_KEY = r"((?:^|\.)" + LADDER_PREFIX + r"[^.]*)\.{adapter}(?=\.|$)"


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

    # --- which modules are wrapped ----------------------------------------------------------------------------------

    def _backbone(self) -> Backbone:
        return find_backbone(self.model)

    def _prepare_adapter_config(self, peft_config: LadderConfig, model_config: dict) -> LadderConfig:
        # Validate against this model before any module is replaced, so a bad config leaves the model untouched.
        backbone = self._backbone()
        plan = resolve_plan(peft_config.connections, backbone.num_layers, peft_config.side_layers, peft_config.xladder_depth)
        side = side_config(backbone.config, backbone.num_layers, plan.side_blocks, peft_config.reduction_factor)
        prepare_backbone(self.model, peft_config)  # quantize as configured, or record the backbone's quantization
        # What `_create_and_replace` needs for this adapter, worked out once instead of once per wrapped module.
        self.__dict__["_ladder_setup"] = (backbone, plan, side)
        self.__dict__["_ladder_targets"] = {name: i for i, name in enumerate(backbone.layer_names)}
        self.__dict__["_ladder_targets"][backbone.norm_name] = None
        return peft_config

    def _check_target_module_exists(self, peft_config: LadderConfig, key: str) -> bool:
        return key in self.__dict__["_ladder_targets"]

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict] = None) -> None:
        # A state_dict only tells PEFT which modules hold weights; Ladder must also wrap the weightless taps.
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict=None)

    def _create_and_replace(self, peft_config: LadderConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        backbone, plan, config = self.__dict__["_ladder_setup"]
        layer_index = self.__dict__["_ladder_targets"][current_key]
        if layer_index is not None:
            if not isinstance(target, LadderTapLayer):
                reference = layer_index == reference_layer_index(backbone.config, backbone.num_layers)
                target = self._swap(parent, target_name, LadderTapLayer(target, layer_index, self._buffer(), reference))
            target.ladder_taps[adapter_name] = tuple(i for i in (layer_index, layer_index + 1) if i in plan.tap_indices)
            return
        block_cls = type(base_module(self.model.get_submodule(backbone.layer_names[0])))
        side = LadderSideNetwork(plan, backbone.hidden_size, config, block_cls, peft_config.gate,
                                 peft_config.gate_temperature, peft_config.init_weights)
        if not isinstance(target, LadderFusionLayer):
            target = self._swap(parent, target_name, LadderFusionLayer(target, self._buffer(), parent))
        target.update_layer(adapter_name, side)

    def _swap(self, parent: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
        self._replace_module(parent, name, new_module, new_module.base_layer)
        return new_module

    def _buffer(self) -> TapBuffer:
        buffer = self.__dict__.get("_ladder_buffer")
        if buffer is None:
            existing = (m.buffer for m in self.model.modules() if isinstance(m, (LadderTapLayer, LadderFusionLayer)))
            buffer = self.__dict__["_ladder_buffer"] = next(existing, None) or TapBuffer()
        return buffer

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # Ladder wraps whole decoder layers and the norm; there is no `.weight` to rebind as LoRA does.
        setattr(parent, child_name, new_module)

    def _post_injection_hook(self, model: nn.Module, config: LadderConfig, adapter_name: str) -> None:
        # PEFT's model card lists the base model's tags: mark the adapter as a Ladder one on the Hub.
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(list(MODEL_TAGS))

    # --- the training loss ------------------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        # Training with labels: the loss over token chunks without the full logits (LadderConfig.loss_chunk_size,
        # loss.py), the same loss and gradients. Anything else, or a model whose loss the chunks would not reproduce,
        # runs the model's own forward unchanged.
        chunk_size = self._loss_chunk_size()
        if chunk_size is None or chunking_blocker(self.model, kwargs) is not None:
            return self.model.forward(*args, **kwargs)
        return chunked_causal_lm_forward(self.model, chunk_size, *args, **kwargs)

    def _loss_chunk_size(self) -> Optional[int]:
        if self._buffer().active_side() is None:
            return None  # adapter disabled: the plain base model, logits included
        return getattr(self.peft_config.get(self.active_adapters[0]), "loss_chunk_size", None)

    # --- what PEFT may and may not do ---------------------------------------------------------------------------------

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(
            "merge_and_unload() is not possible with Ladder: the side network is a separate network fed by the "
            "backbone's hidden states, not a weight delta. Use `model.unload()` to get the plain base model back, or "
            "keep the adapter attached for inference."
        )

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        for module in self.model.modules():
            if isinstance(module, LadderFusionLayer):
                module.guard.remove()
        return super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # `...norm.ladder_side.<adapter>.blocks.0...` -> `...norm.ladder_side.blocks.0...`: the adapter name sits in
        # the middle of deep keys, where PEFT's default (last or second-to-last component) does not look.
        return re.sub(_ADAPTER_KEY.format(adapter=re.escape(adapter_name)), r"\1", key)


__all__ = ["LadderModel"]
