"""Training encoders for real: transformers' `Trainer` on BERT, RoBERTa and ModernBERT (SEQ_CLS with labels,
TOKEN_CLS), the classifier head trained through `modules_to_save` as PEFT does for LoRA, and
`trainable_token_indices` (peft_ladder/tokens.py) on encoders, where a classifier has no LM head and the token ids
get input rows only."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from conftest import ENCODER_ARCHS, ENCODER_LABELS, VOCAB, encoder_output, tiny_encoder
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from test_trainer import training_args as trainer_args
from tiny_training import BackboneSaveProbe
from transformers import Trainer, TrainingArguments

from peft_ladder import LadderConfig

LENGTH = 12
IDS = [5, 6, 90]  # token ids given rows; `padded()` puts them into sequence 0 only
ABSENT = 94  # an id with a row that no sequence holds


def padded(count: int = 2, seed: int = 1) -> dict:
    """`count` right-padded sequences of 7-12 tokens from ids 10-89; IDS at positions 1, 2, 3 of sequence 0."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, 90, (count, LENGTH), generator=generator)
    mask = torch.ones_like(input_ids)
    for row in range(count):
        length = 7 + (row * 5 + seed) % (LENGTH - 6)
        input_ids[row, length:], mask[row, length:] = 0, 0
    input_ids[0, 1:4] = torch.tensor(IDS)
    return {"input_ids": input_ids, "attention_mask": mask}


def labelled(task: str, count: int, seed: int) -> Dataset:
    """A task the frozen random backbone's taps can learn: the first token's id mod 3 (SEQ_CLS), or each token's id
    mod 3 (TOKEN_CLS, -100 on padding)."""
    inputs = padded(count, seed)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids[:, 0] % ENCODER_LABELS if task == "SEQ_CLS" else torch.where(mask.bool(), ids % ENCODER_LABELS, -100)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def training_args(output_dir, **overrides) -> TrainingArguments:
    """test_trainer's arguments, at a batch and a number of steps that teach the tiny encoders their task."""
    return trainer_args(output_dir, **{"per_device_train_batch_size": 8, "max_steps": 30, **overrides})


def encoder_ladder(arch: str, task: str, **config_kwargs):
    return get_peft_model(tiny_encoder(arch, task), LadderConfig(task_type=task, reduction_factor=4, **config_kwargs))


def token_rows(model):
    fusion = next(m for m in model.modules() if hasattr(m, "ladder_side"))
    return fusion.ladder_side["default"].tokens


# --- Trainer --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_trainer_learns_saves_and_the_saved_adapter_reloads_with_identical_outputs(arch, task, tmp_path):
    model = encoder_ladder(arch, task)
    base = tiny_encoder(arch, task)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path / "run", lr_scheduler_type="constant"),
        train_dataset=labelled(task, 240, seed=0),
        eval_dataset=labelled(task, 32, seed=99),
    )
    before = trainer.evaluate()["eval_loss"]
    probe = BackboneSaveProbe(model)
    with probe.track():
        trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.9 * before, (before, after)  # held-out rows: it learned
    assert probe.kept == (0, 0)  # the backbone kept nothing for backward in any of the Trainer's steps

    trainer.save_model(tmp_path / "final")
    saved = set(load_file(tmp_path / "final" / "adapter_model.safetensors"))
    # the trained head travels with the side network, nothing else of the model
    assert {k for k in saved if ".ladder_side." not in k} == {
        f"base_model.model.classifier.{name}" for name in base.classifier.state_dict()
    }
    reloaded = PeftModel.from_pretrained(tiny_encoder(arch, task), tmp_path / "final")
    inputs = padded()
    assert torch.equal(encoder_output(reloaded, inputs), encoder_output(model.eval(), inputs))
    # The backbone and the original head are untouched: disabling the adapter gives the base model again.
    with model.disable_adapter():
        assert torch.equal(encoder_output(model, inputs), encoder_output(base, inputs))


