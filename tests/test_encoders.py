"""Encoder-only backbones (BERT, RoBERTa, ModernBERT) for SEQ_CLS, TOKEN_CLS and FEATURE_EXTRACTION: the decoders'
guarantees over conftest's encoder table (identity at init, disable_adapter, gradients, the no-grad boundary,
save/reload, several adapters), then what is particular to encoders (padding, bidirectional side blocks, where the
fusion sits, the pooler)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import (
    CONFIG_CASES,
    ENCODER_ARCHS,
    ENCODER_LABELS,
    ENCODER_TASKS,
    QUANTIZED,
    VOCAB,
    batch,
    encoder_output,
    tiny_encoder,
)
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_training import BackboneSaveProbe

from peft_ladder import LadderConfig
from peft_ladder.backbone import find_backbone
from peft_ladder.layer import LadderFusionLayer, LadderTapLayer
from peft_ladder.memory import saved_bytes

FLOAT_CONFIGS = [name for name in CONFIG_CASES if name not in QUANTIZED]
# Every float config on every encoder with a classification head; the two presets on the other two tasks.
ENCODER_CASES = [
    pytest.param(arch, task, config, id=f"{arch}-{task}-{config}")
    for arch in ENCODER_ARCHS
    for task in ENCODER_TASKS
    for config in (FLOAT_CONFIGS if task == "SEQ_CLS" else ["ladder", "xladder"])
]
# Which module takes the side output: BERT / RoBERTa have no final norm, ModernBERT has one.
FUSION_MODULE = {"bert": "encoder", "roberta": "encoder", "modernbert": "final_norm"}
HEADS = {"SEQ_CLS": ["classifier"], "TOKEN_CLS": ["classifier"], "FEATURE_EXTRACTION": []}


def encoder_ladder(arch: str, task: str, **config_kwargs):
    config_kwargs = {"task_type": task, "reduction_factor": 4, **config_kwargs}
    return get_peft_model(tiny_encoder(arch, task), LadderConfig(**config_kwargs))


def training_loss(model, task: str, inputs: dict) -> torch.Tensor:
    """A loss for `task`: the model's own with labels, or a mean square of the embeddings for FEATURE_EXTRACTION."""
    generator = torch.Generator().manual_seed(0)
    B, T = inputs["input_ids"].shape
    if task == "SEQ_CLS":
        return model(**inputs, labels=torch.randint(0, ENCODER_LABELS, (B,), generator=generator)).loss
    if task == "TOKEN_CLS":
        return model(**inputs, labels=torch.randint(0, ENCODER_LABELS, (B, T), generator=generator)).loss
    return model(**inputs).last_hidden_state.pow(2).mean()


def right_padded(lengths=(12, 7)) -> tuple[dict, list[torch.Tensor]]:
    rows = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}, rows


# --- the common guarantees ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, task, config", ENCODER_CASES)
def test_fresh_adapter_reproduces_base_encoder_exactly(arch, task, config):
    inputs, _ = right_padded()
    expected = encoder_output(tiny_encoder(arch, task), inputs)
    model = encoder_ladder(arch, task, **CONFIG_CASES[config])
    assert torch.equal(encoder_output(model, inputs), expected)


