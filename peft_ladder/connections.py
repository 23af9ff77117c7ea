"""Connection plans: which backbone layer feeds which side block.

Indices are 0-based, as in `model.model.layers[i]` (the paper counts from 1). Hidden states are indexed like
transformers' `output_hidden_states`: `hidden[0]` enters layer 0 (the embedding output), `hidden[i + 1]` leaves
layer `i`. A plan needs `hidden[source]` for the side stream's start `s_0` and `hidden[i + 1]` for every connection.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Mapping, Union

ConnectionSpec = Union[str, Mapping[int, int]]
PRESETS = ("ladder", "xladder")


@dataclass(frozen=True)
class ConnectionPlan:
    """A resolved connection plan for a backbone of `num_layers` layers and a side network of `side_blocks` blocks."""

    num_layers: int
    side_blocks: int
    block_to_layer: dict[int, int]  # side block j -> backbone layer i whose output it receives

    @property
    def source(self) -> int:
        """Hidden-state index that seeds the side stream: the input of the first connected backbone layer."""
        return min(self.block_to_layer.values())

    @property
    def tap_indices(self) -> tuple[int, ...]:
        """All hidden-state indices the side network reads, in backbone order."""
        return tuple(sorted({self.source} | {layer + 1 for layer in self.block_to_layer.values()}))


def normalize_connections(connections: ConnectionSpec) -> ConnectionSpec:
    """Return a preset name or a `{backbone_layer: side_block}` dict with int keys (JSON turns keys into strings)."""
    if isinstance(connections, str):
        if connections not in PRESETS:
            raise ValueError(
                f"connections={connections!r} is not a preset; use one of {PRESETS} or an explicit "
                "{backbone_layer: side_block} dict such as {0: 0, 1: 1}."
            )
        return connections
    if not isinstance(connections, Mapping) or not connections:
        raise ValueError(
            f"connections={connections!r} must be 'ladder', 'xladder' or a non-empty {{backbone_layer: side_block}} "
            "dict such as {0: 0, 1: 1}."
        )
    mapping = {_index(layer, json_key=True): _index(block) for layer, block in connections.items()}
    if None in mapping or None in mapping.values() or len(mapping) != len(connections):
        raise ValueError(
            f"connections={connections!r} must map integer backbone layers to integer side blocks, e.g. {{0: 0, 1: 1}}."
        )
    negative = {k: v for k, v in mapping.items() if k < 0 or v < 0}
    if negative:
        raise ValueError(f"connections={connections!r} has negative indices {negative}; indices are 0-based and >= 0.")
    blocks = list(mapping.values())
    doubled = sorted({b for b in blocks if blocks.count(b) > 1})
    if doubled:
        into = {b: sorted(k for k, v in mapping.items() if v == b) for b in doubled}
        raise ValueError(
            f"connections={connections!r} sends several backbone layers into one side block ({into}); each side "
            "block takes at most one backbone layer. Fix: give each backbone layer its own side block."
        )
    return mapping


def _index(value: object, json_key: bool = False) -> int | None:
    """An int index, or None for anything else (True, 1.5, "1" except as a key: JSON writes keys as strings)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if json_key and isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    return None


def default_side_blocks(connections: ConnectionSpec, num_layers: int) -> int:
    """The number of side blocks when `side_layers` is not given: one per backbone layer, or what the map needs."""
    if isinstance(connections, str):
        return num_layers
    return max(connections.values()) + 1


def check_sizes(connections: ConnectionSpec, side_blocks: int | None, xladder_depth: int | None) -> None:
    """The rules between `connections`, `side_layers` and `xladder_depth` that hold whatever the model."""
    if side_blocks is None:
        return
    if isinstance(connections, Mapping) and max(connections.values()) >= side_blocks:
        needed = max(connections.values()) + 1
        raise ValueError(
            f"side_layers={side_blocks} is below the {needed} side blocks that connections={connections} uses; set "
            f"side_layers >= {needed} or leave it unset."
        )
    if connections == "xladder" and xladder_depth is not None and xladder_depth > side_blocks:
        raise ValueError(
            f"xladder_depth={xladder_depth} exceeds side_layers={side_blocks}; the first xladder_depth side blocks are "
            f"the connected ones. Choose xladder_depth <= {side_blocks} or raise side_layers."
        )


def resolve_plan(
    connections: ConnectionSpec, num_layers: int, side_blocks: int | None, xladder_depth: int | None
) -> ConnectionPlan:
    """Turn a preset or explicit map into a `ConnectionPlan` for a backbone with `num_layers` layers."""
    connections = normalize_connections(connections)
    check_sizes(connections, side_blocks, xladder_depth)
    if side_blocks is None:
        side_blocks = default_side_blocks(connections, num_layers)
    if connections == "ladder":
        # Standard LST/QST ladder: side block i reads backbone layer i ("Ladder@l" connects the first l layers).
        block_to_layer = {i: i for i in range(min(side_blocks, num_layers))}
    elif connections == "xladder":
        depth = xladder_depth if xladder_depth is not None else max(1, side_blocks // 2)
        if depth > num_layers:
            given = "" if xladder_depth is not None else f" (the default, side_layers={side_blocks} // 2)"
            raise ValueError(
                f"xladder_depth={depth}{given} exceeds the backbone's {num_layers} layers; "
                f"choose xladder_depth <= {num_layers}."
            )
        # xLadder: the last `depth` backbone layers feed the first `depth` side blocks; the rest add depth.
        block_to_layer = {k: num_layers - depth + k for k in range(depth)}
    else:
        missing = sorted(layer for layer in connections if layer >= num_layers)
        if missing:
            raise ValueError(
                f"connections={connections!r} names backbone layers {missing}, but the model has {num_layers} layers "
                f"(valid: 0..{num_layers - 1})."
            )
        block_to_layer = {block: layer for layer, block in connections.items()}
    return ConnectionPlan(
        num_layers=num_layers, side_blocks=side_blocks, block_to_layer=dict(sorted(block_to_layer.items()))
    )
