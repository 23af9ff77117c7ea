"""Memory figures that mean the same on every machine: bytes saved for backward and peak allocated memory.

* `saved_bytes` / `SavedTensorCounter`: the activations autograd keeps for backward (the paper's M3 term),
  independent of device and allocator.
* `measure_training_step`: one optimizer step under both of the above, the figures the benchmarks and the demo report.
* `storage_bytes`: the bytes a set of tensors holds, each underlying storage counted once.
* `track_peak_memory`: peak allocated tensor memory over a region (typically one full optimizer step). On CUDA it is
  `torch.cuda.max_memory_allocated`. On CPU (and under `FakeTensorMode`) it is a `TorchDispatchMode` that keeps the
  live tensor storages and the peak of their summed bytes: process RSS reads 13-56% above what tensors hold and moves
  5-15% from run to run, while this count is byte-identical across runs and equals `torch.profiler`'s memory events.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class SavedTensorCounter:
    """Counts the activation storages autograd saves for backward (parameters excluded).

    `bytes` is the peak of the saved storages alive at once, which is what the end of the forward pass holds: the
    M3 term of the paper's memory model, independent of device and allocator. Storages are told apart by identity
    and released by weakref finalizers, so a graph branch dropped during the forward does not leave its bytes
    behind, and the count does not depend on where the allocator reuses addresses.
    """

    def __init__(self, model: nn.Module) -> None:
        self._param_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
        self._live: dict[int, int] = {}
        self._finalizers: list[weakref.finalize] = []
        self.current = 0
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = id(storage)
        if storage.data_ptr() not in self._param_storages and key not in self._live:
            self._live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.bytes = max(self.bytes, self.current)
            self._finalizers.append(weakref.finalize(storage, self._release, key))
        return tensor

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    @contextmanager
    def track(self) -> Iterator["SavedTensorCounter"]:
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            for finalizer in self._finalizers:
                finalizer.detach()
            self._finalizers.clear()


def saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes saved for backward by one forward pass of `model(**batch)` that computes a loss."""
    counter = SavedTensorCounter(model)
    with counter.track():
        loss = model(**batch).loss
    loss.backward()
    return counter.bytes


# --- peak allocated memory ------------------------------------------------------------------------------------------

CUDA_METHOD = "torch.cuda.max_memory_allocated (reset at entry, CUDA caching allocator, 512-byte blocks)"
LIVE_STORAGE_METHOD = (
    "live tensor storages (TorchDispatchMode; storages counted when created or first used, released by weakref "
    "finalizers; peak of their summed nbytes)"
)