# --- the head, as PEFT trains it for LoRA -----------------------------------------------------------------------


def _head_modules(model) -> set[str]:
    wrapped = (n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    return {n.removeprefix("base_model.model.") for n in wrapped}


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
@pytest.mark.parametrize("arch", list(ENCODER_ARCHS))
def test_the_head_is_wrapped_trained_and_saved_as_peft_does_for_lora(arch, task, tmp_path):
    ladder = encoder_ladder(arch, task)
    targets = ["Wqkv"] if arch == "modernbert" else ["query", "value"]  # all-linear would take the classifier too
    lora = get_peft_model(tiny_encoder(arch, task), LoraConfig(task_type=task, r=4, target_modules=targets))
    assert _head_modules(ladder) == _head_modules(lora) == {"classifier"}
    heads = {n for n, p in ladder.named_parameters() if p.requires_grad and ".ladder_" not in n}
    assert heads == {n for n, p in lora.named_parameters() if p.requires_grad and ".lora_" not in n}
    ladder.save_pretrained(tmp_path / "ladder")
    lora.save_pretrained(tmp_path / "lora")
    ladder_keys = {k for k in load_file(tmp_path / "ladder" / "adapter_model.safetensors") if ".ladder_" not in k}
    lora_keys = {k for k in load_file(tmp_path / "lora" / "adapter_model.safetensors") if ".lora_" not in k}
    assert ladder_keys == lora_keys


# --- trainable_token_indices on encoders ------------------------------------------------------------------------

TOKEN_ARCHS = ["bert", "modernbert"]
TASKS = ["SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", TOKEN_ARCHS)
def test_token_rows_on_an_encoder_start_as_an_exact_identity_with_input_rows_only(arch, task):
    base = tiny_encoder(arch, task)
    model = encoder_ladder(arch, task, trainable_token_indices=IDS)
    assert torch.equal(encoder_output(model, padded()), encoder_output(base, padded()))
    names = {n for n, p in model.named_parameters() if ".tokens." in n}
    assert {n.rpartition(".")[2] for n in names} == {"input_rows"}  # no LM head: nothing to add head rows to
    assert token_rows(model).input_rows.shape == (len(IDS), 64)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding  # not PEFT's wrapper inside the no-grad backbone


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch", TOKEN_ARCHS)
def test_an_input_row_changes_every_position_of_the_sequences_holding_its_id_and_nothing_else(arch, task):
    model = encoder_ladder(arch, task, init_weights=False, trainable_token_indices=IDS + [ABSENT])
    inputs = padded()
    reference = encoder_output(model, inputs)
    with torch.no_grad():
        token_rows(model).input_rows[-1] += 1.0  # ABSENT's row
    assert torch.equal(encoder_output(model, inputs), reference)
    with torch.no_grad():
        token_rows(model).input_rows[0] += 1.0  # the row of IDS[0], at position 1 of sequence 0
    changed = encoder_output(model, inputs) != reference
    if task == "SEQ_CLS":
        assert changed[0].all() and not changed[1].any()
    else:  # bidirectional side blocks: every real position of sequence 0 sees the token, sequence 1 holds none
        real = inputs["attention_mask"][0].bool()
        assert changed[0][real].any(-1).all() and not changed[1].any()


@pytest.mark.parametrize("arch", TOKEN_ARCHS)
def test_token_rows_get_gradients_for_the_ids_present_and_the_backbone_none(arch):
    model = encoder_ladder(arch, "SEQ_CLS", init_weights=False, trainable_token_indices=IDS + [ABSENT]).train()
    model(**padded(), labels=torch.tensor([0, 2])).loss.backward()
    grad = token_rows(model).input_rows.grad
    assert (grad[: len(IDS)].abs().sum(-1) > 0).all() and torch.equal(grad[-1], torch.zeros_like(grad[-1]))
    for name, param in model.named_parameters():
        if ".ladder_" not in name and "modules_to_save" not in name:
            assert param.grad is None, name


@pytest.mark.parametrize("arch", TOKEN_ARCHS)
def test_token_rows_are_saved_with_the_adapter_and_reload_identically(arch, tmp_path):
    model = encoder_ladder(arch, "TOKEN_CLS", init_weights=False, trainable_token_indices=IDS)
    expected = encoder_output(model, padded())
    model.save_pretrained(tmp_path)
    keys = {k for k in load_file(tmp_path / "adapter_model.safetensors") if ".tokens." in k}
    assert [k.rpartition(".tokens.")[2] for k in keys] == ["input_rows"]
    reloaded = PeftModel.from_pretrained(tiny_encoder(arch, "TOKEN_CLS"), tmp_path)
    assert torch.equal(encoder_output(reloaded, padded()), expected)


@pytest.mark.slow
def test_trainer_trains_the_rows_of_the_ids_in_the_data(tmp_path):
    model = encoder_ladder("bert", "SEQ_CLS", trainable_token_indices=IDS + [ABSENT])
    data = labelled("SEQ_CLS", 64, seed=0).to_dict()
    data["input_ids"] = [[*ids[:1], *IDS, *ids[4:]] for ids in data["input_ids"]]  # IDS in every row, ABSENT in none
    Trainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=Dataset.from_dict(data)).train()
    trained = token_rows(model).input_rows.detach()
    assert (trained[: len(IDS)].abs().sum(-1) > 0).all()
    assert torch.equal(trained[-1], torch.zeros_like(trained[-1]))


