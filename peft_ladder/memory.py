"""Device-independent memory figures: bytes that autograd saves for backward."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class SavedTensorCounter:
    """Counts the distinct activation storages autograd saves for backward (parameters excluded).

    This is the M3 term of the paper's memory model, independent of device and allocator.
    """

    def __init__(self, model: nn.Module) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._param_storages and key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    @contextmanager
    def track(self) -> Iterator["SavedTensorCounter"]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes saved for backward by one forward pass of `model(**batch)` that computes a loss."""
    counter = SavedTensorCounter(model)
    with counter.track():
        loss = model(**batch).loss
    loss.backward()
    return counter.bytes
