"""A saved adapter loads completely or fails with a message naming the file, the field or what differs, and the base
model it was loaded onto is left exactly as it was (same parameters, no Ladder layer inside)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from conftest import ladder, tiny_causal_lm
from peft import PeftConfig, PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from peft_ladder import LadderConfig
from peft_ladder.config import LADDER_FORMAT_VERSION
from peft_ladder.layer import LadderLayer
from peft_ladder.load_checks import AdapterFileError

NEWER = LADDER_FORMAT_VERSION + 1
RESAVE = r"Re-save the adapter \(model\.save_pretrained\) or download it again"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained-looking Ladder adapter on conftest's 4-layer Llama (hidden size 64, side width 16)."""
    folder = tmp_path_factory.mktemp("adapter")
    ladder("llama", seed=0, init_weights=False).save_pretrained(folder)
    return folder


@pytest.fixture
def adapter(saved, tmp_path):
    """A copy of `saved` that a test may damage."""
    return shutil.copytree(saved, tmp_path / "adapter")


def snapshot(model) -> tuple:
    return [type(m) for m in model.modules()], {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}


def assert_untouched(model, before) -> None:
    types, params = snapshot(model)
    assert not any(isinstance(m, LadderLayer) for m in model.modules())
    assert types == before[0]
    assert params.keys() == before[1].keys()
    assert all(torch.equal(p, before[1][n][0]) and grad == before[1][n][1] for n, (p, grad) in params.items())


def load_fails(folder, error, match, base=None):
    """PeftModel.from_pretrained(base, folder) raises `error` matching `match`; the base is left as it was."""
    base = base if base is not None else tiny_causal_lm("llama")
    before = snapshot(base)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(base, folder)
    assert_untouched(base, before)


def edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# --- fields and formats a newer peft-ladder writes ----------------------------------------------------------------


def test_an_unknown_field_names_the_field_and_the_version_that_wrote_it(adapter):
    edit_config(adapter, side_dropout=0.1, peft_ladder_version="9.9.0", peft_version="9.0.0")
    match = (
        r"adapter_config\.json: This Ladder adapter's config has fields that peft-ladder .* does not know: "
        r"\['side_dropout'\]\. It was written by peft-ladder 9\.9\.0 with peft 9\.0\.0\. .* "
        r"pip install -U 'peft-ladder>=9\.9\.0' 'peft>=9\.0\.0'"
    )
    load_fails(adapter, TypeError, match)


def test_an_unknown_field_is_an_error_for_every_config_reader_not_a_dropped_field(adapter):
    """PEFT itself drops unknown fields with a warning (PeftConfig.from_peft_type); for Ladder that is an error."""
    edit_config(adapter, side_dropout=0.1)
    for reader in (PeftConfig, LadderConfig):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # not PEFT's "these are ignored" warning either
            with pytest.raises(TypeError, match=r"does not know: \['side_dropout'\]"):
                reader.from_pretrained(adapter)


def test_a_misspelt_field_in_code_gets_a_suggestion():
    with pytest.raises(
        TypeError, match=r"LadderConfig has no field 'reduction_factr' \(did you mean 'reduction_factor'"
    ):
        LadderConfig(reduction_factr=4)


def test_a_newer_format_is_refused_through_peft_model_from_pretrained(adapter):
    edit_config(adapter, ladder_format_version=LADDER_FORMAT_VERSION + 1, peft_ladder_version="9.9.0")
    load_fails(
        adapter,
        ValueError,
        rf"ladder_format_version={NEWER}: .* format {NEWER} by peft-ladder 9\.9\.0; .* 'peft-ladder>=9\.9\.0'",
    )


# --- a base model the adapter was not saved for -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "overrides", "match"),
    [
        (
            "llama",
            {"num_hidden_layers": 2},
            r"saved for a backbone of 4 layers; this model has 2 layers \(the adapter reads hidden states "
            r"\[0, 1, 2, 3, 4\], on this model it would read \[0, 1, 2\]\)\. Tensors in the file but not in this "
            r"model: ladder_side\.blocks\.2\.",
        ),
        (
            "llama",
            {"num_hidden_layers": 6},
            r"saved for a backbone of 4 layers; this model has 6 layers .* Tensors missing from the file: "
            r"ladder_side\.blocks\.4\.",
        ),
        (
            "llama",
            {"hidden_size": 128, "intermediate_size": 256},
            r"saved for a backbone of hidden size 64 \(side width 16\); this model has hidden size 128 \(side width "
            r"32\)\. Tensors with other shapes: .*\(file \(16,\), model \(32,\)\)",
        ),
        ("qwen2", {}, r"another architecture: .* other parameters than this model's \(self_attn\.k_proj\.bias"),
        ("gpt2", {}, r"another architecture: its side network sits at \['model\.norm'\], this model's final norm is "),
    ],
    ids=["fewer-layers", "more-layers", "wider", "qwen2", "gpt2"],
)
def test_a_mismatched_base_is_refused_naming_what_differs(saved, arch, overrides, match):
    base = tiny_causal_lm(arch, **overrides)
    load_fails(saved, ValueError, r"does not fit this base model\. The base model is unchanged\. .*" + match, base)


