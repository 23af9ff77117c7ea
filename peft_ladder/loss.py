"""Causal-LM cross-entropy computed chunk by chunk over the tokens, without the full logits.

With the backbone out of the backward pass, the logits (tokens x vocab, upcast to fp32 by transformers' loss) are the
largest activation left: about 1.2 GB for a 152k vocabulary at 2k tokens, and transformers' loss holds about 12 bytes
per logit at its peak. Here the head runs on `chunk_size` tokens at a time; each chunk's loss and its gradients are
computed in the forward pass and only the gradient of the hidden states (the size of the hidden states) is kept, so
the peak holds one chunk's logits instead of all of them. Same loss and gradients as transformers' `ForCausalLMLoss`
(shifted labels, `ignore_index`, `num_items_in_batch`, `shift_labels`) within float rounding.

`chunked_causal_lm_forward` runs a transformers causal LM this way: a pre-hook on the output embedding takes the
final hidden states and hands the head an empty slice, so the model's own forward runs unchanged but builds no
logits; the returned output says so (`logits=None`, `LadderChunkedLossOutput`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

# Models that scale their logits after the head in their own forward (see trl.trainer.utils.add_fused_lm_head):
# the hidden states alone do not give their loss, so they keep transformers' loss.
_LOGIT_SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over valid tokens of CE(head(hidden)) / denominator, gradients computed chunk by chunk in forward.

    `rows` (n, d) with `row_ids` (n,): Ladder's head rows (tokens.py), logits[:, row_ids] += h @ rows^T.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, row_ids, labels, denominator, chunk_size, softcap, ignore_index):
        # hidden: (N, d), labels: (N,), weight: (V, d)
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        need_rows = rows is not None and rows.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        grad_rows = torch.zeros_like(rows, dtype=torch.float32) if need_rows else None
        row_weight = rows.to(hidden.dtype) if rows is not None else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h, y = hidden[start : start + chunk_size], labels[start : start + chunk_size]
            raw = F.linear(h, weight, bias)  # (n, V) in the head's dtype, as the model computes them
            if rows is not None:
                raw.index_add_(1, row_ids, F.linear(h, row_weight).to(raw.dtype))
            logits = raw.float()
            del raw
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            valid = y != ignore_index
            target = torch.where(valid, y, 0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            total += (lse - logits.gather(1, target)).squeeze(1)[valid].sum()
            if not (need_hidden or need_weight or need_bias or need_rows):
                del logits
                continue
            grad = logits.sub_(lse).exp_()  # softmax, in place: (n, V) fp32
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad.mul_(valid.unsqueeze(1))
            if softcap is not None:
                grad.mul_(1 - capped * capped)
                del capped
            grad = grad.div_(denominator).to(hidden.dtype)
            if need_hidden:
                grad_hidden[start : start + chunk_size] = grad @ weight
                if rows is not None:
                    grad_hidden[start : start + chunk_size] += grad[:, row_ids] @ row_weight
            if need_rows:
                grad_rows.add_(grad[:, row_ids].t().float() @ h.float())
            if need_weight:
                grad_weight.add_(grad.t().float() @ h.float())
            if need_bias:
                grad_bias.add_(grad.float().sum(0))
            del grad, logits  # free this chunk before the next one is built: the peak holds one chunk, not two
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, grad_rows)
        ctx.weight_dtype = weight.dtype
        ctx.rows_dtype = rows.dtype if rows is not None else None
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias, grad_rows = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(ctx.weight_dtype)
        if grad_rows is not None:
            grad_rows = (grad_rows * grad_output).to(ctx.rows_dtype)
        return grad_hidden, grad_weight, grad_bias, grad_rows, None, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: Optional[torch.Tensor] = None,
    *,
    chunk_size: int = 256,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    head_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    **unused: Any,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(head(hidden), labels, ...)` without building the (B, T, V) logits.

    hidden: (B, T, d) final hidden states (the head's input). Labels are shifted as transformers does unless
    `shift_labels` is given; `num_items_in_batch` switches to a sum divided by it (gradient accumulation, DDP).
    `head_rows`: (ids (n,), rows (n, d)) added to the head for those ids, logits = h @ (W[ids] + rows)^T (tokens.py).
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).to(head.weight.device)  # (B*T, d)
    flat_labels = shift_labels.reshape(-1).to(head.weight.device)  # (B*T,)
    if num_items_in_batch is None:
        denominator = (flat_labels != ignore_index).sum().float()  # a mean: 0 valid tokens gives nan, as in torch
    elif torch.is_tensor(num_items_in_batch):
        denominator = num_items_in_batch.to(head.weight.device).float()
    else:
        denominator = torch.tensor(float(num_items_in_batch), device=head.weight.device)
    row_ids, rows = head_rows if head_rows is not None else (None, None)
    if rows is not None:
        row_ids, rows = row_ids.to(head.weight.device), rows.to(head.weight.device)
    return _ChunkedLinearCrossEntropy.apply(
        flat_hidden,
        head.weight,
        head.bias,
        rows,
        row_ids,
        flat_labels,
        denominator,
        int(chunk_size),
        softcap,
        ignore_index,
    )


@dataclass
class LadderChunkedLossOutput(CausalLMOutputWithPast):
    """A causal-LM output whose loss was computed in chunks: `logits` is None because they were never built.

    Returned only when training (train mode, grad enabled) with labels and `LadderConfig.loss_chunk_size` set. Call
    the model in eval mode, under `torch.no_grad()`, without `labels`, or with `loss_chunk_size=None` to get logits.
    """

    loss_chunk_size: Optional[int] = None


def chunking_blocker(model: nn.Module, kwargs: dict) -> Optional[str]:
    """Why `model(**kwargs)` cannot use the chunked loss, or None when it can (and gives the same loss)."""
    if kwargs.get("labels") is None:
        return "no labels"
    if not (model.training and torch.is_grad_enabled()):
        return "not training (eval mode or grad disabled): the logits are wanted"
    if "fused_lm_head" in kwargs:
        return "TRL's fused LM head computes its own chunked loss"
    if kwargs.get("logits_to_keep", 0) not in (0, None) or kwargs.get("return_dict") is False:
        return "logits_to_keep / return_dict=False were requested"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"the output embedding is {type(head).__name__}, not a plain nn.Linear"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "the model does not use transformers' ForCausalLMLoss"
    config = model.config.get_text_config()
    if kwargs.get("output_router_logits") or getattr(config, "output_router_logits", False):
        return "a mixture-of-experts model adds its router loss to the loss it computes from labels"
    scaled = [name for name in _LOGIT_SCALE_FIELDS if getattr(config, name, None) not in (None, 1, 1.0)]
    if scaled:
        return f"the model scales its logits ({scaled[0]})"
    return None


def chunked_causal_lm_forward(
    model: nn.Module,
    chunk_size: int,
    *args: Any,
    head_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    **kwargs: Any,
) -> LadderChunkedLossOutput:
    """Run `model(*args, **kwargs)` (a transformers causal LM, with `labels`) computing the loss in chunks.

    `head_rows`: the active adapter's (ids, rows) of `trainable_token_indices`, added to the head inside the chunks.
    """
    labels = kwargs.pop("labels")
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def take_hidden(module: nn.Module, inputs: tuple) -> tuple:
        captured.append(inputs[0])
        return (inputs[0][..., :0, :],) + tuple(inputs[1:])  # the head builds (B, 0, V): no logits

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        outputs = model(*args, **kwargs)
    finally:
        handle.remove()
    loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    loss = chunked_cross_entropy(
        captured[-1], head, labels, chunk_size=chunk_size, softcap=softcap, head_rows=head_rows, **loss_kwargs
    )
    kept = {f.name for f in dataclasses.fields(LadderChunkedLossOutput)} - {"loss", "logits"}
    fields = {key: value for key, value in outputs.items() if key in kept}
    return LadderChunkedLossOutput(loss=loss, logits=None, loss_chunk_size=chunk_size, **fields)


__all__ = ["LadderChunkedLossOutput", "chunked_causal_lm_forward", "chunked_cross_entropy", "chunking_blocker"]
