"""Bad input tried systematically: random values, types and combinations for every `LadderConfig` field.

Each field draws from its valid values and from a pool of wrong ones (wrong types, bools where numbers belong, NaN,
negatives, strings). `problems` is the specification, written independently of config.py: which fields of a draw are
invalid, alone or in combination. An invalid draw must raise ValueError or TypeError naming one of those fields; a
valid one must construct. `model_problems` adds what only the model can tell (a map naming layer 7 of a 4-layer model,
a reduction_factor not dividing the hidden size): `get_peft_model` must then raise naming the field and leave the
model as it was, and otherwise attach and train one step (finite loss, no backbone gradient).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from hypothesis import event, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_ladder import LadderConfig, initialize_side_fisher
from peft_ladder.config import LADDER_FORMAT_VERSION

JUNK = [None, True, False, 0, -1, 1.5, 2.0, math.nan, math.inf, "", "yes", "2", [], [1], {}, (1,), object()]


def _junk(*keep_out) -> st.SearchStrategy:
    """The wrong-value pool without the values that are valid for the field at hand."""
    return st.sampled_from([v for v in JUNK if not any(v is k or (type(v) is type(k) and v == k) for k in keep_out)])


def _ints(low: int, high: int) -> st.SearchStrategy:
    return st.integers(low, high)


def connection_maps() -> st.SearchStrategy:
    """Explicit maps with random keys and values: negative, out of range, duplicate targets, wrong types."""
    index = st.one_of(_ints(-2, 7), st.sampled_from([True, 1.5, "1", None]))
    return st.dictionaries(index, index, min_size=0, max_size=4)


FIELDS = {
    "reduction_factor": st.one_of(st.sampled_from([1, 2, 4, 8, 16, 3, 5, 64, 128]), _junk(1, 2.0)),
    "side_layers": st.one_of(st.none(), _ints(1, 6), _ints(-2, 0), _junk(None)),
    "connections": st.one_of(st.sampled_from(["ladder", "xladder", "Ladder", "x"]), connection_maps(), _junk()),
    "xladder_depth": st.one_of(st.none(), _ints(1, 5), _ints(-1, 0), _junk(None)),
    "gate": st.one_of(
        st.sampled_from(["sum", "learned", "max"]), st.floats(-0.5, 1.5), st.floats(allow_nan=True), _junk(0, 0.0)
    ),
    "gate_temperature": st.one_of(st.floats(1e-3, 10.0), st.floats(-1.0, 0.0), _junk(2.0)),
    "init_weights": st.one_of(st.booleans(), _junk(True, False)),
    "side_init": st.sampled_from(["default", "magnitude", "fisher", "Default", "", None, 1]),
    "fusion_scale": st.sampled_from(["rms", "rms_gain", "RMS", "median", None, 1.0]),
    "quantization": st.sampled_from([None, "4bit", "8bit", "4", "int8", True, 4]),
    "bnb_4bit_quant_type": st.sampled_from(["nf4", "fp4", "int4", None, 4]),
    "bnb_4bit_compute_dtype": st.sampled_from(
        [None, "float32", "bfloat16", "float16", torch.float32, torch.bfloat16, "int8", torch.int8, float, 32]
    ),
    "bnb_4bit_use_double_quant": st.one_of(st.booleans(), _junk(True, False)),
    "loss_chunk_size": st.one_of(st.none(), _ints(1, 512), _ints(-2, 0), _junk(None, 2.0)),
    "modules_to_save": st.sampled_from([None, ["lm_head"], "lm_head", [""], [1], ("lm_head",), "score", 3]),
    "inference_mode": st.one_of(st.booleans(), _junk(True, False)),
    "ladder_format_version": st.sampled_from([1, 2, 3, 0, -1, True, "2", 2.0]),
    "peft_ladder_version": st.sampled_from(["0.1.0", 1, ["0.1"]]),
    "trainable_token_indices": st.sampled_from(
        [None, [3, 4], (3,), {"embed_tokens": [3]}, {"lm_head": [5, 6]}, [], {}, [-1], [1.5], [True], "embed_tokens"]
        + [{"embed_tokens": 3}, {0: [3]}, {"": [3]}, {"lm_head": []}, 5]
    ),
    "reduction_factr": st.just(8),  # a misspelt field: an unknown keyword
}
# Each field is left out (its default) half the time, so errors in one field are not always masked by another.
configs = st.fixed_dictionaries({}, optional=FIELDS)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _map_ok(connections) -> bool:
    if not isinstance(connections, dict) or not connections:
        return False
    keys, values = list(connections), list(connections.values())
    return (
        all(_int(v) and v >= 0 for v in keys + values)
        and len(set(values)) == len(values)  # each side block takes at most one backbone layer
    )


def problems(kw: dict) -> set[str]:
    """The fields of `kw` that make LadderConfig(**kw) invalid (any of them may be the one the error names)."""
    bad = set()
    get = kw.get
    if "reduction_factr" in kw:
        bad.add("reduction_factr")
    if not (_int(get("reduction_factor", 8)) and get("reduction_factor", 8) >= 1):
        bad.add("reduction_factor")
    side_layers = get("side_layers")
    if side_layers is not None and not (_int(side_layers) and side_layers >= 1):
        bad.add("side_layers")
    connections = get("connections", "ladder")
    preset = connections in ("ladder", "xladder")
    if not preset and not _map_ok(connections):
        bad.add("connections")
    if _map_ok(connections) and _int(side_layers) and side_layers >= 1 and side_layers <= max(connections.values()):
        bad |= {"side_layers", "connections"}
    depth = get("xladder_depth")
    if depth is not None:
        if connections != "xladder" or not (_int(depth) and depth >= 1):
            bad.add("xladder_depth")
        elif _int(side_layers) and side_layers >= 1 and depth > side_layers:
            bad |= {"xladder_depth", "side_layers"}
    gate = get("gate", "sum")
    if gate not in ("sum", "learned") and not (_real(gate) and 0 <= gate <= 1):
        bad.add("gate")
    temperature = get("gate_temperature", 0.1)
    if not (_real(temperature) and 0 < temperature < math.inf):
        bad.add("gate_temperature")
    for name in ("init_weights", "bnb_4bit_use_double_quant", "inference_mode"):
        if not isinstance(get(name, True), bool):
            bad.add(name)
    choices = {
        "side_init": ("default", "magnitude", "fisher"),
        "fusion_scale": ("rms", "rms_gain"),
        "quantization": (None, "4bit", "8bit"),
        "bnb_4bit_quant_type": ("nf4", "fp4"),
    }
    for name, allowed in choices.items():
        if name in kw and not any(kw[name] == a and type(kw[name]) is type(a) for a in allowed):
            bad.add(name)
    if get("bnb_4bit_compute_dtype") not in (None, "float32", "bfloat16", "float16", torch.float32, torch.bfloat16):
        bad.add("bnb_4bit_compute_dtype")
    chunk = get("loss_chunk_size")
    if chunk is not None and not (_int(chunk) and chunk >= 1):
        bad.add("loss_chunk_size")
    modules = get("modules_to_save")
    if modules is not None and not (
        isinstance(modules, (list, tuple)) and all(isinstance(m, str) and m for m in modules)
    ):
        bad.add("modules_to_save")
    version = get("ladder_format_version", 2)
    if not (_int(version) and 1 <= version <= LADDER_FORMAT_VERSION):
        bad.add("ladder_format_version")
    if "peft_ladder_version" in kw and not isinstance(kw["peft_ladder_version"], str):
        bad.add("peft_ladder_version")
    tokens = get("trainable_token_indices")
    groups = tokens.items() if isinstance(tokens, dict) else [("embed_tokens", tokens)]
    if tokens is not None and (
        tokens in ({}, [], ())
        or not all(isinstance(key, str) and key for key, _ in groups)
        or not all(isinstance(ids, (list, tuple)) and ids and all(_int(i) and i >= 0 for i in ids) for _, ids in groups)
    ):
        bad.add("trainable_token_indices")
    return bad


def build(kw: dict) -> LadderConfig:
    return LadderConfig(task_type="CAUSAL_LM", **kw)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(configs)
def test_every_invalid_config_names_a_bad_field_and_every_valid_one_constructs(kw):
    bad = problems(kw)
    if not bad:
        build(kw)
        return
    with pytest.raises((ValueError, TypeError)) as error:
        build(kw)
    message = str(error.value)
    assert any(name in message for name in bad), (bad, message)


# --- against a model ----------------------------------------------------------------------------------------------

# The attach half draws only values LadderConfig accepts (combinations it refuses are filtered out) and leaves out:
# quantization (bitsandbytes quantizes on CPU in seconds per model; test_quantization.py covers that path);
# modules_to_save naming modules the model lacks (checked by PEFT and model.py, not LadderConfig); inference_mode=True
# (PEFT then freezes the adapter: nothing to train). Models: Llama, 2-4 layers, hidden 32 or 64 (head size 8 or 16).
valid_maps = st.lists(_ints(0, 6), min_size=1, max_size=4, unique=True).flatmap(
    lambda layers: st.permutations(range(len(layers) + 2)).map(lambda blocks: dict(zip(layers, blocks, strict=False)))
)  # distinct layers into distinct side blocks (zip stops at the shorter: the layers)
VALID = {
    "reduction_factor": st.sampled_from([1, 2, 4, 8, 16, 64, 3, 5]),  # 3, 5 divide neither 32 nor 64
    "side_layers": st.one_of(st.none(), _ints(1, 6)),
    "connections": st.one_of(st.sampled_from(["ladder", "xladder"]), valid_maps),
    "xladder_depth": st.one_of(st.none(), _ints(1, 5)),
    "gate": st.one_of(st.sampled_from(["sum", "learned"]), st.floats(0.0, 1.0)),
    "gate_temperature": st.floats(1e-3, 10.0),
    "init_weights": st.booleans(),
    "side_init": st.sampled_from(["default", "magnitude", "fisher"]),
    "fusion_scale": st.sampled_from(["rms", "rms_gain"]),
    "bnb_4bit_quant_type": st.sampled_from(["nf4", "fp4"]),
    "bnb_4bit_compute_dtype": st.sampled_from([None, "float32", torch.bfloat16]),
    "bnb_4bit_use_double_quant": st.booleans(),
    "loss_chunk_size": st.one_of(st.none(), _ints(1, 16)),
    "modules_to_save": st.sampled_from([None, ["lm_head"]]),
    # the tiny Llamas have 64 token ids; "wte" is GPT-2's name, not one of theirs
    "trainable_token_indices": st.sampled_from(
        [None, [3, 4], {"embed_tokens": [3]}, {"lm_head": [5, 63]}, [64], {"wte": [3]}]
    ),
}
models = st.tuples(st.integers(2, 4), st.sampled_from([32, 64]))


def tiny_llama(layers: int, hidden: int) -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config).eval()


def model_problems(kw: dict, layers: int, hidden: int) -> set[str]:
    """The fields of a valid config that do not fit a Llama of `layers` layers and width `hidden`."""
    bad = set()
    r = kw.get("reduction_factor", 8)
    if hidden % r:
        bad.add("reduction_factor")
    connections, side_layers = kw.get("connections", "ladder"), kw.get("side_layers")
    if isinstance(connections, dict) and max(connections) >= layers:
        bad.add("connections")
    if connections == "xladder":
        depth = kw.get("xladder_depth") or max(1, (side_layers or layers) // 2)
        if depth > layers:
            bad |= {"xladder_depth", "side_layers"}
    tokens = kw.get("trainable_token_indices")
    groups = tokens.items() if isinstance(tokens, dict) else [("embed_tokens", tokens or [])]
    if any(key not in ("embed_tokens", "lm_head") or max(ids) >= 64 for key, ids in groups if ids):
        bad.add("trainable_token_indices")
    return bad


def snapshot(model) -> tuple:
    return (
        [type(m) for m in model.modules()],
        {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()},
    )


def unchanged(model, before) -> bool:
    types, params = snapshot(model)
    return types == before[0] and all(
        torch.equal(p, before[1][name][0]) and grad == before[1][name][1] for name, (p, grad) in params.items()
    )


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(st.fixed_dictionaries({}, optional=VALID).filter(lambda kw: not problems(kw)), models)
def test_every_valid_config_attaches_and_trains_or_names_the_field_that_does_not_fit(kw, shape):
    layers, hidden = shape
    base = tiny_llama(layers, hidden)
    before = snapshot(base)
    bad = model_problems(kw, layers, hidden)
    if bad:
        with pytest.raises(ValueError) as error:
            get_peft_model(base, build(kw))
        assert any(name in str(error.value) for name in bad), (bad, str(error.value))
        assert unchanged(base, before)
        event(f"refused by the model: {sorted(bad)}")
        return
    model = get_peft_model(base, build(kw))
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    if kw.get("side_init") == "fisher":
        initialize_side_fisher(model, [{"input_ids": ids}])
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.grad is not None for name, p in model.named_parameters() if name in trainable)
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    event(f"attached and trained: side_init={kw.get('side_init', 'default')}")
