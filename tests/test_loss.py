"""The chunked causal-LM loss: transformers' loss and gradients, without the full logits."""

from __future__ import annotations

import pytest
import torch
from conftest import SOFT_CAPPED, VOCAB, batch, ladder, tiny_causal_lm
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from peft_ladder import LadderConfig
from peft_ladder.loss import LadderChunkedLossOutput, chunked_cross_entropy
from peft_ladder.memory import track_peak_memory

# The bare head of the chunked-loss unit tests (not a tiny model's, whose vocabulary is conftest's VOCAB).
HEAD_VOCAB, HEAD_WIDTH = 50, 16


def _case(seed: int = 0, bias: bool = False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(HEAD_WIDTH, HEAD_VOCAB, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(HEAD_VOCAB, HEAD_WIDTH, generator=generator))
    hidden = torch.randn(2, 7, HEAD_WIDTH, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, HEAD_VOCAB, (2, 7), generator=generator)
    labels[0, :3] = -100  # a prompt that is not trained on
    return head, hidden, labels


def _reference(head, hidden, labels, softcap=None, **kwargs):
    logits = head(hidden)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, HEAD_VOCAB, **kwargs)


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_items_in_batch": torch.tensor(9)}, {"num_items_in_batch": 5}, {"ignore_index": 7}],
    ids=["mean", "num_items_tensor", "num_items_int", "ignore_index"],
)
def test_same_loss_and_gradients_as_transformers(chunk_size, kwargs):
    head, hidden, labels = _case(bias=True)
    if "ignore_index" in kwargs:
        labels[labels == -100] = 7
    expected = _reference(head, hidden, labels, **kwargs)
    got = chunked_cross_entropy(hidden, head, labels, chunk_size=chunk_size, **kwargs)
    torch.testing.assert_close(got, expected)
    params = (hidden, head.weight, head.bias)
    for g, e in zip(_grads(got, *params), _grads(expected, *params), strict=True):
        torch.testing.assert_close(g, e)


def test_shift_labels_and_softcap():
    head, hidden, labels = _case(seed=3)
    shift_labels = labels.roll(-1, dims=1)  # what context/sequence parallelism passes: labels already shifted
    expected = _reference(head, hidden, None, softcap=2.0, shift_labels=shift_labels)
    got = chunked_cross_entropy(hidden, head, None, chunk_size=3, shift_labels=shift_labels, softcap=2.0)
    torch.testing.assert_close(got, expected)
    for g, e in zip(_grads(got, hidden, head.weight), _grads(expected, hidden, head.weight), strict=True):
        torch.testing.assert_close(g, e)


def test_bfloat16_head_matches_within_rounding():
    head, hidden, labels = _case(seed=4, dtype=torch.bfloat16)
    expected = _reference(head, hidden, labels)
    got = chunked_cross_entropy(hidden, head, labels, chunk_size=5)
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(_grads(got, hidden)[0], _grads(expected, hidden)[0], rtol=2e-2, atol=2e-3)


def test_frozen_head_gets_no_gradient():
    head, hidden, labels = _case()
    head.requires_grad_(False)
    chunked_cross_entropy(hidden, head, labels, chunk_size=4).backward()
    assert head.weight.grad is None and hidden.grad is not None


def _side_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch_name", ["llama", *SOFT_CAPPED, "gpt2"])
def test_ladder_training_uses_chunked_loss_with_same_gradients(arch_name):
    inputs = batch()
    labels = inputs["input_ids"].clone()
    labels[:, :4] = -100
    plain, chunked = (ladder(arch_name, init_weights=False, loss_chunk_size=chunk).train() for chunk in (None, 5))
    if arch_name in SOFT_CAPPED:  # the chunked loss must apply the cap that the model's own loss applies
        assert chunked.config.final_logit_softcapping is not None
    torch.manual_seed(0)  # GPT-2 trains with dropout: the same masks in both runs
    expected = plain(**inputs, labels=labels, num_items_in_batch=torch.tensor(15))
    torch.manual_seed(0)
    got = chunked(**inputs, labels=labels, num_items_in_batch=torch.tensor(15))
    assert isinstance(got, LadderChunkedLossOutput) and got.logits is None and got.loss_chunk_size == 5
    assert expected.logits is not None
    torch.testing.assert_close(got.loss, expected.loss)
    expected.loss.backward()
    got.loss.backward()
    expected_grads, got_grads = _side_grads(plain), _side_grads(chunked)
    assert got_grads.keys() == expected_grads.keys() and all("ladder_" in n for n in got_grads)
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], msg=name)


def test_logits_kept_outside_training_with_labels():
    model, inputs = ladder("llama", init_weights=False, loss_chunk_size=4).train(), batch()
    with torch.no_grad():
        evaluated = model(**inputs, labels=inputs["input_ids"])
    assert evaluated.logits.shape == (2, 12, VOCAB) and evaluated.loss is not None
    assert model(**inputs).logits.shape == (2, 12, VOCAB)
    assert model.eval()(**inputs, labels=inputs["input_ids"]).logits.shape == (2, 12, VOCAB)  # eval mode, grad on
    model.train()
    with model.disable_adapter():
        assert model(**inputs, labels=inputs["input_ids"]).logits is not None


def test_chunked_loss_lowers_peak_memory():
    def peak(chunk):
        model = ladder(tiny_causal_lm("llama", vocab_size=4096), loss_chunk_size=chunk).train()
        inputs = batch(length=64)
        with track_peak_memory("cpu", model=model, tensors=list(inputs.values())) as measured:
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        return measured.peak_bytes - measured.baseline_bytes

    full, chunked = peak(None), peak(16)
    logits_bytes = 2 * 64 * 4096 * 4
    assert full - chunked > 2 * logits_bytes  # transformers' loss holds several fp32 copies of the logits


def test_loss_chunk_size_validated():
    with pytest.raises(ValueError, match=r"loss_chunk_size=0 must be a positive number of tokens"):
        LadderConfig(loss_chunk_size=0)
    assert LadderConfig(loss_chunk_size=None).loss_chunk_size is None


def test_trl_fused_lm_head_passes_through():
    from trl.trainer.utils import add_fused_lm_head

    base = tiny_causal_lm("llama")
    add_fused_lm_head(base)  # what SFTTrainer does before wrapping the model with PEFT
    model = ladder(base, init_weights=False, loss_chunk_size=4).train()
    inputs = batch()
    fused = model(**inputs, labels=inputs["input_ids"], fused_lm_head=True)
    assert not isinstance(fused, LadderChunkedLossOutput) and fused.log_probs is not None
    chunked = model(**inputs, labels=inputs["input_ids"])
    assert isinstance(chunked, LadderChunkedLossOutput)
    torch.testing.assert_close(fused.loss, chunked.loss)
