"""Low-rank down-projections (LadderConfig.down_rank, QST's d -> k -> d_s): shape, identity, gradients, saving,
loading, errors, and the planner's count of them."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers as tf
from conftest import batch, ladder, logits, requires_bitsandbytes, side_of, tiny_causal_lm
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_ladder import LadderConfig
from peft_ladder.memory import SavedTensorCounter, held_tensors, storage_bytes
from peft_ladder.planner import estimate, saved_activation_bytes
from peft_ladder.taps import TapLinear

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "adapter-0.1.0.dev0-llama")
D, SIDE, RANK = 64, 16, 4  # tiny Llama hidden size, its side width at reduction_factor=4, the rank tested


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_each_tap_gets_a_rank_k_projection_with_fewer_parameters():
    full, low = ladder(seed=0), ladder(seed=0, down_rank=RANK)
    downs = list(side_of(low).down.values())
    assert len(downs) == len(side_of(full).down) == 5  # s_0's source and every layer's output
    for down in downs:
        assert isinstance(down, nn.Sequential) and len(down) == 2
        first, second = down
        assert (first.in_features, first.out_features, first.bias) == (D, RANK, None)
        assert (second.in_features, second.out_features, second.bias.shape) == (RANK, SIDE, (SIDE,))
    assert all(type(down) is TapLinear for down in side_of(full).down.values())
    assert all(type(down[0]) is TapLinear for down in downs)  # the first Linear reads the tap (taps.py)
    per_tap = (D * SIDE + SIDE) - (D * RANK + RANK * SIDE + SIDE)
    assert trainable(full) - trainable(low) == 5 * per_tap


def test_a_fresh_low_rank_adapter_is_the_identity():
    base = logits(tiny_causal_lm("llama"))
    assert torch.equal(logits(ladder("llama", down_rank=RANK)), base)


def test_gradients_reach_both_factors_and_no_backbone_weight():
    model = ladder(seed=0, down_rank=RANK, init_weights=False)
    model.train()
    inputs = batch()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, param in model.named_parameters():
        if ".ladder_side." in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert {n.rsplit("down.", 1)[1] for n, _ in model.named_parameters() if ".down.0." in n} == {
        "0.0.weight",
        "0.1.weight",
        "0.1.bias",
    }


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_and_reload_gives_the_same_outputs(tmp_path, low_cpu_mem_usage):
    model = ladder(seed=0, down_rank=RANK, init_weights=False).eval()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["down_rank"] == RANK
    weights = load_file(tmp_path / "adapter_model.safetensors")
    down = {k.split("ladder_side.", 1)[1]: tuple(v.shape) for k, v in weights.items() if ".down.2." in k}
    assert down == {"down.2.0.weight": (RANK, D), "down.2.1.weight": (SIDE, RANK), "down.2.1.bias": (SIDE,)}
    base = tiny_causal_lm("llama")
    reloaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert reloaded.peft_config["default"].down_rank == RANK
    assert torch.equal(logits(reloaded), logits(model))


def test_an_adapter_without_low_rank_does_not_write_the_field(tmp_path):
    """Older peft-ladder versions refuse unknown config fields: only adapters that use down_rank carry it."""
    ladder(seed=0).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "down_rank" not in saved
    assert LadderConfig.from_pretrained(tmp_path).down_rank is None


def test_an_adapter_saved_before_the_field_loads_with_full_projections():
    config = json.loads(open(os.path.join(FIXTURE, "adapter_config.json")).read())
    assert "down_rank" not in config
    model = PeftModel.from_pretrained(tiny_causal_lm("llama"), FIXTURE)
    assert model.peft_config["default"].down_rank is None
    assert all(type(down) is TapLinear for down in side_of(model).down.values())


@pytest.mark.parametrize(
    ("saved_rank", "config_rank", "match"),
    [
        (RANK, None, r"saved with rank-4 down-projections \(down_rank=4\); this config builds full down-projections"),
        (None, 8, r"saved with full down-projections \(down_rank=None\); this config builds rank-8 down-projections"),
        (RANK, 8, r"saved with rank-4 down-projections \(down_rank=4\); this config builds rank-8"),
    ],
)
def test_a_config_whose_down_rank_differs_from_the_weights_is_refused(tmp_path, saved_rank, config_rank, match):
    ladder(seed=0, down_rank=saved_rank).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config.pop("down_rank", None)
    if config_rank is not None:
        config["down_rank"] = config_rank
    path.write_text(json.dumps(config))
    base = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(hasattr(m, "ladder_side") for m in base.modules())  # nothing was wrapped


def test_load_adapter_with_a_state_dict_of_the_other_shape_is_refused(tmp_path):
    ladder(seed=0, down_rank=RANK).save_pretrained(tmp_path)
    model = ladder(seed=0)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    from peft.utils import set_peft_model_state_dict

    with pytest.raises(ValueError, match=r"Nothing was loaded\. .*saved with rank-4 down-projections"):
        set_peft_model_state_dict(model, weights)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (0, r"down_rank=0 must be a positive integer below the side width \(e\.g\. 16, as QST\) or None"),
        ("16", r"down_rank='16' must be a positive integer"),
        (True, r"down_rank=True must be a positive integer"),
    ],
)
def test_invalid_down_rank_is_refused(value, match):
    with pytest.raises(ValueError, match=match):
        LadderConfig(down_rank=value)


@pytest.mark.parametrize("rank", [SIDE, 40])
def test_a_rank_not_below_the_side_width_is_refused_before_the_model_changes(rank):
    base = tiny_causal_lm("llama")
    match = (
        rf"down_rank={rank} is not below the side width 16 \(hidden size / reduction_factor=4\): .* Use a down_rank "
        r"below 16 \(e\.g\. 4\) or None\."
    )
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, down_rank=rank))
    assert not any(hasattr(m, "ladder_side") for m in base.modules())


@pytest.mark.parametrize("side_init", ["magnitude", "fisher"])
def test_pruned_side_init_with_low_rank_is_refused(side_init):
    match = (
        rf"side_init='{side_init}' with down_rank=4: pruned init makes each down-projection a selection .* Use "
        r"side_init='default' with down_rank, or down_rank=None with pruned init\."
    )
    with pytest.raises(ValueError, match=match):
        LadderConfig(side_init=side_init, down_rank=RANK)


# --- the planner ---------------------------------------------------------------------------------------------------


def _qst_sized():
    """Wide enough for QST's k = 16 below the side width (256 / 8 = 32)."""
    return tf.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )


