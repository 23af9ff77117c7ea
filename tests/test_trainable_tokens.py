"""New tokens with Ladder: `LadderConfig.trainable_token_indices` (peft_ladder/tokens.py).

The side network holds trainable rows for the listed ids: input rows added to the side stream's seed where a listed
id sits, head rows added to the LM head's logits after the fusion. These tests check that the rows are zero at init
(an exact identity), act where they should and nowhere else, get gradients while the backbone gets none, agree across
the three ways the loss is computed (the model's logits, Ladder's chunked loss, TRL's fused LM head), are all that is
saved, and that TRL's SFTTrainer, which fills the field when cloning a chat template adds tokens, trains them.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import VOCAB, batch, ladder, logits, tiny_causal_lm, tiny_seq_cls
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_training import char_tokenizer, counting_texts

from peft_ladder import LadderConfig
from peft_ladder.config import BASE_FORMAT, TOKEN_ROWS_FORMAT
from peft_ladder.layer import LadderLayer

IDS = [5, 6, 90]  # ids that `with_ids` puts into the batch
ABSENT = 94  # an id `with_ids` keeps out of the batch


def with_ids(seed: int = 1) -> dict:
    """`batch()` with IDS at known places in row 0 (positions 3, 4, 8) and none of them, nor ABSENT, in row 1."""
    inputs = batch(seed)
    ids = inputs["input_ids"]
    ids[ids == ABSENT] = 10
    for token in IDS:
        ids[ids == token] = 11
    ids[0, 3], ids[0, 4], ids[0, 8] = IDS
    return inputs


def rows(model, adapter: str = "default"):
    """The adapter's LadderTokenRows."""
    fusion = next(m for m in model.modules() if hasattr(m, "ladder_side"))
    return fusion.ladder_side[adapter].tokens


def train_step_grads(model, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n.rpartition(".")[2]: p.grad.clone() for n, p in model.named_parameters() if ".tokens." in n}
    return loss.detach(), grads


# --- the config field -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, match",
    [
        ([], r"trainable_token_indices=\[\] must be a non-empty list of token ids"),
        ({}, r"trainable_token_indices=\{\} is empty"),
        ([1, -2], r"trainable_token_indices has \[-2\], which are not token ids"),
        ([1, 2.5, True], r"trainable_token_indices has \[2.5, True\], which are not token ids"),
        ({"embed_tokens": 3}, r"trainable_token_indices\['embed_tokens'\]=3 must be a non-empty list"),
        ({0: [3]}, r"trainable_token_indices has the key 0; keys are module names"),
        ("embed_tokens", r"trainable_token_indices='embed_tokens' must be a non-empty list"),
    ],
)
def test_malformed_token_indices_are_refused_by_the_config(value, match):
    with pytest.raises(ValueError, match=match):
        LadderConfig(task_type="CAUSAL_LM", trainable_token_indices=value)


@pytest.mark.parametrize("value", [[5, 6], {"embed_tokens": [5], "lm_head": [7, 8]}])
def test_the_field_is_saved_and_read_back(tmp_path, value):
    LadderConfig(task_type="CAUSAL_LM", trainable_token_indices=value).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"] == value
    assert LadderConfig.from_pretrained(tmp_path).trainable_token_indices == value


@pytest.mark.parametrize("set_later", [False, True])  # TRL's SFTTrainer sets the field on a config already built
def test_an_adapter_with_token_rows_is_saved_as_a_format_an_older_reader_refuses(tmp_path, set_later):
    config = LadderConfig(task_type="CAUSAL_LM", **({} if set_later else {"trainable_token_indices": [5]}))
    if set_later:
        config.trainable_token_indices = [5]
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ladder_format_version"] == TOKEN_ROWS_FORMAT
    assert TOKEN_ROWS_FORMAT > BASE_FORMAT  # a format-2 reader (peft-ladder before token rows) raises on it
    assert LadderConfig.from_pretrained(tmp_path).trainable_token_indices == [5]


# --- what the rows do ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])  # untied; tied with a scaled embedding; tied
def test_a_fresh_adapter_with_token_rows_is_an_exact_identity_and_peft_does_not_wrap_the_embedding(arch):
    base = tiny_causal_lm(arch)
    embedding_type = type(base.get_input_embeddings())
    model = ladder(arch, trainable_token_indices=IDS)
    assert torch.equal(logits(model, with_ids()), logits(base, with_ids()))
    assert model.peft_config["default"].trainable_token_indices == IDS  # kept for saving
    # PEFT's own trainable tokens would wrap the embedding inside the no-grad backbone, where it never learns.
    assert type(model.get_input_embeddings()) is embedding_type
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    names = {n for n, p in model.named_parameters() if p.requires_grad and ".tokens." in n}
    assert {n.rpartition(".")[2] for n in names} == {"input_rows", "head_rows"}
    assert all(".ladder_side.default.tokens." in n for n in names)
    assert rows(model).input_rows.shape == rows(model).head_rows.shape == (len(IDS), 64)


