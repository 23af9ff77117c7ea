"""Every PEFT, transformers and TRL option that reaches the Ladder tuner either works or is refused with a fix.

One test (or parametrized group) per row of docs/how-to/options.md, which names them. Refusals happen before the
model is touched: the tests check that the model is unchanged afterwards.
"""

from __future__ import annotations

import re
import types
import warnings

import pytest
import torch
from conftest import batch, ladder, logits, tiny_causal_lm
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from test_trainer import train_dataset, training_args
from tiny_training import char_tokenizer, counting_texts, side_parameters
from transformers import AutoModelForCausalLM, Trainer

from peft_ladder import LadderConfig
from peft_ladder.layer import GC_WARNING, LadderLayer


def snapshot(model) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_untouched(model, before: dict) -> None:
    assert not any(isinstance(m, LadderLayer) for m in model.modules())
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def trained_side(model) -> tuple[int, int]:
    """(ladder parameters with a gradient, ladder parameters) after one training forward and backward."""
    model.train()
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    side = [p for n, p in model.named_parameters() if ".ladder_" in n]
    return sum(p.grad is not None for p in side), len(side)


# --- LadderConfig fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"r": 16}, "use reduction_factor"),
        ({"rank_pattern": {"q_proj": 4}}, "use reduction_factor"),
        ({"lora_alpha": 32}, "fusion_scale"),
        ({"lora_dropout": 0.05}, "dropout"),
        ({"target_modules": "all-linear"}, "connections"),
        ({"exclude_modules": ["lm_head"]}, "connections"),
        ({"layers_to_transform": [0, 1]}, "connections"),
        ({"layers_pattern": "layers"}, "connections"),
        ({"bias": "lora_only"}, "modules_to_save"),
        ({"init_lora_weights": "gaussian"}, "init_weights"),
        ({"use_dora": True}, "LoraConfig"),
    ],
)
def test_lora_only_fields_are_refused_with_the_ladder_equivalent(kwargs, fix):
    ((name, value),) = kwargs.items()
    with pytest.raises(TypeError, match=re.escape(f"LoRA option {name}={value!r};") + f".*{fix}"):
        LadderConfig(task_type="CAUSAL_LM", **kwargs)


@pytest.mark.parametrize(
    "arch, entry, module",
    [
        ("llama", "embed_tokens", "model.embed_tokens"),
        ("llama", "layers.0.mlp", "model.layers.0.mlp"),
        ("llama", "model.norm", "model.norm"),
        ("gpt2", "wte", "transformer.wte"),
    ],
)
def test_modules_to_save_inside_the_decoder_is_refused_before_the_model_is_touched(arch, entry, module):
    model = tiny_causal_lm(arch)
    before = snapshot(model)
    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, modules_to_save=[entry])
    with pytest.raises(ValueError, match=rf"'{entry}' names `{module}`, inside the decoder .* without grad"):
        get_peft_model(model, config)
    assert_untouched(model, before)


def test_modules_to_save_matching_no_module_is_refused():
    model = tiny_causal_lm()
    before = snapshot(model)
    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, modules_to_save=["classifier_head"])
    with pytest.raises(ValueError, match=r"'classifier_head' matches no module of LlamaForCausalLM.*\['lm_head'\]"):
        get_peft_model(model, config)
    assert_untouched(model, before)


def test_modules_to_save_after_the_fusion_point_trains_and_is_saved(tmp_path):
    model = ladder(modules_to_save=["lm_head"], init_weights=False)
    model.train()
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert head.requires_grad and head.grad is not None and head.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.weight" in keys
    model.eval()
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path)
    assert torch.equal(logits(reloaded), logits(model))