@pytest.mark.parametrize("connections", ["ladder", "xladder"])
def test_planner_counts_the_parameters_the_tuner_builds(connections):
    torch.manual_seed(0)
    config = LadderConfig(task_type="CAUSAL_LM", connections=connections, down_rank=16)
    model = get_peft_model(tf.LlamaForCausalLM(_qst_sized()), config)
    assert estimate(model.config, "ladder", ladder_config=config).trainable_params == trainable(model)


def test_planner_counts_what_autograd_saves_for_the_low_rank_middle():
    """The (tokens, k) middle of each down-projection is what low rank adds to the saved activations."""
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(_qst_sized()).to(torch.bfloat16)  # the planner's bf16 backbone, fp32 side network
    measured, predicted = {}, {}
    for rank in (None, 16):
        config = LadderConfig(task_type="CAUSAL_LM", loss_chunk_size=None, down_rank=rank)
        model = get_peft_model(base, config).train()
        inputs = {"input_ids": torch.randint(0, 128, (2, 64))}
        counter = SavedTensorCounter(model)
        with counter.track():
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        measured[rank] = counter.bytes
        predicted[rank] = saved_activation_bytes(model.config, "ladder-nochunk", 2, 64, ladder_config=config)
        base = model.unload()
    taps, tokens = 3, 128
    assert measured[16] - measured[None] == taps * tokens * 16 * 4  # fp32 (tokens, k) per tap
    assert predicted[16] - predicted[None] == measured[16] - measured[None]


def test_planner_70b_side_parameters_with_and_without_low_rank():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "configs", "llama-3.1-70b.json")
    full, low = estimate(path, "ladder-4bit"), estimate(path, "ladder-4bit-lowrank")
    # 81 taps of Linear(8192, 1024) against 81 of 8192 -> 16 -> 1024: 679.6M against 12.0M down-projection weights.
    assert full.trainable_params - low.trainable_params == 679_560_192 - 12_026_880
    middle = 81 * 2048 * 16 * 4  # each tap's fp32 (tokens, k) middle, saved for the second Linear's gradient
    assert low.activations - full.activations == middle
    # 16 bytes less per parameter (fp32 weight, gradient, two AdamW states): 10.7 GB
    assert full.total - low.total == 16 * (full.trainable_params - low.trainable_params) - middle


@pytest.mark.bitsandbytes
@requires_bitsandbytes
@pytest.mark.parametrize("down_rank", [None, 16])
def test_planner_8bit_adamw_state_follows_bitsandbytes_tensor_by_tensor(down_rank):
    """bitsandbytes keeps fp32 state for tensors under 4,096 values: at this width the side blocks' attention
    matrices (32 x 32) and the low-rank second factor (32 x 16) are such tensors, the first factor (16 x 256) is not."""
    bnb = pytest.importorskip("bitsandbytes", minversion="0.50")  # its 8-bit optimizers run on CPU from 0.50
    torch.manual_seed(0)
    config = LadderConfig(task_type="CAUSAL_LM", down_rank=down_rank)
    model = get_peft_model(tf.LlamaForCausalLM(_qst_sized()), config)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.numel() < 4096 for p in params} == {True, False}  # both kinds of state
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    code_books = 2 * 256 * 4  # qmap1, qmap2: one pair for all parameters
    measured = storage_bytes(held_tensors(optimizer=optimizer)) - code_books
    assert estimate(model.config, "ladder", optimizer="adamw_8bit", ladder_config=config).optimizer == measured