def test_zero_rows_add_nothing_to_a_trained_side_network():
    plain = ladder("llama", init_weights=False, seed=3)
    with_rows = ladder("llama", init_weights=False, seed=3, trainable_token_indices=IDS)
    with torch.no_grad():
        rows(with_rows).input_rows.zero_()
        rows(with_rows).head_rows.zero_()
    assert torch.equal(logits(with_rows, with_ids()), logits(plain, with_ids()))


def test_head_rows_give_the_listed_ids_logits_from_w_plus_rows_and_leave_the_others():
    model = ladder("llama", init_weights=False, seed=3, trainable_token_indices=IDS)
    captured = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    out = logits(model, with_ids())
    handle.remove()
    fused = captured[0]  # (B, T, d): the LM head's input, after the fusion and the final norm
    expected = fused @ (head.weight[IDS] + rows(model).head_rows).T
    torch.testing.assert_close(out[..., IDS], expected)
    others = [i for i in range(VOCAB) if i not in IDS]
    assert torch.equal(out[..., others], (fused @ head.weight.T)[..., others])


def test_input_rows_act_at_and_after_the_positions_of_the_listed_ids_only():
    model = ladder("llama", init_weights=False, seed=3, trainable_token_indices=IDS + [ABSENT])
    reference = logits(model, with_ids())
    with torch.no_grad():
        rows(model).input_rows[-1] += 1.0  # ABSENT's row: no position holds it
    assert torch.equal(logits(model, with_ids()), reference)
    with torch.no_grad():
        rows(model).input_rows[0] += 1.0  # the row of IDS[0], at position 3 of row 0
    changed = (logits(model, with_ids()) != reference).any(-1)  # (B, T)
    assert changed[0, 3:].all() and not changed[0, :3].any()  # causal: from the token on
    assert not changed[1].any()  # the other sequence holds none of the ids


@pytest.mark.parametrize(
    "arch, connections",
    [("llama", "ladder"), ("llama", "xladder"), ("gpt2", "ladder"), ("opt", "ladder")],
)
def test_gradients_reach_the_rows_of_the_ids_present_and_never_the_backbone(arch, connections):
    model = ladder(arch, init_weights=False, seed=3, connections=connections, trainable_token_indices=IDS + [ABSENT])
    _, grads = train_step_grads(model, with_ids())
    per_row = grads["input_rows"].abs().sum(-1)
    assert (per_row[:-1] > 0).all() and per_row[-1] == 0  # the ids in the batch, not ABSENT
    assert (grads["head_rows"].abs().sum(-1) > 0).all()  # every id is a candidate next token
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)


def test_chunked_loss_and_trls_fused_lm_head_agree_with_the_model_logits():
    from trl.trainer.utils import add_fused_lm_head

    results = {}
    for path in ("logits", "chunked", "fused"):
        chunk = None if path == "logits" else 5  # 5 tokens per chunk: several chunks over 2 x 12 tokens
        model = ladder("llama", init_weights=False, seed=3, trainable_token_indices=IDS, loss_chunk_size=chunk)
        extra = {}
        if path == "fused":
            add_fused_lm_head(model.get_base_model())
            extra = {"fused_lm_head": True}
        model.train()
        inputs = with_ids()
        out = model(**inputs, labels=inputs["input_ids"], **extra)
        assert (type(out).__name__, getattr(out, "logits", None) is None) == {
            "logits": ("CausalLMOutputWithPast", False),
            "chunked": ("LadderChunkedLossOutput", True),
            "fused": ("FusedCausalLMOutput", True),
        }[path]
        out.loss.backward()
        results[path] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert rows(model).folded is False
    loss, grads = results["logits"]
    for path in ("chunked", "fused"):
        torch.testing.assert_close(results[path][0], loss)
        assert results[path][1].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(results[path][1][name], grad, rtol=1e-4, atol=1e-6, msg=f"{path}: {name}")


