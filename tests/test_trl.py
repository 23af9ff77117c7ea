"""Ladder through TRL: `SFTTrainer(model, peft_config=LadderConfig(...))` with TRL's defaults, quantized models, DPO.

TRL's `SFTConfig` turns gradient checkpointing on by default and, for a model loaded in 4/8-bit, casts every trainable
parameter to bf16 (trl/trainer/sft_trainer.py, "QLoRA ... converted to bf16"). docs/how-to/training.md says what
Ladder does.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from accelerate.utils import extract_model_from_parallel
from conftest import logits, requires_bitsandbytes, tiny_causal_lm
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from tiny_training import CHECKPOINT_FILES, BackboneSaveProbe, char_tokenizer, counting_texts, watch_training

from peft_ladder import LadderConfig
from peft_ladder.layer import GC_WARNING

trl = pytest.importorskip("trl")


def sft_config(output_dir, **overrides):
    # TRL's defaults (gradient checkpointing on, bf16 on) except what a CPU test needs: use_cpu, few steps, no logging.
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=30,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        max_length=32,
        seed=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return trl.SFTConfig(**args)


def sft_trainer(output_dir, model=None, peft_config=None, **overrides):
    return trl.SFTTrainer(
        model=tiny_causal_lm("llama") if model is None else model,
        args=sft_config(output_dir, **overrides),
        train_dataset=Dataset.from_dict({"text": counting_texts(48)}),
        eval_dataset=Dataset.from_dict({"text": counting_texts(8, seed=99)}),
        processing_class=char_tokenizer(),
        peft_config=LadderConfig(task_type="CAUSAL_LM", reduction_factor=4) if peft_config is None else peft_config,
    )


def side_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if ".ladder_" in n}


def test_sft_config_defaults_turn_on_checkpointing_and_bf16():
    # What the tests below rely on: if TRL changes these defaults, the "TRL defaults" test no longer tests them.
    args = trl.SFTConfig(output_dir="unused", use_cpu=True, report_to=[])
    assert args.gradient_checkpointing is True and args.bf16 is True


@pytest.mark.slow
def test_sft_trainer_with_trl_defaults_learns_keeps_the_backbone_out_and_saves_only_the_adapter(tmp_path):
    trainer = sft_trainer(tmp_path / "run", save_strategy="steps", save_steps=30)  # checkpointing + bf16 autocast
    model = trainer.model
    assert isinstance(model, PeftModel) and side_dtypes(model) == {torch.float32}  # float backbone: no cast
    before = trainer.evaluate()["eval_loss"]
    with watch_training(model) as (probe, records):
        trainer.train()
    after = trainer.evaluate()["eval_loss"]

    assert after < before - 0.01, (before, after)  # held-out rows: a real improvement
    assert probe.calls > 0 and probe.kept == (0, 0)
    assert [str(w.message) for w in records].count(GC_WARNING) == 1
    checkpoint = tmp_path / "run" / "checkpoint-30"
    assert {p.name for p in checkpoint.iterdir()} == CHECKPOINT_FILES | {"tokenizer.json", "tokenizer_config.json"}
    keys = set(load_file(checkpoint / "adapter_model.safetensors"))
    assert keys == {n.replace(".default.", ".") for n, _ in model.named_parameters() if ".ladder_" in n}
    trainer.save_model(tmp_path / "final")
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path / "final")
    # bf16=True: accelerate wrapped the trained model's forward in autocast; compare without that wrapper.
    trained = extract_model_from_parallel(model, keep_fp32_wrapper=False)
    assert torch.equal(logits(reloaded.eval()), logits(trained.eval()))


def test_dpo_reference_pass_through_disable_adapter(tmp_path):
    # DPOTrainer without ref_model uses the PEFT model with disable_adapter() as the reference. A random (non-zero)
    # up-projection makes policy and reference differ from the first step on: rewards are then non-zero.
    texts = counting_texts(16, length=12)
    data = Dataset.from_dict(
        {"prompt": [t[:6] for t in texts], "chosen": [t[6:] for t in texts], "rejected": [t[6:][::-1] for t in texts]}
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=3e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = trl.DPOTrainer(
        model=tiny_causal_lm("llama"),
        args=args,
        train_dataset=data,
        processing_class=char_tokenizer(),
        peft_config=LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, init_weights=False),
    )
    assert trainer.ref_model is None
    probe = BackboneSaveProbe(trainer.model)
    with probe.track():
        trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    assert len(logs) == 3
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    assert abs(logs[0]["rewards/chosen"]) > 1e-4  # policy (Ladder) != reference (adapter disabled)
    assert probe.calls > 0 and probe.kept == (0, 0)
    with trainer.model.disable_adapter():
        assert torch.equal(logits(trainer.model.eval()), logits(tiny_causal_lm("llama")))


def _four_bit_model(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization)


@pytest.mark.slow
@pytest.mark.bitsandbytes
@requires_bitsandbytes
def test_qlora_style_4bit_model_trl_casts_the_side_network_to_bf16_and_it_trains(tmp_path):
    # The QLoRA recipe: a model loaded in 4-bit. TRL casts trainable parameters to bf16; Ladder accepts it (see
    # docs/how-to/training.md: same policy as LoRA adapters there, half the side network's weight/grad/optimizer
    # memory).
    trainer = sft_trainer(tmp_path / "run", model=_four_bit_model(tmp_path), bf16=False)
    assert side_dtypes(trainer.model) == {torch.bfloat16}
    before = trainer.evaluate()["eval_loss"]
    probe = BackboneSaveProbe(trainer.model)
    with probe.track():
        trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.01, (before, after)  # held-out rows: a real improvement
    assert probe.calls > 0 and probe.kept == (0, 0)
    assert side_dtypes(trainer.model) == {torch.bfloat16}


@pytest.mark.bitsandbytes
@requires_bitsandbytes
def test_fp32_side_network_on_a_4bit_model_by_upcasting_before_train(tmp_path):
    # The documented opt-out: upcast the trainable parameters after building the trainer, before train() creates the
    # optimizer, so weights and AdamW states are fp32.
    trainer = sft_trainer(tmp_path / "run", model=_four_bit_model(tmp_path), bf16=False, max_steps=2)
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    trainer.train()
    assert side_dtypes(trainer.model) == {torch.float32}
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and all(s["exp_avg"].dtype == torch.float32 for s in states)


@pytest.mark.bitsandbytes
@requires_bitsandbytes
def test_ladder_quantization_through_sft_trainer_keeps_the_side_network_fp32(tmp_path):
    # TRL decides on its bf16 cast before it calls get_peft_model; Ladder's own quantization happens inside it, so
    # the backbone ends up 4-bit and the side network keeps fp32.
    import bitsandbytes as bnb

    config = LadderConfig(
        task_type="CAUSAL_LM", reduction_factor=4, quantization="4bit", bnb_4bit_compute_dtype="float32"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = sft_trainer(tmp_path / "run", peft_config=config, bf16=False, max_steps=2)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert side_dtypes(trainer.model) == {torch.float32}
    trainer.train()
    assert side_dtypes(trainer.model) == {torch.float32}