@pytest.mark.parametrize(
    "value, match",
    [
        (
            {"classifier": IDS},
            r"key 'classifier' names a module that is no token embedding of BertForSequenceClassification\. "
            r"Ladder trains token rows of the model's input embedding 'bert\.embeddings\.word_embeddings' "
            r"\(BertForSequenceClassification has no LM head: ids get input rows only\); use that name",
        ),
        ({"lm_head": IDS}, r"key 'lm_head' names no module of BertForSequenceClassification\."),
        ([VOCAB], rf"ids \[{VOCAB}\] beyond the input embedding's {VOCAB} rows; resize the embeddings first"),
    ],
)
def test_token_indices_that_cannot_apply_to_a_classifier_are_refused(value, match):
    with pytest.raises(ValueError, match=match):
        encoder_ladder("bert", "SEQ_CLS", trainable_token_indices=value)


def test_token_rows_by_the_embedding_name_are_input_rows():
    model = encoder_ladder("bert", "SEQ_CLS", trainable_token_indices={"word_embeddings": IDS})
    assert token_rows(model).input_rows.shape == (len(IDS), 64) and token_rows(model).head_rows is None


@pytest.mark.parametrize("arch", TOKEN_ARCHS)
def test_inputs_embeds_without_ids_is_refused_when_rows_need_the_ids(arch):
    model = encoder_ladder(arch, "SEQ_CLS", trainable_token_indices=IDS)
    embeds = model.get_input_embeddings()(padded()["input_ids"])
    with pytest.raises(ValueError, match=r"passed no input_ids .* Call the model with input_ids"):
        model(inputs_embeds=embeds, attention_mask=padded()["attention_mask"])


@pytest.mark.parametrize("arch, model_class", [("bert", tf.BertForMaskedLM), ("modernbert", tf.ModernBertForMaskedLM)])
def test_a_masked_lm_head_gets_head_rows_that_change_only_the_listed_ids_logits(arch, model_class):
    config = ENCODER_ARCHS[arch]()
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = get_peft_model(model_class(config).eval(), LadderConfig(reduction_factor=4, trainable_token_indices=IDS))
    inputs = padded()
    reference = encoder_output(model, inputs)
    with torch.no_grad():
        token_rows(model).head_rows += 1.0
    changed = (encoder_output(model, inputs) != reference).flatten(0, 1).any(0)  # (V,): columns that changed
    assert changed.nonzero().flatten().tolist() == IDS
