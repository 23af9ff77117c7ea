"""The LADDER tuner on every tested architecture and config: identity at init, gradients, the no-grad boundary,
disable_adapter (the common tests, over conftest's CHEAP_CASES), then fusion and architecture specifics."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CHEAP_CASES, SEQ_CLS, VOCAB, base_model, batch, ladder, logits, tiny_causal_lm, tiny_seq_cls
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_training import BackboneSaveProbe

from peft_ladder import LadderConfig
from peft_ladder.layer import BackboneGuard, LadderFusionLayer, LadderTapLayer
from peft_ladder.memory import saved_bytes

# --- the common tests: every config of the case table on every architecture ---------------------------------------


@pytest.mark.parametrize("case", CHEAP_CASES)
def test_fresh_adapter_reproduces_base_model_exactly(case):
    expected = logits(base_model(case))
    model = ladder(case.arch, **case.kwargs)
    assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("case", CHEAP_CASES)
def test_random_adapter_changes_outputs_and_disable_adapter_restores_base(case):
    expected = logits(base_model(case))
    model = ladder(case.arch, init_weights=False, **case.kwargs)
    assert (logits(model) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    assert (logits(model) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("case", CHEAP_CASES)
def test_gradients_reach_ladder_parameters_only(case):
    model = ladder(case.arch, init_weights=False, **case.kwargs)
    model.train()
    inputs = batch()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if ".ladder_" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("case", CHEAP_CASES)
def test_backbone_keeps_nothing_for_backward(case):
    model = ladder(case.arch, init_weights=False, **case.kwargs).train()
    # With input gradients on (as checkpointing and k-bit preparation leave them), a backbone that ran with grad
    # would save its activations: only Ladder's no-grad boundary keeps them out.
    model.enable_input_require_grads()
    probe = BackboneSaveProbe(model)
    inputs = batch()
    with probe.track():
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert probe.calls == 1 + 4  # the embeddings and the 4 decoder layers ran, once each
    assert probe.kept == (0, 0)  # no byte saved for backward inside them, no output of theirs in a graph


# --- taps, fusion, and what the backbone sees ------------------------------------------------------------------------


def test_every_decoder_layer_is_tapped_and_the_final_norm_fuses(arch):
    model = ladder(arch)
    taps = [m for m in model.modules() if isinstance(m, LadderTapLayer)]
    fusions = [m for m in model.modules() if isinstance(m, LadderFusionLayer)]
    assert [t.layer_index for t in taps] == list(range(4))
    assert len(fusions) == 1


def test_print_trainable_parameters_counts_the_side_network_exactly(arch, capsys):
    model = ladder(arch)
    side = model.base_model.model.get_submodule(model.base_model._backbone().norm_name).ladder_side["default"]
    expected = sum(p.numel() for p in side.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (expected, total)
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,} || all params: {total:,}" in capsys.readouterr().out


def test_optimizer_steps_change_ladder_parameters_only():
    model = ladder("llama")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        inputs = batch(seed=step)
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".ladder_" in n for n in changed)
    assert any(".up." in n for n in changed)


SWITCHES = {
    "enable_input_require_grads": lambda m: m.enable_input_require_grads(),
    "gradient_checkpointing_enable": lambda m: m.gradient_checkpointing_enable(),
    "prepare_model_for_kbit_training": lambda m: prepare_model_for_kbit_training(m, use_gradient_checkpointing=False),
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_backbone_saves_nothing_for_backward_whatever_is_switched_on(arch, switch):
    # use_cache=False on both sides: checkpointing turns the cache off, which changes GPT-2's side-attention mask.
    inputs = dict(batch(), labels=batch()["input_ids"], use_cache=False)
    plain = ladder(arch, init_weights=False).train()
    reference = saved_bytes(plain, inputs)
    base = tiny_causal_lm(arch).train()
    SWITCHES[switch](base)
    if "checkpointing" in switch:
        switched = ladder(base, init_weights=False).train()
        with pytest.warns(UserWarning, match="Gradient checkpointing has no effect"):
            assert saved_bytes(switched, inputs) == reference
    else:
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            switched = ladder(base, init_weights=False).train()
            assert saved_bytes(switched, inputs) == reference
        # Nothing switched checkpointing on, so nothing may say it has no effect.
        assert not [str(w.message) for w in records if "Gradient checkpointing has no effect" in str(w.message)]
    assert all(p.grad is None for n, p in switched.named_parameters() if ".ladder_" not in n)


def test_ladder_saves_a_fraction_of_what_lora_saves(arch):
    inputs = dict(batch(length=32), labels=batch(length=32)["input_ids"])
    lora = get_peft_model(tiny_causal_lm(arch), LoraConfig(task_type="CAUSAL_LM", r=16, target_modules="all-linear"))
    lora_bytes = saved_bytes(lora.train(), inputs)
    for connections in ("ladder", "xladder"):
        side_bytes = saved_bytes(ladder(arch, connections=connections).train(), inputs)
        assert side_bytes < 0.6 * lora_bytes, (connections, side_bytes, lora_bytes)


def test_labels_and_extra_keywords_reach_the_base_model_loss():
    model = ladder("llama", init_weights=False)
    inputs = batch()
    labels = inputs["input_ids"].clone()
    labels[:, :4] = -100
    out = model(**inputs, labels=labels, logits_to_keep=0)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    summed = model(**inputs, labels=labels, num_items_in_batch=torch.tensor(100)).loss
    torch.testing.assert_close(summed, manual * (labels[:, 1:] != -100).sum() / 100)


def test_left_padded_rows_match_each_row_alone(arch):
    model = ladder(arch, init_weights=False)
    rows = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5)]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = logits(model, {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids})
    for i, row in enumerate(rows):
        alone = logits(model, {"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long)})
        torch.testing.assert_close(padded[i, width - len(row) :], alone[0], atol=1e-5, rtol=1e-4)


def test_output_hidden_states_and_attentions_are_the_backbones():
    base = tiny_causal_lm("llama")
    with torch.no_grad():
        expected = base(**batch(), output_hidden_states=True, output_attentions=True)
    model = ladder(base, init_weights=False)
    with torch.no_grad():
        out = model(**batch(), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(expected.hidden_states) == 5
    assert len(out.attentions) == len(expected.attentions)
    # The last hidden state is taken after the fusion; every earlier one is the backbone's own.
    for got, want in zip(out.hidden_states[:-1], expected.hidden_states[:-1], strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(out.hidden_states[-1], expected.hidden_states[-1])


@pytest.mark.parametrize("arch_name", SEQ_CLS)
def test_sequence_classification_trains_the_new_head_with_the_side_network(arch_name):
    model = ladder(tiny_seq_cls(arch_name), task_type="SEQ_CLS", init_weights=False)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".ladder_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable)
    out = model(**batch(), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert out.logits.shape == (2, 3)
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name


def test_explicit_map_expresses_the_papers_xladder_at_4():
    # Section 5.2: the first two backbone layers feed two side blocks, then two unconnected side blocks add depth.
    model = ladder("llama", connections={0: 0, 1: 1}, side_layers=4, init_weights=False)
    side = model.base_model.model.model.norm.ladder_side["default"]
    assert side.plan.block_to_layer == {0: 0, 1: 1} and len(side.blocks) == 4
    assert sorted(side.down) == ["0", "1", "2"]
    model.train()
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in side.parameters())


def test_wrapped_layers_are_peft_tuner_layers():
    model = ladder("qwen3")
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert len(layers) == 5
    tap = model.base_model.model.model.layers[0]
    assert tap.self_attn is tap.base_layer.self_attn  # models read attributes off the layers: delegated


@pytest.mark.parametrize("arch_name, width, heads", [("qwen2", 128, 4), ("qwen2", 224, 7), ("llama", 128, 4)])
def test_side_blocks_keep_the_rotary_head_size_whatever_the_side_width(arch_name, width, heads):
    # Qwen2 configs carry no head_dim: a side width of 16 (< the head size 32) must still use 32-wide rotary heads,
    # and so must a width that is not a multiple of the head size (as Qwen2.5-7B at r=8: 448 = 3.5 x 128).
    def base():
        return tiny_causal_lm(arch_name, hidden_size=width, num_attention_heads=heads, num_key_value_heads=heads)

    head_dim = getattr(base().config, "head_dim", None) or width // heads
    for reduction_factor in (8, 2):
        model = ladder(base(), reduction_factor=reduction_factor, init_weights=False).train()
        model(**batch(), labels=batch()["input_ids"]).loss.backward()
        side = model.base_model.model.model.norm.ladder_side["default"]
        assert side.side_config.head_dim == head_dim
        assert all(p.grad is not None for p in side.parameters())


def _guard_hooks(model) -> tuple[int, int, int]:
    """(decoder pre-hooks, decoder post-hooks, fusion pre-hooks) installed by Ladder's BackboneGuard."""
    decoder = model.get_submodule("model")
    fusion = next(m for m in model.modules() if isinstance(m, LadderFusionLayer))

    def owned(hooks: dict) -> int:
        return sum(isinstance(getattr(hook, "__self__", None), BackboneGuard) for hook in hooks.values())

    return owned(decoder._forward_pre_hooks), owned(decoder._forward_hooks), owned(fusion._forward_pre_hooks)


def test_one_guard_whatever_adapters_are_added_deleted_or_reloaded(tmp_path):
    model = ladder("llama", init_weights=False)
    assert _guard_hooks(model.base_model.model) == (1, 1, 1)
    model.add_adapter("second", LadderConfig(task_type="CAUSAL_LM", connections="xladder", init_weights=False))
    model.set_adapter("second")
    assert _guard_hooks(model.base_model.model) == (1, 1, 1)
    model.delete_adapter("second")
    assert _guard_hooks(model.base_model.model) == (1, 1, 1)
    model.save_pretrained(tmp_path)
    expected = logits(model, batch())
    base = model.unload()
    assert not any(isinstance(m, LadderFusionLayer) for m in base.modules())
    assert base.model._forward_pre_hooks == {} and base.model._forward_hooks == {}
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    assert _guard_hooks(reloaded.base_model.model) == (1, 1, 1)
    assert torch.equal(logits(reloaded, batch()), expected)
