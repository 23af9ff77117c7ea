"""The side network's KV cache: extra layer slots in the backbone's own transformers `Cache`.

Side block j is built with `layer_idx = num_layers + j`, so its keys and values live in slot `num_layers + j` of the
cache generation already drives. Everything generation does to a cache (beam reordering, cropping, batch repeat and
select, reset) applies to every slot, so the side stream stays aligned with the backbone without a second object.
"""

from __future__ import annotations

from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    DynamicCache,
    EncoderDecoderCache,
    get_layer_types_and_kwargs,
)


def reserve_side_slots(cache, side_config) -> None:
    """Make sure `cache` has a layer slot for every side block (`side_config.num_hidden_layers` slots in all)."""
    if cache is None:
        return
    if isinstance(cache, EncoderDecoderCache):  # encoder-decoders: self- and cross-attention slots (encdec.py)
        reserve_side_slots(cache.self_attention_cache, side_config)
        reserve_side_slots(cache.cross_attention_cache, side_config)
        return
    if not isinstance(cache, DynamicCache):
        raise NotImplementedError(
            f"Ladder's side network keeps its keys and values in a DynamicCache; got {type(cache).__name__}. "
            "Fix: generate with the default cache (do not set cache_implementation='static' or pass another Cache)."
        )
    if cache.layer_class_to_replicate is not None:
        return  # a lazily grown cache appends slots on first update
    layer_types, layer_kwargs = get_layer_types_and_kwargs(side_config)
    if isinstance(layer_kwargs, dict):  # transformers before per-layer kwargs (5.17 and older): one dict for all
        layer_kwargs = [layer_kwargs] * len(layer_types)
    for index in range(len(cache.layers), len(layer_types)):
        cache.layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_types[index]](**layer_kwargs[index]))