@dataclass
class PeakMemory:
    """What `track_peak_memory` measured. `peak_bytes` includes `baseline_bytes`, as `max_memory_allocated` does."""

    device: str
    method: str
    peak_bytes: int = 0
    baseline_bytes: int = 0  # held at entry (CUDA: everything allocated; CPU: what could be enumerated, see below)
    end_bytes: int = 0  # still held at exit

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class _LiveStorageTracker(TorchDispatchMode):
    """Sum of the bytes of the live tensor storages on one device type, and its running peak.

    A storage is counted when an op creates it. A storage that existed before the region (parameters, optimizer
    state, the batch) is counted when declared at entry or the first time an op reads it; since it was alive since
    entry, it is added to the running peak as well, so the peak is the same as if it had been declared.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # id(storage) -> nbytes; the storage object is never kept alive by us
        self._finalizers: dict[int, weakref.finalize] = {}

    def add(self, tensor: torch.Tensor, existed_before: bool) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device_type:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            return
        key, nbytes = id(storage), storage.nbytes()
        known = self._live.get(key)
        if known is not None:
            if known != nbytes:  # resized in place (resize_, out= ops)
                self._live[key] = nbytes
                self.current += nbytes - known
                self.peak = max(self.peak, self.current)
            return
        if nbytes == 0:
            return
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = self.peak + nbytes if existed_before else max(self.peak, self.current)
        self._finalizers[key] = weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._finalizers.pop(key, None)

    def close(self) -> None:
        for finalizer in list(self._finalizers.values()):
            finalizer.detach()
        self._finalizers.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in tree_leaves((args, kwargs)):
            self.add(value, existed_before=True)
        out = func(*args, **kwargs)
        for value in tree_leaves(out):
            self.add(value, existed_before=False)
        return out


def held_tensors(
    model: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    tensors: Iterable[torch.Tensor] = (),
) -> list[torch.Tensor]:
    """The tensors a training step holds before it starts: parameters (with bitsandbytes' quantization state),
    gradients, buffers, optimizer state and any extra `tensors` (e.g. the batch)."""
    found: list[torch.Tensor] = list(tensors)
    if model is not None:
        for param in model.parameters():
            found.append(param)
            if param.grad is not None:
                found.append(param.grad)
            found.extend(_attached_tensors(param))
        found.extend(model.buffers())
    if optimizer is not None:
        for state in optimizer.state.values():
            found.extend(v for v in tree_leaves(state) if isinstance(v, torch.Tensor))
    return found


def _attached_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    # bitsandbytes keeps absmax / codebooks on `Params4bit.quant_state` (nested for double quantization), and the
    # int8 scales on `Int8Params.SCB`: memory the weights hold that `parameters()` does not show.
    found, state = [], getattr(param, "quant_state", None)
    while state is not None:
        found.extend(v for v in vars(state).values() if isinstance(v, torch.Tensor))
        state = getattr(state, "state2", None)
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):
        found.append(scb)
    return found


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by `tensors`, each distinct storage counted once at its full size (views, tied weights and
    bitsandbytes' packed buffers share storages). Storages are kept alive while counting, so no id is reused."""
    storages: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages.setdefault(id(storage), storage)
    return sum(storage.nbytes() for storage in storages.values())


def _resolve_device(device: Union[str, torch.device, None], model: Optional[nn.Module]) -> torch.device:
    if device is not None:
        return torch.device(device)
    if model is not None:
        first = next((p for p in model.parameters() if p.device.type != "meta"), None)
        if first is not None:
            return first.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextmanager
def track_peak_memory(
    device: Union[str, torch.device, None] = None,
    *,
    model: Optional[nn.Module] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    tensors: Iterable[torch.Tensor] = (),
) -> Iterator[PeakMemory]:
    """Measure peak allocated tensor memory inside the `with` block; read `.peak_bytes` after it.

    Device: `device`, else the device of `model`'s parameters, else CUDA when available, else CPU.

    On CUDA this is `torch.cuda.max_memory_allocated` (reset at entry), which counts everything allocated.
    On CPU, tensor memory held at entry cannot be enumerated by the allocator, so the count starts from the
    parameters, gradients, buffers and optimizer state of the `model` / `optimizer` you pass (and any extra
    `tensors`); anything else alive at entry is added the first time an op reads it. Pass them to get the figure
    `max_memory_allocated` would give. Memory a kernel allocates internally and frees before returning (scratch
    buffers) is not seen.

    Example:

    ```py
    >>> import torch
    >>> from peft_ladder.memory import track_peak_memory
    >>> weights = torch.zeros(1024)  # 4 KiB held at entry
    >>> with track_peak_memory("cpu", tensors=[weights]) as peak:
    ...     scratch = torch.ones(2048)  # 8 KiB more
    ...     del scratch
    >>> peak.peak_bytes
    12288

    ```
    """
    device = _resolve_device(device, model)
    held = held_tensors(model, optimizer, tensors)
    if device.type == "cuda":
        with _track_cuda(device) as result:
            yield result
        return
    tracker = _LiveStorageTracker(device.type)
    for tensor in held:
        tracker.add(tensor, existed_before=True)
    del held
    result = PeakMemory(device=str(device), method=LIVE_STORAGE_METHOD, baseline_bytes=tracker.current)
    try:
        with tracker:
            yield result
    finally:
        result.peak_bytes, result.end_bytes = tracker.peak, tracker.current
        tracker.close()


@contextmanager
def _track_cuda(device: torch.device) -> Iterator[PeakMemory]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = PeakMemory(device=str(device), method=CUDA_METHOD, baseline_bytes=torch.cuda.memory_allocated(device))
    try:
        yield result
    finally:
        torch.cuda.synchronize(device)
        result.peak_bytes = torch.cuda.max_memory_allocated(device)
        result.end_bytes = torch.cuda.memory_allocated(device)


# --- one training step, measured -------------------------------------------------------------------------------------


@dataclass
class StepMeasurement:
    """What `measure_training_step` measured: peak and entry bytes as `PeakMemory`, M3 as `SavedTensorCounter`."""

    peak_bytes: int
    baseline_bytes: int
    saved_bytes: int
    loss: float
    method: str  # how the peak was measured (`PeakMemory.method`)


def measure_training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    *,
    device: Union[str, torch.device, None] = None,
    loss_fn: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None,
) -> StepMeasurement:
    """Run one training step (forward, backward, `optimizer.step()`, `zero_grad`) and measure its peak memory and
    the activations saved for backward.

    The peak counts everything the step holds (weights, gradients, optimizer state, activations, logits) with
    `track_peak_memory`, starting from `model`, `optimizer` and `batch`; measure a step after the first one, since
    AdamW creates its state in the first. `loss_fn(model, batch)` returns the loss; default `model(**batch).loss`.

    Example:

    ```py
    >>> import torch
    >>> from peft_ladder.memory import measure_training_step
    >>> model = torch.nn.Linear(4, 1)
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> step = measure_training_step(model, optimizer, {"input": torch.ones(2, 4)},
    ...                              loss_fn=lambda m, batch: m(**batch).sum())
    >>> step.peak_bytes >= step.baseline_bytes > 0
    True

    ```
    """
    loss_fn = loss_fn or (lambda m, inputs: m(**inputs).loss)
    counter = SavedTensorCounter(model)
    with track_peak_memory(device, model=model, optimizer=optimizer, tensors=list(batch.values())) as peak:
        with counter.track():
            loss = loss_fn(model, batch)  # the output (and its logits) is dropped before backward, as Trainer does
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.detach().float().item()
    return StepMeasurement(
        peak_bytes=peak.peak_bytes,
        baseline_bytes=peak.baseline_bytes,
        saved_bytes=counter.bytes,
        loss=value,
        method=peak.method,
    )


__all__ = [
    "PeakMemory",
    "SavedTensorCounter",
    "StepMeasurement",
    "held_tensors",
    "measure_training_step",
    "saved_bytes",
    "storage_bytes",
    "track_peak_memory",
]