def test_while_the_head_rows_are_folded_into_the_weight_the_head_hook_adds_nothing():
    # TRL's fused head reads the folded weight and never calls the head module; if a caller did both, the rows must
    # count once.
    from peft_ladder.tokens import folded_head_weight

    model = ladder("llama", init_weights=False, seed=3, trainable_token_indices=IDS)
    expected = logits(model, with_ids())
    with torch.no_grad(), folded_head_weight(model.get_base_model(), rows(model)) as weights:
        assert list(weights) == ["lm_head.weight"]
        folded = torch.func.functional_call(
            model, {f"base_model.model.{k}": v for k, v in weights.items()}, (), with_ids()
        )
    torch.testing.assert_close(folded.logits, expected)
    assert rows(model).folded is False


def test_greedy_generation_emits_a_token_its_head_row_favours_with_and_without_cache():
    model = ladder("llama", trainable_token_indices=[ABSENT])
    prompt = with_ids()["input_ids"][:1, :6]
    captured = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    logits(model, {"input_ids": prompt})
    handle.remove()
    direction = captured[0][0].mean(0)
    with torch.no_grad():
        rows(model).head_rows[0] = 50 * direction / direction.norm()  # the fused states point along it
    base = tiny_causal_lm("llama").generate(prompt, max_new_tokens=4, do_sample=False)
    cached = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    uncached = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert (cached[0, 6:] == ABSENT).all() and not (base[0, 6:] == ABSENT).any()


# --- PEFT workflows ------------------------------------------------------------------------------------------------


def test_only_the_rows_are_saved_and_reloading_gives_identical_logits(tmp_path):
    config = {"trainable_token_indices": {"embed_tokens": IDS, "lm_head": [ABSENT, IDS[0]]}}
    model = ladder("llama", init_weights=False, seed=3, **config)
    assert rows(model).input_ids.tolist() == IDS and rows(model).head_ids.tolist() == IDS + [ABSENT]
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    token_keys = {k: tuple(v.shape) for k, v in saved.items() if ".tokens." in k}
    assert token_keys == {
        "base_model.model.model.norm.ladder_side.tokens.input_rows": (3, 64),
        "base_model.model.model.norm.ladder_side.tokens.head_rows": (4, 64),
    }
    assert not any("embed_tokens" in k or "lm_head" in k for k in saved)  # no embedding or head matrix
    expected = logits(model, with_ids())
    for name in ("default", "other"):
        reloaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path, adapter_name=name)
        assert torch.equal(logits(reloaded, with_ids()), expected)


def test_adapters_keep_their_own_rows_and_disable_adapter_and_unload_remove_them():
    first = {"init_weights": False, "trainable_token_indices": IDS}
    second = {"init_weights": False, "trainable_token_indices": [IDS[0], ABSENT]}
    alone = {
        name: logits(ladder("llama", seed=s, **kw), with_ids()) for name, s, kw in (("a", 1, first), ("b", 2, second))
    }
    model = ladder("llama", seed=1, **first)
    torch.manual_seed(2)
    model.add_adapter("b", LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, **second))
    assert torch.equal(logits(model, with_ids()), alone["a"])
    model.set_adapter("b")
    assert torch.equal(logits(model, with_ids()), alone["b"])
    base = logits(tiny_causal_lm("llama"), with_ids())
    with model.disable_adapter():
        assert torch.equal(logits(model, with_ids()), base)
    plain = model.unload()
    assert torch.equal(logits(plain, with_ids()), base)
    assert not plain.get_input_embeddings()._forward_pre_hooks and not plain.get_output_embeddings()._forward_hooks


def test_a_classifier_takes_input_rows_only():
    model = get_peft_model(
        tiny_seq_cls("llama"), LadderConfig(task_type="SEQ_CLS", init_weights=False, trainable_token_indices=IDS)
    )
    assert rows(model).head_rows is None and rows(model).input_rows.shape == (3, 64)
    model.train()
    inputs = with_ids()
    model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    assert (rows(model).input_rows.grad.abs().sum(-1) > 0).all()


def _untouched(model) -> bool:
    return not any(isinstance(m, LadderLayer) for m in model.modules())


@pytest.mark.parametrize(
    "make, value, match",
    [
        (tiny_causal_lm, {"wte": IDS}, r"key 'wte' names no module of LlamaForCausalLM\. Ladder trains token rows of "),
        (tiny_causal_lm, {"norm": IDS}, r"key 'norm' names a module that is no token embedding of LlamaForCausalLM"),
        (tiny_causal_lm, [3, VOCAB], rf"ids \[{VOCAB}\] beyond the input embedding's {VOCAB} rows; resize"),
        (tiny_causal_lm, {"lm_head": [VOCAB + 1]}, rf"ids \[{VOCAB + 1}\] beyond the LM head's {VOCAB} rows"),
        (tiny_seq_cls, {"lm_head": IDS}, r"key 'lm_head' names no module of LlamaForSequenceClassification"),
        (tiny_seq_cls, {"score": IDS}, r"key 'score' names a module that is no token embedding"),
    ],
)
def test_indices_that_do_not_fit_the_model_raise_before_it_is_touched(make, value, match):
    model = make("llama")
    task = "SEQ_CLS" if make is tiny_seq_cls else "CAUSAL_LM"
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, LadderConfig(task_type=task, trainable_token_indices=value))
    assert _untouched(model)


