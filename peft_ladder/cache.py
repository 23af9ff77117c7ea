"""The side network's KV cache: extra layer slots in the backbone's own transformers `Cache`.

Side block j is built with `layer_idx = num_layers + j`, so its keys and values live in slot `num_layers + j` of the
cache generation already drives. Everything generation does to a cache (beam reordering, cropping, batch repeat and
select, reset) applies to every slot, so the side stream stays aligned with the backbone without a second object.

Both cache kinds generation builds work: a `DynamicCache` (the default, also `cache_implementation="offloaded"`) gets
dynamic side slots, a `StaticCache` (`cache_implementation="static"`, `"offloaded_static"`, or one the user passes)
gets static ones of the same length, so the attention mask the backbone builds for its reference layer fits the side
blocks too, and `torch.compile` sees fixed shapes. A slot allocates its tensors on its first update, at the side
blocks' head count and size.
"""

from __future__ import annotations

from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    STATIC_LAYER_TYPE_MAPPING,
    DynamicCache,
    EncoderDecoderCache,
    StaticCache,
    get_layer_types_and_kwargs,
)

SUPPORTED = (DynamicCache, StaticCache)


def reserve_side_slots(cache, side_config) -> None:
    """Make sure `cache` has a layer slot for every side block (`side_config.num_hidden_layers` slots in all)."""
    if cache is None:
        return
    if isinstance(cache, EncoderDecoderCache):  # encoder-decoders: self- and cross-attention slots (encdec.py)
        reserve_side_slots(cache.self_attention_cache, side_config)
        reserve_side_slots(cache.cross_attention_cache, side_config)
        return
    if not isinstance(cache, SUPPORTED):
        raise NotImplementedError(
            "Ladder's side network keeps its keys and values in extra slots of a DynamicCache or a StaticCache; got "
            f"{type(cache).__name__}. Fix: generate with the default cache or cache_implementation='static' (or "
            "pass a DynamicCache or StaticCache)."
        )
    if len(cache.layers) >= side_config.num_hidden_layers:
        return  # decoding: the prefill already added the slots
    if cache.layer_class_to_replicate is not None:
        return  # a lazily grown cache appends slots on first update
    layer_types, layer_kwargs = get_layer_types_and_kwargs(side_config)
    if isinstance(layer_kwargs, dict):  # transformers before per-layer kwargs (5.17 and older): one dict for all
        layer_kwargs = [layer_kwargs] * len(layer_types)
    for index in range(len(cache.layers), len(layer_types)):
        if isinstance(cache, StaticCache):
            cache.layers.append(_static_slot(cache, layer_types[index], layer_kwargs[index]))
        else:
            cache.layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_types[index]](**layer_kwargs[index]))


def _static_slot(cache: StaticCache, layer_type: str, kwargs: dict):
    """A static side slot as long as the backbone's slots of the same kind.

    A side block's layer type is its reference layer's (`backbone.side_config`), so the backbone has a slot of that
    class: its `max_cache_len` (a sliding slot's is already min(window, cache length)) sizes the side slot.
    """
    layer_class = STATIC_LAYER_TYPE_MAPPING[layer_type]
    template = next((layer for layer in cache.layers if type(layer) is layer_class), None)
    if template is None:
        raise NotImplementedError(
            f"Ladder's side blocks need a {layer_class.__name__} slot ({layer_type!r}, the type of the backbone layer "
            f"whose attention inputs they reuse), but this StaticCache has none (its slots: "
            f"{sorted({type(layer).__name__ for layer in cache.layers})}). Fix: build the StaticCache from the "
            "model's own config (StaticCache(config=model.config, max_cache_len=...)), or generate with the default "
            "DynamicCache."
        )
    slot = layer_class(max_cache_len=template.max_cache_len, **kwargs)
    if hasattr(template, "_is_croppable"):  # a sliding slot: croppable only if the whole cache fits in its window
        slot._is_croppable = template._is_croppable
    return slot
