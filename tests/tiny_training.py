"""Shared pieces of the training tests: a learnable tiny data set, a character tokenizer, a backbone-saves probe.

Used by test_trainer.py, test_trl.py and distributed_worker.py (which runs outside pytest, so no fixtures here).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import torch
from conftest import VOCAB
from torch import nn

# What a Trainer checkpoint of a PEFT model holds (TRL adds the tokenizer's files).
CHECKPOINT_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
}

# 3 special tokens (pad 0, eos 1, bos 2, as in conftest.tiny_config) + 93 characters = the tiny models' VOCAB.
ALPHABET = "".join(chr(c) for c in range(33, 127))[: VOCAB - 3]


def counting_rows(count: int, length: int = 16, seed: int = 0, masked_prefix: bool = False) -> list[dict]:
    """Rows of consecutive tokens (s, s+1, s+2, ... wrapping): a bigram task a side network learns in a few steps.

    `masked_prefix` sets the first 1..length//2 labels of each row to -100, so rows carry different numbers of
    loss tokens: only then does a mean over micro-batches differ from a mean over the whole batch.
    """
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        start = int(torch.randint(0, VOCAB - 3, (1,), generator=generator))
        ids = [3 + (start + k) % (VOCAB - 3) for k in range(length)]
        labels = list(ids)
        if masked_prefix:
            cut = int(torch.randint(1, length // 2 + 1, (1,), generator=generator))
            labels[:cut] = [-100] * cut
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": labels})
    return rows


def counting_texts(count: int, length: int = 16, seed: int = 0) -> list[str]:
    """The same task as text for the character tokenizer (TRL tokenizes a `text` column itself)."""
    return ["".join(ALPHABET[i - 3] for i in row["input_ids"]) for row in counting_rows(count, length, seed)]


def char_tokenizer():
    """A character-level `PreTrainedTokenizerFast` matching the tiny models' vocabulary (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{ch: 3 + i for i, ch in enumerate(ALPHABET)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def side_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable Ladder parameters by name, detached copies in fp32."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if ".ladder_" in n}


class BackboneSaveProbe:
    """What autograd keeps of the frozen backbone (embeddings, decoder layers) during any training loop.

    * `bytes`: bytes saved for backward while a backbone module runs. The Ladder tap calls the side network's
      down-projections outside the wrapped decoder layer, so anything saved *inside* `tap.base_layer` or the
      embeddings is backbone memory that Ladder promises not to keep.
    * `graph_outputs`: backbone module outputs that are part of an autograd graph (have a `grad_fn`). This also
      catches a backbone under gradient checkpointing, whose own saved-tensor hooks hide its saves from `bytes`.
    * `calls`: backbone module forwards; a checkpointed backbone in autograd would run again during backward.
    """

    def __init__(self, model: nn.Module) -> None:
        from peft_ladder.layer import LadderTapLayer

        self.bytes = 0
        self.saves = 0
        self.calls = 0
        self.graph_outputs = 0
        self._depth = 0
        backbone = [m.base_layer for m in model.modules() if isinstance(m, LadderTapLayer)]
        backbone.append(model.get_input_embeddings())
        assert len(backbone) > 1, "no Ladder taps found"
        self._handles = []
        for module in backbone:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))

    def _enter(self, module, args) -> None:
        self._depth += 1
        self.calls += 1

    def _exit(self, module, args, output) -> None:
        self._depth -= 1
        hidden = output[0] if isinstance(output, tuple) else output
        if isinstance(hidden, torch.Tensor) and hidden.grad_fn is not None:
            self.graph_outputs += 1

    @property
    def kept(self) -> tuple[int, int]:
        """(bytes saved, outputs in a graph): (0, 0) when the backbone stayed out of autograd."""
        return self.bytes, self.graph_outputs

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._depth > 0:
            self.saves += 1
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    @contextlib.contextmanager
    def track(self) -> Iterator["BackboneSaveProbe"]:
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
                yield self
        finally:
            for handle in self._handles:
                handle.remove()


@contextlib.contextmanager
def watch_training(model: nn.Module) -> Iterator[tuple[BackboneSaveProbe, list]]:
    """Record what autograd keeps of the backbone, and every warning, while the training inside this block runs."""
    probe = BackboneSaveProbe(model)
    with warnings.catch_warnings(record=True) as records, probe.track():
        warnings.simplefilter("always")
        yield probe, records
