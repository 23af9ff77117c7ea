"""LadderConfig.mlp_chunk_size: the frozen backbone's MLPs run over chunks of the sequence, with the same outputs
(up to float rounding: a matmul over fewer rows may sum in another order)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from conftest import ARCHS, VOCAB, batch, ladder, logits, side_of, tiny_causal_lm, tiny_encoder, tiny_seq2seq
from peft import PeftModel, get_peft_model

from peft_ladder import LadderConfig
from peft_ladder.memory import track_peak_memory
from peft_ladder.planner import estimate

WITH_MLP = [arch for arch in ARCHS if arch != "opt"]  # OPT's layers hold fc1/fc2 directly, no `mlp` module
TIGHT = dict(rtol=1e-5, atol=1e-6)
CHUNK = 5  # tokens per chunk: batch() has 12 tokens, so three chunks, the last one short


def set_chunk(model, chunk):
    side_of(model).mlp_chunk_size = chunk


@pytest.mark.parametrize("arch", WITH_MLP)
def test_chunked_mlp_gives_the_same_logits(arch):
    model = ladder(arch, init_weights=False, mlp_chunk_size=CHUNK)
    chunked = logits(model)
    set_chunk(model, None)
    torch.testing.assert_close(chunked, logits(model), **TIGHT)


def test_chunked_mlp_gives_the_same_loss_and_gradients_in_training():
    runs = []
    for chunk in (CHUNK, None):
        model = ladder("llama", seed=0, init_weights=False, mlp_chunk_size=chunk).train()
        inputs = batch()
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    torch.testing.assert_close(loss_a, loss_b, **TIGHT)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **TIGHT)


def test_generation_with_a_prompt_longer_than_the_chunk_gives_the_same_tokens():
    model = ladder("llama", init_weights=False, mlp_chunk_size=CHUNK)
    inputs = batch(length=11)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    chunked = model.generate(**inputs, **kwargs)
    set_chunk(model, None)
    assert torch.equal(chunked, model.generate(**inputs, **kwargs))


def test_the_mlp_forward_is_put_back_after_each_call_including_an_accelerate_hook():
    model = ladder("llama", mlp_chunk_size=CHUNK)
    mlp = model.base_model.model.model.layers[0].base_layer.mlp
    logits(model)
    assert "forward" not in mlp.__dict__  # nothing left on the instance
    add_hook_to_module(mlp, ModelHook())  # accelerate sets its own instance forward (device_map dispatch does)
    hooked = mlp.forward
    logits(model)
    assert mlp.forward is hooked
    remove_hook_from_module(mlp)  # accelerate puts the class's forward back on the instance
    restored = mlp.forward
    logits(model)
    assert mlp.forward is restored


def test_the_forward_peak_drops_at_long_context():
    peaks = {}
    for chunk in (None, 16):
        model = ladder(
            "llama", seed=0, mlp_chunk_size=chunk, reduction_factor=8, side_checkpointing=True, loss_chunk_size=16
        ).train()
        inputs = batch(size=1, length=512)
        with track_peak_memory(model=model) as peak:
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        peaks[chunk] = peak.peak_bytes
    assert peaks[16] < peaks[None]


def test_planner_counts_the_chunked_working_set():
    config = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "configs", "llama-3.1-8b.json")
    plain = estimate(config, "ladder-4bit", seq_len=32768)
    chunked = estimate(config, "ladder-4bit", seq_len=32768, ladder_config=LadderConfig(mlp_chunk_size=2048))
    mlp_bytes = 3 * 32768 * 14336 * 2
    assert plain.logits == mlp_bytes  # the MLP working set sets the forward's transient peak at 32k
    assert chunked.logits < plain.logits  # the loss's chunk and the side recompute are the largest transients then


@pytest.mark.parametrize("value", [0, -3, True, 2.5, "1024"])
def test_invalid_values_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=rf"mlp_chunk_size={value!r} must be a positive number of tokens"):
        LadderConfig(task_type="CAUSAL_LM", mlp_chunk_size=value)


def test_layers_without_an_mlp_module_are_refused():
    with pytest.raises(ValueError, match=r"mlp_chunk_size=8: the layers of OPTForCausalLM .* have no `mlp` module"):
        ladder("opt", mlp_chunk_size=8)
    with pytest.raises(ValueError, match=r"mlp_chunk_size=8: the layers of BertForSequenceClassification"):
        get_peft_model(tiny_encoder("bert"), LadderConfig(task_type="SEQ_CLS", reduction_factor=4, mlp_chunk_size=8))
    with pytest.raises(ValueError, match=r"LadderConfig\(mlp_chunk_size=8\) is not supported on encoder-decoder"):
        get_peft_model(tiny_seq2seq("t5"), LadderConfig(task_type="SEQ_2_SEQ_LM", reduction_factor=4, mlp_chunk_size=8))


def test_chunked_encoder_gives_the_same_output():
    model = get_peft_model(
        tiny_encoder("modernbert"),
        LadderConfig(task_type="SEQ_CLS", reduction_factor=2, init_weights=False, mlp_chunk_size=CHUNK),
    )
    inputs = {"input_ids": torch.randint(3, VOCAB, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    chunked = logits(model, inputs)
    set_chunk(model, None)
    torch.testing.assert_close(chunked, logits(model, inputs), **TIGHT)


def test_saved_config_writes_memory_fields_only_when_set(tmp_path):
    ladder("llama").save_pretrained(tmp_path / "plain")
    written = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    assert not {"mlp_chunk_size", "side_checkpointing", "saved_taps", "down_rank"} & written.keys()
    ladder("llama", mlp_chunk_size=64, saved_taps="int8").save_pretrained(tmp_path / "set")
    written = json.loads((tmp_path / "set" / "adapter_config.json").read_text())
    assert (written["mlp_chunk_size"], written["saved_taps"]) == (64, "int8")
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "set")
    assert side_of(reloaded).mlp_chunk_size == 64