def test_input_rows_need_input_ids():
    model = ladder("llama", trainable_token_indices=IDS)
    embeds = model.get_input_embeddings()(with_ids()["input_ids"])
    with pytest.raises(ValueError, match=r"needs the token ids; this forward passed no input_ids the embedding saw"):
        model(inputs_embeds=embeds)
    head_only = ladder("llama", trainable_token_indices={"lm_head": IDS})
    head_only(inputs_embeds=embeds)  # head rows need no ids


# --- TRL's SFTTrainer ----------------------------------------------------------------------------------------------

NEW_TOKENS = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"


def chat_template_source(path) -> str:
    """A tokenizer saved locally whose chat template uses two tokens the tiny models' tokenizer lacks."""
    source = char_tokenizer()
    source.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    source.eos_token, source.chat_template = NEW_TOKENS[1], TEMPLATE
    source.save_pretrained(path)
    return str(path)


def chats(texts: list[str]) -> dict:
    return {"messages": [[{"role": "user", "content": t[:6]}, {"role": "assistant", "content": t[6:]}] for t in texts]}


def sft_trainer(tmp_path, config: LadderConfig, data: dict, **overrides):
    trl = pytest.importorskip("trl")
    from test_trl import sft_config

    # TRL's default gradient checkpointing stays on
    args = sft_config(tmp_path / "run", **{"max_steps": 4, "max_length": 48, "bf16": False, **overrides})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.SFTTrainer(
            model=tiny_causal_lm("llama"),
            args=args,
            train_dataset=Dataset.from_dict(data),
            processing_class=char_tokenizer(),
            peft_config=config,
        )


def check_trained_rows_and_reload(trainer, tmp_path, new_ids: list[int]) -> None:
    """The rows moved; a TRL loss step gives them gradients and the backbone none; a reload gives the same logits."""
    model = trainer.model
    tokens = rows(model)
    assert tokens.input_rows.abs().sum() > 0 and tokens.head_rows.abs().sum() > 0  # trained away from zero
    inputs = next(iter(trainer.get_train_dataloader()))
    assert any(i in inputs["input_ids"] for i in new_ids)
    model.zero_grad(set_to_none=True)
    model.train()
    trainer.compute_loss(model, inputs).backward()  # TRL's fused-head loss, as in training
    present = torch.tensor([i in inputs["input_ids"] for i in tokens.input_ids.tolist()])
    assert (tokens.input_rows.grad.abs().sum(-1)[present] > 0).all()
    assert (tokens.head_rows.grad.abs().sum(-1) > 0).all()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    trainer.save_model(tmp_path / "adapter")
    sequence = {"input_ids": inputs["input_ids"][:1]}
    expected = logits(model.eval(), sequence)
    base = model.unload()  # the resized base model, without the adapter
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(logits(reloaded.eval(), sequence), expected)


def test_sft_trainer_cloning_a_chat_template_trains_the_new_tokens_rows(tmp_path):
    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4)
    source = chat_template_source(tmp_path / "source")
    trainer = sft_trainer(tmp_path, config, chats(counting_texts(16)), chat_template_path=source)
    new_ids = trainer.processing_class.convert_tokens_to_ids(NEW_TOKENS)
    # TRL added the tokens (and pad tokens up to a multiple of 64) and filled the field; Ladder built rows for them.
    assert config.trainable_token_indices == {"embed_tokens": list(range(VOCAB, 128))} and new_ids == [96, 97]
    assert rows(trainer.model).input_ids.tolist() == list(range(VOCAB, 128))
    trainer.train()
    check_trained_rows_and_reload(trainer, tmp_path, new_ids)


def test_sft_trainer_with_token_indices_set_by_the_user(tmp_path):
    chosen = list(range(40, 60))  # existing ids, some of which every batch of counting texts holds
    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, trainable_token_indices=chosen)
    trainer = sft_trainer(tmp_path, config, {"text": counting_texts(16)}, max_steps=2)
    trainer.train()
    check_trained_rows_and_reload(trainer, tmp_path, chosen)
