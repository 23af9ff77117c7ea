"""Ladder inside transformers' `Trainer`: real training runs on tiny models, checkpoints, resume, accumulation.

The settings that LoRA/QLoRA training code turns on (gradient checkpointing, input gradients, k-bit preparation)
must neither break Ladder nor bring the backbone back into autograd.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import batch, ladder, logits, requires_bitsandbytes, tiny_causal_lm
from datasets import Dataset
from peft import PeftModel, prepare_model_for_kbit_training
from safetensors.torch import load_file
from tiny_training import CHECKPOINT_FILES, BackboneSaveProbe, counting_rows, side_parameters, watch_training
from transformers import Trainer, TrainingArguments

from peft_ladder.layer import GC_WARNING
from peft_ladder.memory import saved_bytes


def training_args(output_dir, **overrides) -> TrainingArguments:
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=6,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return TrainingArguments(**args)


def train_dataset(count: int = 48, **kwargs) -> Dataset:
    return Dataset.from_list(counting_rows(count, **kwargs))


def gc_warnings(records) -> list:
    return [w for w in records if str(w.message) == GC_WARNING]


@pytest.mark.slow
def test_trainer_learns_with_checkpointing_keeps_the_backbone_out_of_autograd_and_warns_once(tmp_path):
    model = ladder(seed=0)
    args = training_args(
        tmp_path, max_steps=40, learning_rate=3e-3, lr_scheduler_type="constant", activation_checkpointing=True
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset(), eval_dataset=train_dataset(8, seed=99))
    before = trainer.evaluate()["eval_loss"]
    with watch_training(model) as (probe, records):
        trainer.train()
    after = trainer.evaluate()["eval_loss"]

    assert after < before - 0.01, (before, after)  # held-out rows: a real improvement
    assert probe.kept == (0, 0)  # nothing the backbone computed was kept for backward
    assert probe.calls == 40 * 5  # embeddings + 4 layers, once per step
    assert len(gc_warnings(records)) == 1  # once per model, not once per layer and step
    side = model.base_model.model.model.norm.ladder_side["default"]
    assert all(block.gradient_checkpointing for block in side.blocks)  # the side blocks are what gets checkpointed
    assert all(p.grad is None for n, p in model.named_parameters() if ".ladder_" not in n)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_backbone_save_probe_sees_a_backbone_that_runs_with_grad(checkpointing):
    # The probe must be able to fail: with the adapter disabled and input gradients on, the backbone is in autograd
    # (what any PEFT method without a no-grad boundary pays). Under checkpointing the saves are hidden from the
    # saved-tensor count by the checkpoint's own hooks, and the outputs' graph shows it instead.
    model = ladder(seed=0)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    probe = BackboneSaveProbe(model)
    with probe.track(), model.disable_adapter():
        model(**batch(), labels=batch()["input_ids"]).loss.backward()
    assert probe.graph_outputs == 4  # the 4 decoder layers (the embedding output is a leaf that requires grad)
    if not checkpointing:
        assert probe.bytes > 0


def test_gradient_checkpointing_changes_no_weight_and_no_saved_byte(tmp_path):
    results = {}
    for checkpointing in (False, True):
        model = ladder(seed=0)
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path / str(checkpointing), max_steps=3, activation_checkpointing=checkpointing),
            train_dataset=train_dataset(),
        )
        with warnings.catch_warnings(record=True) as records:
            warnings.simplefilter("always")
            trainer.train()
        assert len(gc_warnings(records)) == int(checkpointing)
        model.train()
        inputs = dict(batch(), labels=batch()["input_ids"])
        results[checkpointing] = (side_parameters(model), saved_bytes(model, inputs))
    (plain, plain_bytes), (checkpointed, checkpointed_bytes) = results[False], results[True]
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    # LadderConfig.side_checkpointing alone decides about the side blocks, and the backbone keeps nothing anyway.
    assert checkpointed_bytes == plain_bytes


def test_checkpoints_hold_only_the_adapter_and_the_final_adapter_reloads_identically(tmp_path):
    model = ladder(seed=0, connections="xladder")
    args = training_args(tmp_path / "run", save_strategy="steps", save_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset())
    trainer.train()
    ladder_keys = {n.replace(".default.", ".") for n, _ in model.named_parameters() if ".ladder_" in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in (3, 6):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES
        assert set(load_file(checkpoint / "adapter_model.safetensors")) == ladder_keys
        optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        assert len(optimizer["state"]) == len(trainable)  # optimizer state for the side network only

    trainer.save_model(tmp_path / "final")
    assert {p.name for p in (tmp_path / "final").iterdir()} == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_args.bin",
    }
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "final")
    assert torch.equal(logits(reloaded.eval()), logits(model.eval()))
    assert not torch.equal(logits(reloaded.eval()), logits(tiny_causal_lm("llama")))  # it did train


def test_resume_from_checkpoint_continues_with_the_same_adapter_and_optimizer_state(tmp_path):
    args = dict(save_strategy="steps", save_steps=3, max_steps=6)
    uninterrupted = ladder(seed=0)
    Trainer(model=uninterrupted, args=training_args(tmp_path / "a", **args), train_dataset=train_dataset()).train()

    resumed = ladder(seed=123)  # a different side initialisation: only the checkpoint can make them agree
    trainer = Trainer(model=resumed, args=training_args(tmp_path / "b", **args), train_dataset=train_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert trainer.state.global_step == 6
    expected, got = side_parameters(uninterrupted), side_parameters(resumed)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_accumulation_gives_the_gradients_of_one_big_batch(tmp_path):
    # Rows with different numbers of loss tokens; SGD without clipping, so the weights show the gradient itself.
    data = train_dataset(16, masked_prefix=True)
    common = dict(max_steps=2, optim="sgd", learning_rate=0.5, max_grad_norm=0.0, lr_scheduler_type="constant")
    runs = {}
    for name, (size, accumulation) in {"big": (8, 1), "accumulated": (2, 4)}.items():
        model = ladder(seed=0, init_weights=False)
        args = training_args(
            tmp_path / name, per_device_train_batch_size=size, gradient_accumulation_steps=accumulation, **common
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        runs[name] = side_parameters(model)
    for name in runs["big"]:
        torch.testing.assert_close(runs["accumulated"][name], runs["big"][name], rtol=1e-4, atol=1e-6, msg=name)

    # ... and the test can tell: a mean of micro-batch means is a different gradient on these rows.
    def gradient(chunks):
        model = ladder(seed=0, init_weights=False).train()
        for rows in chunks:
            inputs = {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}
            (model(**inputs).loss / len(chunks)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    rows = data[:8]
    whole = gradient([rows])
    means = gradient([{k: v[i : i + 2] for k, v in rows.items()} for i in range(0, 8, 2)])
    assert (whole - means).abs().max() > 1e-4


def test_disable_adapter_inside_a_training_step_gives_the_base_model_and_keeps_the_backward():
    # TRL's DPO/GRPO without a reference model: policy pass, reference pass under disable_adapter(), one backward.
    # Like DPO, the policy pass has no labels and the loss is computed from the logits.
    inputs = batch()
    base_logits = logits(tiny_causal_lm("llama"))

    def step(reference: str):
        model = ladder(seed=0, init_weights=False).train()
        model.enable_input_require_grads()  # as gradient checkpointing / k-bit preparation leave it
        ref_logits = None
        if reference == "before":
            with torch.no_grad(), model.disable_adapter():
                ref_logits = model(**inputs).logits
        policy_logits = model(**inputs).logits
        loss = torch.nn.functional.cross_entropy(
            policy_logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten()
        )
        if reference == "after":
            with torch.no_grad(), model.disable_adapter():
                ref_logits = model(**inputs).logits
        if reference == "with grad":  # a reference pass run with autograd on, as some trainers do
            with model.disable_adapter():
                ref_logits = model(**inputs).logits
            loss = loss + (policy_logits - ref_logits).pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        return ref_logits, policy_logits.detach(), grads

    _, policy_alone, grads_alone = step("none")
    for reference in ("before", "after"):
        ref_logits, policy_logits, grads = step(reference)
        assert torch.equal(ref_logits, base_logits), reference
        assert torch.equal(policy_logits, policy_alone), reference
        for name, grad in grads_alone.items():
            assert torch.equal(grads[name], grad), (reference, name)
    ref_logits, _, grads = step("with grad")
    assert torch.equal(ref_logits.detach(), base_logits)
    assert grads.keys() == grads_alone.keys() and all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.bitsandbytes
@requires_bitsandbytes
def test_qlora_recipe_4bit_prepare_for_kbit_training_then_trainer_keeps_the_backbone_out(tmp_path):
    # QLoRA code: load in 4-bit, prepare_model_for_kbit_training (fp32 upcast, input grads, gradient checkpointing),
    # then the PEFT config: here Ladder's.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = ladder(base, seed=0)
    trainer = Trainer(model=model, args=training_args(tmp_path / "run", max_steps=3), train_dataset=train_dataset())
    with watch_training(model) as (probe, records):
        result = trainer.train()
    assert probe.calls > 0 and probe.kept == (0, 0)
    assert len(gc_warnings(records)) == 1
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(p.grad is None for n, p in model.named_parameters() if ".ladder_" not in n)
    side = model.base_model.model.model.norm.ladder_side["default"]
    assert not any(block.gradient_checkpointing for block in side.blocks)  # enabled before the adapter existed
