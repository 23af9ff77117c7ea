"""New tokens with Ladder: trainable rows for chosen token ids on the side path (`trainable_token_indices`).

PEFT's `trainable_token_indices` (LoRA) trains embedding rows of the listed ids in place. With Ladder the embedding
runs inside the frozen, no-grad backbone, so a row there would never learn. The side network holds the rows instead:

```
 ids --> embed --> ... hidden[source] ... --> [frozen decoder] --> h_L --(+ side)--> norm --> h --> lm_head --> logits
                           |                                          ^                     |                  ^
                           v                                          |                     |                  |
 ids ----> + input_rows[id] at listed ids --> down --> s_0 --> side blocks --> up            +-- h @ head_rows^T -+
                                                                                                (listed ids' columns)
```

* input rows (n_in, d): added to the hidden state that seeds the side stream, `hidden[source]` (the embedding output
  for the `ladder` preset), at the positions holding a listed id, before the down-projection: the side stream reads
  the new tokens from the first step on.
* head rows (n_head, d): logits of the listed ids = h @ (W[ids] + head_rows)^T after the fusion, so the new tokens
  can be predicted. Applied by a hook on the output embedding (plain logits, `generate`), inside the chunked loss
  (`loss.py`) and, for TRL's fused LM head (which reads `lm_head.weight` directly), by handing it W with the rows
  added (`folded_head_weight`).

Both start at zero, so a fresh adapter with token rows is still an exact identity. With tied embeddings the two are
still separate parameters (PEFT ties its rows): they act in different places, before a down-projection and in the
head. They are parameters of the adapter's side network (`ladder_side.<adapter>.tokens.*`): saved, loaded, switched
and disabled with it; the ids come from the config and are not saved.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

TokenIndices = Union[list[int], dict[str, list[int]]]  # LadderConfig.trainable_token_indices

_FORMS = "a list of token ids (e.g. [128000, 128001]) or a {module_name: [ids]} dict such as {'embed_tokens': [...]}"


def check_token_indices(value: Any) -> None:
    """Raise a ValueError unless `value` has the shape `trainable_token_indices` takes; the model is not needed."""
    if value is None:
        return
    groups = value.items() if isinstance(value, dict) else [(None, value)]
    if isinstance(value, dict) and not value:
        raise ValueError(f"trainable_token_indices={value!r} is empty; use {_FORMS}, or None.")
    for key, ids in groups:
        where = "trainable_token_indices" if key is None else f"trainable_token_indices[{key!r}]"
        if key is not None and not (isinstance(key, str) and key):
            raise ValueError(f"trainable_token_indices has the key {key!r}; keys are module names, use {_FORMS}.")
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"{where}={ids!r} must be a non-empty list of token ids; use {_FORMS}.")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(f"{where} has {bad!r}, which are not token ids (integers >= 0); use {_FORMS}.")


@dataclass(frozen=True)
class TokenTargets:
    """What `trainable_token_indices` means on one model: the ids that get input rows and those that get head rows."""

    input_ids: tuple[int, ...]
    head_ids: tuple[int, ...]


def _unique(ids) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids))  # TRL extends the list in place: an id may come twice


def _module_named(model: nn.Module, key: str) -> Optional[nn.Module]:
    return next((m for n, m in model.named_modules() if n == key or n.endswith("." + key)), None)


def _rows_of(module: nn.Module) -> int:
    return int(module.weight.shape[0])


def resolve_token_targets(model: nn.Module, value: Optional[TokenIndices]) -> Optional[TokenTargets]:
    """Map `trainable_token_indices` onto `model`'s input and output embeddings; ValueError if it does not fit.

    A list, or the ids under the input embedding's name, get input rows and head rows (a new token must be read and
    predicted); ids under the output embedding's name get head rows only. A model without an output embedding (a
    classifier) takes input rows only and refuses a key naming a head.
    """
    if value is None:
        return None
    check_token_indices(value)
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    embedding_name = names.get(id(embedding), "the input embedding")
    groups = value.items() if isinstance(value, dict) else [(embedding_name, value)]
    input_ids, head_ids = [], []
    for key, ids in groups:
        module = embedding if key == embedding_name else _module_named(model, key)
        if module is embedding:
            input_ids += ids
            head_ids += ids if head is not None else []
        elif module is not None and module is head:
            head_ids += ids
        else:
            outputs = f" or its output embedding {names.get(id(head))!r}" if head is not None else ""
            # A classifier or embedding model (e.g. BERT for SEQ_CLS) has no LM head: its ids only get input rows.
            no_head = "" if head is not None else f" ({type(model).__name__} has no LM head: ids get input rows only)"
            found = "names no module of" if module is None else "names a module that is no token embedding of"
            raise ValueError(
                f"trainable_token_indices key {key!r} {found} {type(model).__name__}. Ladder trains token rows of "
                f"the model's input embedding {embedding_name!r}{outputs}{no_head}; use "
                f"{'one of those names' if head is not None else 'that name'} or a plain list of ids (input rows, "
                "plus head rows where the model has an LM head)."
            )
    targets = TokenTargets(_unique(input_ids), _unique(head_ids))
    for ids, module, role in ((targets.input_ids, embedding, "input embedding"), (targets.head_ids, head, "LM head")):
        too_large = [i for i in ids if i >= _rows_of(module)] if ids else []
        if too_large:
            raise ValueError(
                f"trainable_token_indices has ids {too_large} beyond the {role}'s {_rows_of(module)} rows; resize "
                "the embeddings first (model.resize_token_embeddings(len(tokenizer))), then build the adapter."
            )
    return targets


class LadderTokenRows(nn.Module):
    """One adapter's token rows: `input_rows` (added to the side stream's seed) and `head_rows` (added to the head)."""

    def __init__(self, targets: TokenTargets, hidden_size: int, init_weights: bool = True) -> None:
        super().__init__()
        self.input_rows = self._rows(len(targets.input_ids), hidden_size, init_weights)
        self.head_rows = self._rows(len(targets.head_ids), hidden_size, init_weights)
        # The ids come from the config: buffers (they follow .to()) that are not saved.
        self.register_buffer("input_ids", torch.tensor(targets.input_ids, dtype=torch.long), persistent=False)
        self.register_buffer("head_ids", torch.tensor(targets.head_ids, dtype=torch.long), persistent=False)
        self.folded = False  # True while the head rows are inside the head's weight (TRL's fused LM head)

    @staticmethod
    def _rows(count: int, hidden_size: int, init_weights: bool) -> Optional[nn.Parameter]:
        if not count:
            return None
        rows = torch.zeros(count, hidden_size)  # zero deltas: the adapter starts as an exact identity
        if not init_weights:
            nn.init.normal_(rows, std=1.0)  # a clearly non-identity adapter (for tests), like the up-projection
        return nn.Parameter(rows)

    def add_to_stream(self, hidden: torch.Tensor, token_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """hidden (B, T, d) + the input row of each position's token, where that token is a listed id."""
        if self.input_rows is None:
            return hidden
        if token_ids is None or token_ids.shape != hidden.shape[:-1]:
            raise ValueError(
                "trainable_token_indices: this Ladder adapter adds trainable rows for the listed token ids to the side "
                "stream, so it needs the token ids; this forward passed no input_ids the embedding saw (inputs_embeds "
                "instead?). Call the model with input_ids."
            )
        hits = (token_ids.unsqueeze(-1) == self.input_ids).to(self.input_rows.dtype)  # (B, T, n_in) one-hot
        return hidden + (hits @ self.input_rows).to(hidden.dtype)  # (B, T, d)

    def add_to_logits(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """logits (..., V) computed from hidden (..., d), with h @ head_rows^T added to the listed ids' columns."""
        if self.head_rows is None or self.folded:
            return logits
        extra = F.linear(hidden, self.head_rows.to(hidden.dtype)).to(logits.dtype)  # (..., n_head)
        return logits.index_add(-1, self.head_ids, extra)

    def head(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(head_ids, head_rows), or None: what the chunked loss adds to the head."""
        return None if self.head_rows is None else (self.head_ids, self.head_rows)


def record_token_ids(state) -> Callable:
    """A pre-hook for the input embedding: keeps the token ids of this forward for the side stream's input rows."""

    # A closure, not a bound method: PEFT deep-copies modules (modules_to_save), and a copied hook must not copy the
    # model it points to.
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else next(iter(kwargs.values()), None)
        state.token_ids = ids if isinstance(ids, torch.Tensor) and not ids.is_floating_point() else None

    return hook


def add_head_rows(active_side: Callable) -> Callable:
    """A forward hook for the output embedding: adds the active adapter's head rows to its logits."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        side = active_side()
        tokens = getattr(side, "tokens", None)
        if tokens is None or not isinstance(output, torch.Tensor):
            return None
        return tokens.add_to_logits(output, args[0])

    return hook


@contextmanager
def folded_head_weight(model: nn.Module, tokens: LadderTokenRows) -> Iterator[Optional[dict[str, torch.Tensor]]]:
    """{name: W with the head rows added} for `torch.func.functional_call`, while the head hook stays out of it.

    TRL's fused LM head multiplies by `lm_head.weight` itself and never calls the module, so the rows must be in the
    weight it reads. This costs a copy of W (vocab x d) per forward and a gradient of that size, as PEFT's own
    trainable tokens do.
    """
    head = model.get_output_embeddings()
    if tokens.head_rows is None or head is None:
        yield None
        return
    weight = head.weight  # through PEFT's modules_to_save wrapper: the active copy's weight
    owner = next(m for m in head.modules() if m._parameters.get("weight") is weight)
    name = next(n for n, m in model.named_modules() if m is owner)
    folded = weight.index_add(0, tokens.head_ids, tokens.head_rows.to(weight))  # (V, d): W + rows at the ids
    tokens.folded = True
    try:
        yield {f"{name}.weight" if name else "weight": folded}
    finally:
        tokens.folded = False


__all__ = ["LadderTokenRows", "TokenIndices", "TokenTargets", "check_token_indices", "resolve_token_targets"]
