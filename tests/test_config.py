"""`LadderConfig` validation: every bad value names the field, the value and a fix; configs round-trip."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from conftest import batch, tiny_causal_lm
from peft import PeftConfig, get_peft_model

from peft_ladder import LadderConfig
from peft_ladder.connections import resolve_plan


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction_factor": 0}, r"reduction_factor=0 must be a positive integer .* e\.g\. 8"),
        ({"reduction_factor": 2.5}, r"reduction_factor=2\.5 must be a positive integer"),
        ({"side_layers": 0}, r"side_layers=0 must be a positive integer or None"),
        ({"connections": "ladderx"}, r"connections='ladderx' is not a preset; use one of \('ladder', 'xladder'\)"),
        ({"connections": {}}, r"connections=\{\} must be 'ladder', 'xladder' or a non-empty"),
        ({"connections": {"a": 0}}, r"must map integer backbone layers to integer side blocks"),
        ({"connections": {-1: 0}}, r"negative indices"),
        ({"connections": {0: 0, 1: 0}}, r"sends several backbone layers into one side block \(\{0: \[0, 1\]\}\).*Fix"),
        (
            {"connections": {0: 0, 1: 3}, "side_layers": 2},
            r"side_layers=2 is below the 4 side blocks .* side_layers >= 4",
        ),
        ({"connections": "ladder", "xladder_depth": 2}, r"xladder_depth=2 only applies to connections='xladder'"),
        ({"connections": "xladder", "xladder_depth": 0}, r"xladder_depth=0 must be a positive integer"),
        ({"connections": "xladder", "xladder_depth": 3, "side_layers": 2}, r"xladder_depth=3 exceeds side_layers=2"),
        ({"gate": "max"}, r"gate='max' is unknown; use 'sum', 'learned' or a float"),
        ({"gate": 1.5}, r"gate=1\.5 must be 'sum', 'learned' or a float weight in \[0, 1\]"),
        ({"gate_temperature": 0}, r"gate_temperature=0 must be a positive number"),
    ],
)
def test_invalid_values_raise_a_value_error_naming_field_value_and_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LadderConfig(task_type="CAUSAL_LM", **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"reduction_factor": 7},
            r"reduction_factor=7 gives side width 9\.1 for hidden_size 64; choose a divisor of 64",
        ),
        ({"connections": {0: 0, 9: 1}}, r"names backbone layers \[9\], but the model has 4 layers \(valid: 0\.\.3\)"),
        ({"connections": "xladder", "xladder_depth": 6, "side_layers": 8}, r"xladder_depth=6 exceeds the backbone's 4"),
    ],
)
def test_values_invalid_for_this_model_fail_before_the_model_is_touched(kwargs, message):
    model = tiny_causal_lm("llama")
    expected = {name: p.clone() for name, p in model.state_dict().items()}
    module_types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, LadderConfig(task_type="CAUSAL_LM", **kwargs))
    assert [type(m) for m in model.modules()] == module_types
    assert all(torch.equal(p, expected[name]) for name, p in model.state_dict().items())


def test_presets_resolve_to_the_papers_connection_plans():
    assert resolve_plan("ladder", 4, None, None).block_to_layer == {0: 0, 1: 1, 2: 2, 3: 3}
    assert resolve_plan("ladder", 8, 4, None).block_to_layer == {0: 0, 1: 1, 2: 2, 3: 3}  # Ladder@4
    xladder = resolve_plan("xladder", 8, 4, None)  # delta = l / 2: the last two backbone layers feed blocks 0, 1
    assert xladder.block_to_layer == {0: 6, 1: 7} and xladder.side_blocks == 4
    assert xladder.source == 6 and xladder.tap_indices == (6, 7, 8)
    assert resolve_plan("xladder", 4, None, 3).block_to_layer == {0: 1, 1: 2, 2: 3}
    explicit = resolve_plan({0: 0, 1: 1}, 8, 4, None)  # the paper's section 5.2 xLadder@4
    assert explicit.block_to_layer == {0: 0, 1: 1} and explicit.side_blocks == 4


def test_config_round_trips_through_json_with_an_explicit_map(tmp_path):
    config = LadderConfig(task_type="CAUSAL_LM", connections={0: 0, 2: 1}, side_layers=3, gate=0.5)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["connections"] == {"0": 0, "2": 1}  # JSON keys are strings ...
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LadderConfig) and loaded.connections == {0: 0, 2: 1}  # ... and come back as ints
    assert (loaded.side_layers, loaded.gate, loaded.peft_type) == (3, 0.5, "LADDER")


def test_every_field_has_help_text():
    from dataclasses import fields

    own = [f for f in fields(LadderConfig) if f.name not in {f.name for f in fields(PeftConfig)}]
    assert own and all(f.metadata.get("help") for f in own), [f.name for f in own if not f.metadata.get("help")]


def test_unsupported_architectures_get_a_clear_error():
    pegasus = tf.PegasusForConditionalGeneration(
        tf.PegasusConfig(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            vocab_size=64,
        )
    )
    with pytest.raises(
        ValueError,
        match=r"PegasusForConditionalGeneration is an encoder-decoder model of type 'pegasus', which Ladder has not "
        r"been tested on; Ladder supports decoder-only",
    ):
        get_peft_model(pegasus, LadderConfig(task_type="SEQ_2_SEQ_LM"))
    no_norm = tf.LlamaForCausalLM(
        tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    )
    del no_norm.model.norm  # a decoder without a final norm: nowhere to fuse
    with pytest.raises(ValueError, match=r"has no final norm .*Supported: decoder-only .* encoder-only"):
        get_peft_model(no_norm, LadderConfig())
    with pytest.raises(ValueError, match=r"needs a transformers model with a `.config`; got Sequential"):
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LadderConfig())


def test_a_config_without_optional_fields_still_loads(tmp_path):
    # A minimal adapter_config.json (as an earlier peft-ladder wrote before fields were added) keeps its meaning.
    minimal = {"peft_type": "LADDER", "task_type": "CAUSAL_LM", "reduction_factor": 4, "connections": "ladder"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(minimal))
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LadderConfig) and loaded.reduction_factor == 4
    model = get_peft_model(tiny_causal_lm("llama"), loaded)
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, tiny_causal_lm("llama")(**batch()).logits)