@pytest.mark.parametrize("arch, task, config", ENCODER_CASES)
def test_random_adapter_changes_outputs_and_disable_adapter_restores_base(arch, task, config):
    expected = encoder_output(tiny_encoder(arch, task))
    model = encoder_ladder(arch, task, init_weights=False, **CONFIG_CASES[config])
    assert (encoder_output(model) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(encoder_output(model), expected)
    assert (encoder_output(model) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch, task, config", ENCODER_CASES)
def test_gradients_reach_ladder_parameters_and_the_head_only(arch, task, config):
    model = encoder_ladder(arch, task, init_weights=False, **CONFIG_CASES[config]).train()
    training_loss(model, task, batch()).backward()
    heads = [f".{head}.modules_to_save.default." for head in HEADS[task]]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".ladder_" in n or any(h in n for h in heads)}
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("task", list(ENCODER_TASKS))
@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_encoder_keeps_nothing_for_backward(arch, task):
    model = encoder_ladder(arch, task, init_weights=False).train()
    model.enable_input_require_grads()  # input gradients on: a backbone in autograd would save its activations
    probe = BackboneSaveProbe(model)
    with probe.track():
        training_loss(model, task, batch()).backward()
    assert probe.calls == 1 + 4  # the input embedding and the 4 encoder layers ran, once each
    assert probe.kept == (0, 0)


@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_input_gradients_add_no_saved_bytes_in_the_embeddings(arch):
    # The probe watches the token embedding and the layers; BERT's embeddings module also adds positions and a
    # LayerNorm: everything before the fusion point must stay out of autograd, whatever asks for input gradients.
    inputs = dict(batch(), labels=torch.tensor([0, 2]))
    reference = saved_bytes(encoder_ladder(arch, "SEQ_CLS", init_weights=False).train(), inputs)
    switched = encoder_ladder(arch, "SEQ_CLS", init_weights=False).train()
    switched.enable_input_require_grads()
    assert saved_bytes(switched, inputs) == reference


@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
@pytest.mark.parametrize("task", list(ENCODER_TASKS))
def test_saves_and_reloads_with_identical_outputs(arch, task, tmp_path):
    model = encoder_ladder(arch, task, connections="xladder", init_weights=False)
    expected = encoder_output(model)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    heads = {k for k in state if ".ladder_side." not in k}
    assert heads == {f"base_model.model.classifier.{k}" for k in _head_keys(model, task)}
    loaded = PeftModel.from_pretrained(tiny_encoder(arch, task), tmp_path)
    assert torch.equal(encoder_output(loaded), expected)


def _head_keys(model, task: str) -> set[str]:
    if not HEADS[task]:
        return set()
    return {k.split(".modules_to_save.default.")[1] for k, _ in model.named_parameters() if "modules_to_save" in k}


def test_reload_in_a_process_that_never_imports_peft_ladder(tmp_path):
    # One subprocess for the three encoders (the start-up hook registers LADDER when peft is imported).
    jobs = []
    for arch, task in (("bert", "SEQ_CLS"), ("roberta", "TOKEN_CLS"), ("modernbert", "FEATURE_EXTRACTION")):
        model = encoder_ladder(arch, task, init_weights=False)
        with torch.no_grad():  # a trained head differs from the freshly initialised one of the reloaded base
            for name, param in model.named_parameters():
                if "modules_to_save" in name:
                    param.normal_()
        base_dir, adapter_dir = tmp_path / f"{arch}-base", tmp_path / f"{arch}-adapter"
        tiny_encoder(arch, task).save_pretrained(base_dir)
        model.save_pretrained(adapter_dir)
        torch.save(encoder_output(model), tmp_path / f"{arch}.pt")
        jobs.append((ENCODER_TASKS[task].__name__, str(base_dir), str(adapter_dir), str(tmp_path / f"{arch}.pt")))
    script = textwrap.dedent(f"""
        import torch, transformers
        from peft import PeftModel
        inputs = {{k: torch.tensor(v) for k, v in {json.dumps({k: v.tolist() for k, v in batch().items()})}.items()}}
        for auto, base, adapter, expected in {jobs!r}:
            model = PeftModel.from_pretrained(getattr(transformers, auto).from_pretrained(base), adapter)
            with torch.no_grad():
                out = model(**inputs)
            got = out.logits if "logits" in out else out.last_hidden_state
            assert torch.equal(got, torch.load(expected)), (adapter, (got - torch.load(expected)).abs().max())
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-2000:]


@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_several_adapters(arch):
    model = encoder_ladder(arch, "SEQ_CLS", init_weights=False)
    first = encoder_output(model)
    config = LadderConfig(task_type="SEQ_CLS", reduction_factor=8 if arch != "modernbert" else 4, init_weights=False)
    model.add_adapter("second", config)
    assert torch.equal(encoder_output(model), first)
    model.set_adapter("second")
    second = encoder_output(model)
    assert not torch.equal(second, first)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".ladder_side.second." in n or ".modules_to_save.second." in n
    }
    model.set_adapter("default")
    assert torch.equal(encoder_output(model), first)
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted"):
        model.delete_adapter("default")
    assert model.active_adapter == "second" and torch.equal(encoder_output(model), second)


@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_unload_returns_the_plain_base_encoder(arch):
    expected = encoder_output(tiny_encoder(arch, "SEQ_CLS"))
    model = encoder_ladder(arch, "SEQ_CLS", init_weights=False)
    model.add_adapter("second", LadderConfig(task_type="SEQ_CLS", reduction_factor=4, init_weights=False))
    base = model.unload()
    assert not any(isinstance(m, (LadderTapLayer, LadderFusionLayer)) for m in base.modules())
    assert not any("ladder_" in n for n, _ in base.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())
    assert torch.equal(encoder_output(base), expected)


# --- what is particular to encoders ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_fusion_sits_where_the_last_hidden_state_leaves(arch):
    model = encoder_ladder(arch, "FEATURE_EXTRACTION")
    base = model.base_model.model
    taps = [m for m in base.modules() if isinstance(m, LadderTapLayer)]
    assert [t.layer_index for t in taps] == list(range(4))
    assert isinstance(base.get_submodule(FUSION_MODULE[arch]), LadderFusionLayer)
    assert find_backbone(base).kind == "encoder"


@pytest.mark.parametrize("task", list(ENCODER_TASKS))
@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_padded_rows_match_each_row_alone(arch, task):
    # The side blocks must use the backbone's padding mask: real tokens never attend to the padding.
    model = encoder_ladder(arch, task, init_weights=False)
    inputs, rows = right_padded()
    padded = encoder_output(model, inputs)
    for i, row in enumerate(rows):
        alone = encoder_output(model, {"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=int)})
        got = padded[i] if task == "SEQ_CLS" else padded[i, : len(row)]
        torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_side_blocks_attend_bidirectionally(arch):
    # Run the first side block on its own inputs, then with only the last position changed: the first position's
    # output changes, which a causal block would not allow.
    model = encoder_ladder(arch, "FEATURE_EXTRACTION", init_weights=False)
    block = next(m for m in model.modules() if isinstance(m, LadderFusionLayer)).ladder_side["default"].blocks[0]
    captured = {}
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    encoder_output(model)
    handle.remove()
    hidden, *rest = captured["args"]
    changed = hidden.clone()
    changed[:, -1] += torch.randn(changed.shape[-1], generator=torch.Generator().manual_seed(0))  # not a constant:
    # a pre-norm block's LayerNorm would remove that
    with torch.no_grad():
        before = block(hidden, *rest, **captured["kwargs"])
        after = block(changed, *rest, **captured["kwargs"])
    before, after = (out[0] if isinstance(out, tuple) else out for out in (before, after))
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4


def test_bert_pooler_is_after_the_fusion_point_and_trains_in_modules_to_save():
    model = encoder_ladder("bert", "SEQ_CLS", modules_to_save=["pooler"], init_weights=False).train()
    training_loss(model, "SEQ_CLS", batch()).backward()
    pooler = model.base_model.model.bert.pooler.modules_to_save["default"].dense.weight
    assert pooler.grad is not None and pooler.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "arch, entry, module",
    [("bert", "embeddings", "bert.embeddings"), ("roberta", "layer.1", "roberta.encoder.layer.1")],
)
def test_modules_to_save_before_the_fusion_point_is_refused(arch, entry, module):
    with pytest.raises(ValueError, match=rf"'{entry}' names `{module}`, inside the encoder `.*` .* without grad"):
        encoder_ladder(arch, "SEQ_CLS", modules_to_save=[entry])


def test_modernbert_side_width_must_split_into_rotary_heads():
    with pytest.raises(ValueError, match=r"reduction_factor=8 gives side width 8, .* multiple of 16, such as 4"):
        encoder_ladder("modernbert", "SEQ_CLS", reduction_factor=8)


def test_quantization_is_refused_on_encoders_before_the_model_is_touched():
    model = tiny_encoder("bert", "SEQ_CLS")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    config = LadderConfig(task_type="SEQ_CLS", quantization="4bit")
    with pytest.raises(ValueError, match=r"quantization='4bit'\) is not supported on encoder backbones yet"):
        get_peft_model(model, config)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    assert not any("4bit" in type(m).__name__ for m in model.modules())