def test_a_state_dict_with_a_missing_or_an_extra_ladder_key_is_an_error_not_a_warning(adapter):
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("ladder_side.down.0.bias"))
    save_file({k: v for k, v in weights.items() if k != key}, adapter / "adapter_model.safetensors")
    load_fails(adapter, ValueError, r"Tensors missing from the file: ladder_side\.down\.0\.bias\.")
    extra = key.replace("down.0.bias", "down.9.bias")
    save_file({**weights, extra: weights[key].clone()}, adapter / "adapter_model.safetensors")
    load_fails(adapter, ValueError, r"Tensors in the file but not in this model: ladder_side\.down\.9\.bias\.")


def test_set_peft_model_state_dict_refuses_a_partial_state_dict_and_loads_nothing(saved):
    model = ladder("llama", seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = load_file(saved / "adapter_model.safetensors")
    partial = {k: v for k, v in weights.items() if ".blocks.3." not in k}
    with pytest.raises(
        ValueError, match=r"this state dict does not fit .* Nothing was loaded\. .* missing from the file"
    ):
        set_peft_model_state_dict(model, partial)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    set_peft_model_state_dict(model, weights)  # the complete one loads
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- damaged files ------------------------------------------------------------------------------------------------


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda data: b"", r"header too small"),
        (_truncated, r"file not fully covered"),
        (lambda data: b"\xff" * 64, r"header too large"),
    ],
    ids=["empty", "truncated", "garbage"],
)
def test_a_damaged_weights_file_is_named_and_the_base_model_is_untouched(adapter, damage, match):
    path = adapter / "adapter_model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    load_fails(
        adapter,
        AdapterFileError,
        rf"{path} cannot be read \(.*{match}.*\): the file is empty, truncated or "
        rf"damaged\. {RESAVE}\. The base model was not changed\.",
    )


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda text: "", r"is empty; it should hold the adapter's config as JSON"),
        (_truncated, r"is not valid JSON \(.*, line \d+ column \d+\): the file is truncated or damaged"),
        (lambda text: text.replace("}", ",}"), r"is not valid JSON"),
        (lambda text: "[]", r"holds a JSON list, not an object of config fields"),
    ],
    ids=["empty", "truncated", "trailing-comma", "a-list"],
)
def test_a_damaged_config_file_is_named_and_the_base_model_is_untouched(adapter, damage, match):
    path = adapter / "adapter_config.json"
    path.write_bytes(damage(path.read_bytes()) if damage is _truncated else damage(path.read_text()).encode())
    load_fails(adapter, AdapterFileError, rf"{path} {match}.*{RESAVE}")


def test_a_binary_config_file_is_named(adapter):
    (adapter / "adapter_config.json").write_bytes(b"\x80\x81\xfe")
    load_fails(adapter, AdapterFileError, rf"adapter_config\.json is not text .* {RESAVE}")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"reduction_factor": "4"}, r"reduction_factor='4' must be a positive integer"),
        ({"init_weights": "false"}, r"init_weights='false' must be True or False"),
        ({"connections": {"0": 0.5}}, r"connections=\{'0': 0\.5\} must map integer backbone layers"),
        ({"modules_to_save": "lm_head"}, r"modules_to_save='lm_head' is a string; .*=\['lm_head'\]"),
        ({"gate_temperature": None}, r"gate_temperature=None must be a positive number"),
    ],
)
def test_a_field_of_the_wrong_type_names_the_file_and_the_field(adapter, changes, match):
    edit_config(adapter, **changes)
    load_fails(adapter, ValueError, rf"{adapter / 'adapter_config.json'}: {match}")


def test_load_adapter_of_a_damaged_file_leaves_the_loaded_adapters_as_they_were(saved, adapter):
    model = PeftModel.from_pretrained(tiny_causal_lm("llama"), saved)
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors cannot be read"):
        model.load_adapter(adapter, adapter_name="second")
    assert list(model.peft_config) == ["default"]
