"""`LadderConfig.mlp_chunk_size`: the frozen backbone's MLPs run over chunks of the sequence.

Once the side blocks are checkpointed and the taps kept at the backbone's precision, what sets a Ladder step's peak at
long context is the frozen backbone's forward itself: each layer's MLP holds three (tokens x intermediate) tensors at
once (act(gate), up and their product; 84 KiB per token at Llama-3.1-8B). The backbone runs without grad and keeps
nothing, so running the MLP over chunks of the sequence frees each chunk's activations before the next:
(chunk x intermediate) instead. Measured and modelled in docs/benchmarks.md ("Planner targets").
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Optional

import torch
from torch import nn


def check_mlp_chunking(model: nn.Module, layer_names: tuple[str, ...], chunk: Optional[int]) -> None:
    """Refuse `LadderConfig.mlp_chunk_size` on a backbone whose layers have no `mlp` module to run in chunks."""
    if chunk is None:
        return
    layer = model.get_submodule(layer_names[0])
    layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    if not isinstance(getattr(layer, "mlp", None), nn.Module):
        raise ValueError(
            f"mlp_chunk_size={chunk}: the layers of {type(model).__name__} ({type(layer).__name__}) have no `mlp` "
            "module to run in chunks (supported: layers with an `mlp`, e.g. Llama, Qwen, Mistral, Gemma, GPT-2, "
            "ModernBERT). Set mlp_chunk_size=None."
        )


def chunked_mlp(layer: nn.Module, chunk: Optional[int], hidden_states: torch.Tensor) -> ContextManager[None]:
    """While `layer` runs, its `mlp` runs over chunks of `chunk` tokens (dim -2) and concatenates the outputs.

    The same outputs up to float rounding: an MLP acts on each token alone. The frozen layer runs without grad,
    so each chunk's (chunk x intermediate) activations are freed before the next: the forward's MLP working set
    shrinks by tokens / chunk. The chunked forward is set on the instance for this call only (it wraps whatever
    forward the module has, e.g. accelerate's hook) and removed after.
    """
    if chunk is None or hidden_states.shape[-2] <= chunk:
        return nullcontext()  # every call of every tap layer: decoding steps included, so no generator here
    return _in_chunks(layer.mlp, chunk)


@contextmanager
def _in_chunks(mlp: nn.Module, chunk: int) -> Iterator[None]:
    own = mlp.__dict__.get("forward")  # an instance forward (accelerate's hook) to put back, or None
    forward = mlp.forward

    def run_in_chunks(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # contiguous: a chunk of a batch is a strided view, which some MLPs (GPT-2's Conv1D) cannot `.view`
        parts = [forward(part.contiguous(), *args, **kwargs) for part in hidden.split(chunk, dim=-2)]
        if not all(isinstance(part, torch.Tensor) for part in parts):
            raise TypeError(
                f"mlp_chunk_size={chunk}: {type(mlp).__name__} returns {type(parts[0]).__name__}, not a tensor (a "
                "mixture-of-experts block?), so its outputs cannot be joined. Set mlp_chunk_size=None."
            )
        return torch.cat(parts, dim=-2)

    mlp.forward = run_in_chunks
    try:
        yield
    finally:
        if own is None:
            del mlp.forward
        else:
            mlp.forward = own