def test_inference_mode_config_freezes_the_side_network():
    trainable = ladder(init_weights=False, seed=3)
    frozen = ladder(init_weights=False, seed=3, inference_mode=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(logits(frozen), logits(trainable))


# --- get_peft_model / PeftModel keyword arguments -----------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = ladder(init_weights=False, seed=3)
    model.save_pretrained(tmp_path / "adapter")
    return types.SimpleNamespace(path=tmp_path / "adapter", logits=logits(model))


def test_from_pretrained_is_trainable_false_freezes_and_true_trains(saved):
    frozen = PeftModel.from_pretrained(tiny_causal_lm(), saved.path)
    assert frozen.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.equal(logits(frozen), saved.logits)
    trainable = PeftModel.from_pretrained(tiny_causal_lm(), saved.path, is_trainable=True)
    with_grad, total = trained_side(trainable)
    assert total > 0 and with_grad == total


@pytest.mark.parametrize("autocast, side_dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_autocast_adapter_dtype_on_a_bf16_base(autocast, side_dtype):
    base = tiny_causal_lm().to(torch.bfloat16)
    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, init_weights=False)
    model = get_peft_model(base, config, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in model.named_parameters() if ".ladder_" in n} == {side_dtype}
    assert logits(model).dtype == torch.bfloat16  # the backbone's dtype, whatever the side network's
    assert trained_side(model)[0] > 0


def test_get_peft_model_low_cpu_mem_usage_makes_empty_weights_to_load(saved):
    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4)
    model = get_peft_model(tiny_causal_lm(), config, low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in model.named_parameters() if ".ladder_" in n)
    with pytest.raises(RuntimeError, match=r"'default' has no weights yet.*low_cpu_mem_usage=True"):
        model(**batch())
    set_peft_model_state_dict(model, load_file(saved.path / "adapter_model.safetensors"), low_cpu_mem_usage=True)
    assert torch.equal(logits(model), saved.logits)


def test_load_adapter_and_from_pretrained_low_cpu_mem_usage_give_identical_logits(saved):
    model = PeftModel.from_pretrained(tiny_causal_lm(), saved.path, low_cpu_mem_usage=True)
    assert torch.equal(logits(model), saved.logits)
    model = ladder()
    model.load_adapter(saved.path, adapter_name="loaded", low_cpu_mem_usage=True)
    model.set_adapter("loaded")
    assert torch.equal(logits(model), saved.logits)


def test_merge_adapter_refuses_and_leaves_the_adapter_working(saved):
    model = PeftModel.from_pretrained(tiny_causal_lm(), saved.path)
    with pytest.raises(NotImplementedError, match=r"unload\(\)"):
        model.merge_adapter()
    assert torch.equal(logits(model), saved.logits)


def test_attaching_raises_no_future_warning_and_lora_still_warns(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = ladder()
        model.add_adapter("second", LadderConfig(task_type="CAUSAL_LM", reduction_factor=4))
        PeftModel.from_pretrained(tiny_causal_lm(), saved.path)
    # Only Ladder models are quieted: PEFT's probe still warns for LoRA, as it does without peft-ladder.
    with pytest.warns(FutureWarning, match="is_gradient_checkpointing"):
        get_peft_model(tiny_causal_lm(), LoraConfig(task_type="CAUSAL_LM"))


# --- dtypes and devices after attaching --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cast, dtype",
    [
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.bfloat16(), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
    ],
    ids=["to-bfloat16", "bfloat16", "half"],
)
def test_casting_the_model_after_attaching_casts_the_side_network(cast, dtype):
    model = ladder(init_weights=False, seed=3)
    expected = logits(model)
    cast(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = logits(model)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.1)


@pytest.mark.parametrize(
    "device_map",
    [
        "auto",
        {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        | {f"model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(4)}
        | {"model.norm": "disk"},
    ],
    ids=["auto", "disk-offload"],
)
def test_device_map_with_offload_trains_and_matches_the_model_in_memory(device_map, tmp_path):
    tiny_causal_lm().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map=device_map, offload_folder=tmp_path)
    model = ladder(base, init_weights=False, seed=3)
    assert not any(p.is_meta for n, p in model.named_parameters() if ".ladder_" in n)
    assert torch.equal(logits(model.eval()), logits(ladder(init_weights=False, seed=3)))
    with_grad, total = trained_side(model)
    assert total > 0 and with_grad == total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_split_across_cpu_and_cuda_matches_one_device():
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": 0, "lm_head": 0}
    device_map |= {f"model.layers.{i}": "cpu" if i < 2 else 0 for i in range(4)}
    split = ladder(dispatch_model(tiny_causal_lm(), device_map, main_device="cpu"), init_weights=False, seed=3)
    assert {p.device.type for n, p in split.named_parameters() if ".ladder_" in n} == {"cuda"}
    torch.testing.assert_close(logits(split).cpu(), logits(ladder(init_weights=False, seed=3)), atol=1e-4, rtol=1e-4)
    with_grad, total = trained_side(split)
    assert total > 0 and with_grad == total


# --- Trainer ---------------------------------------------------------------------------------------------------------


def train_steps(tmp_path, steps: int = 2, **args) -> tuple[int, int]:
    """(side parameters changed, side parameters) after `steps` Trainer steps with `args`."""
    model = ladder(seed=0)
    before = side_parameters(model)
    Trainer(model=model, args=training_args(tmp_path, max_steps=steps, **args), train_dataset=train_dataset(16)).train()
    after = side_parameters(model)
    return sum(not torch.equal(before[k], after[k]) for k in before), len(before)


@pytest.mark.parametrize(
    "args",
    [{"bf16": True}, {"fp16": True}, {"label_names": ["labels"], "remove_unused_columns": False}],
    ids=["bf16", "fp16", "label_names-remove_unused_columns"],
)
def test_trainer_options_train_every_side_parameter(args, tmp_path):
    changed, total = train_steps(tmp_path, **args)
    assert total > 0 and changed == total


def test_trainer_activation_checkpointing_trains_and_warns_once(tmp_path):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        changed, total = train_steps(tmp_path, steps=3, activation_checkpointing=True)
    assert changed == total
    assert [str(w.message) for w in records].count(GC_WARNING) == 1


@pytest.mark.slow
def test_trainer_torch_compile_trains_every_side_parameter(tmp_path):
    changed, total = train_steps(tmp_path, torch_compile=True)
    assert total > 0 and changed == total


def test_a_replaced_fusion_forward_is_refused_instead_of_training_nothing():
    # What Liger kernels (use_liger_kernel=True) do to the final RMSNorm: bind another forward on the instance, which
    # is Ladder's fusion layer. The side network would be skipped; the first forward says so instead.
    model = ladder()
    fusion = model.base_model.model.model.norm
    fusion.forward = types.MethodType(lambda self, hidden: self.base_layer(hidden), fusion)
    with pytest.raises(RuntimeError, match=r"fusion layer .* did not run.*liger_kernel_config=\{'rms_norm': False\}"):
        model(**batch())


# --- TRL -----------------------------------------------------------------------------------------------------------

trl = pytest.importorskip("trl")


def sft_train(tmp_path, data: Dataset, tokenizer=None, **args) -> tuple[int, int]:
    from test_trl import sft_config

    trainer = trl.SFTTrainer(
        model=tiny_causal_lm(),
        args=sft_config(tmp_path, max_steps=2, bf16=False, **args),
        train_dataset=data,
        processing_class=tokenizer or char_tokenizer(),
        peft_config=LadderConfig(task_type="CAUSAL_LM", reduction_factor=4),
    )
    before = side_parameters(trainer.model)
    trainer.train()
    after = side_parameters(trainer.model)
    return sum(not torch.equal(before[k], after[k]) for k in before), len(before)


@pytest.mark.parametrize(
    "args",
    [{"packing": True}, {"packing": True, "padding_free": True}, {"padding_free": True, "max_length": None}],
    ids=["packing", "packing-padding_free", "padding_free"],
)
def test_sft_packing_and_padding_free_train_every_side_parameter(args, tmp_path):
    changed, total = sft_train(tmp_path, Dataset.from_dict({"text": counting_texts(16)}), **args)
    assert total > 0 and changed == total


def test_sft_completion_only_loss_trains_every_side_parameter(tmp_path):
    texts = counting_texts(16)
    data = Dataset.from_dict({"prompt": [t[:8] for t in texts], "completion": [t[8:] for t in texts]})
    changed, total = sft_train(tmp_path, data, completion_only_loss=True)
    assert total > 0 and changed == total


# A chat template that marks the assistant's turns, as assistant_only_loss needs (`{% generation %}`).
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def test_sft_assistant_only_loss_trains_every_side_parameter(tmp_path):
    texts = counting_texts(16)
    turns = [[{"role": "user", "content": t[:8]}, {"role": "assistant", "content": t[8:]}] for t in texts]
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    mask = tokenizer.apply_chat_template(turns[0], return_dict=True, return_assistant_tokens_mask=True)
    assert 0 < sum(mask["assistant_masks"]) < len(mask["input_ids"])  # the labels are masked, not all kept
    changed, total = sft_train(tmp_path, Dataset.from_dict({"messages": turns}), tokenizer, assistant_only_loss=True)
    assert total > 0 and changed == total
