"""Encoder-decoder backbones (T5, Flan-T5 form, BART) for SEQ_2_SEQ_LM: the decoders' guarantees over conftest's
seq2seq table (identity at init, disable_adapter, gradients, the no-grad boundary, save/reload, several adapters,
cached generation), then what is particular to encoder-decoders (the side memory, where the fusion sits, the cache
slots, the loss from labels)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as tf
from conftest import CONFIG_CASES, QUANTIZED, SEQ2SEQ_ARCHS, VOCAB, side_of, tiny_seq2seq
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_training import BackboneSaveProbe, counting_rows, watch_training
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from peft_ladder import LadderConfig
from peft_ladder.encdec import side_memory_key
from peft_ladder.layer import GC_WARNING, LadderFusionLayer, LadderTapLayer
from peft_ladder.memory import saved_bytes

FLOAT_CONFIGS = [name for name in CONFIG_CASES if name not in QUANTIZED]
ARCHS = list(SEQ2SEQ_ARCHS)
CASES = [pytest.param(arch, config, id=f"{arch}-{config}") for config in FLOAT_CONFIGS for arch in ARCHS]
ENCODER_LAYERS, DECODER_LAYERS = 3, 2
# Where the side decoder's output joins: T5's decoder ends with a final norm, BART's decoder is post-norm.
FUSION_MODULE = {"t5": "decoder.final_layer_norm", "flan-t5": "decoder.final_layer_norm", "bart": "model.decoder"}
ENCODER_MODULE = {"t5": "encoder", "flan-t5": "encoder", "bart": "model.encoder"}


def seq2seq_ladder(arch: str = "t5", **config_kwargs):
    config_kwargs = {"task_type": "SEQ_2_SEQ_LM", "reduction_factor": 4, **config_kwargs}
    return get_peft_model(tiny_seq2seq(arch), LadderConfig(**config_kwargs))


def inputs(seed: int = 1, padding_side: str = "left") -> dict:
    """Two source rows, the second padded by three tokens (on the left by default), and 6 target tokens each."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    pad = slice(0, 3) if padding_side == "left" else slice(-3, None)
    input_ids[1, pad], attention_mask[1, pad] = 0, 0
    labels = torch.randint(3, VOCAB, (2, 6), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits(model, batch: dict | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(**(batch if batch is not None else inputs())).logits


def generate(model, batch: dict, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **kwargs}
    source = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model.generate(**source, **kwargs)


# --- the common guarantees ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, config", CASES)
def test_fresh_adapter_reproduces_base_exactly(arch, config):
    expected = logits(tiny_seq2seq(arch))
    model = seq2seq_ladder(arch, **CONFIG_CASES[config])
    assert torch.equal(logits(model), expected)


@pytest.mark.parametrize("arch, config", CASES)
def test_random_adapter_changes_logits_and_disable_adapter_restores_base(arch, config):
    expected = logits(tiny_seq2seq(arch))
    model = seq2seq_ladder(arch, init_weights=False, **CONFIG_CASES[config])
    assert (logits(model) - expected).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.equal(logits(model), expected)
    assert (logits(model) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("arch, config", CASES)
def test_gradients_reach_every_ladder_parameter_and_nothing_else(arch, config):
    model = seq2seq_ladder(arch, init_weights=False, **CONFIG_CASES[config]).train()
    model(**inputs()).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".ladder_" in n}
    assert any(".ladder_side.default.encoder.blocks." in n for n in trainable)  # the side encoder trains too
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("arch", ARCHS)
def test_keeps_nothing_of_the_backbone_for_backward(arch):
    model = seq2seq_ladder(arch, init_weights=False).train()
    model.enable_input_require_grads()  # input gradients on: a backbone in autograd would save its activations
    probe = BackboneSaveProbe(model)
    # T5's stacks call their own (tied) embedding modules, BART's the shared one: count what the probe watches.
    embedding_calls = []
    model.get_input_embeddings().register_forward_hook(lambda *_: embedding_calls.append(1))
    with probe.track():
        model(**inputs()).loss.backward()
    assert probe.calls == len(embedding_calls) + ENCODER_LAYERS + DECODER_LAYERS  # each layer ran once
    assert probe.kept == (0, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_input_gradients_add_no_saved_bytes(arch):
    reference = saved_bytes(seq2seq_ladder(arch, init_weights=False).train(), inputs())
    switched = seq2seq_ladder(arch, init_weights=False).train()
    switched.enable_input_require_grads()
    assert saved_bytes(switched, inputs()) == reference


@pytest.mark.parametrize("arch", ARCHS)
def test_saves_and_reloads_with_identical_logits_and_tokens(arch, tmp_path):
    model = seq2seq_ladder(arch, connections="xladder", init_weights=False).eval()
    expected, tokens = logits(model), generate(model, inputs())
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert set(state) == {k.replace(".default.", ".") for k, _ in model.named_parameters() if ".ladder_" in k}
    prefix = f"base_model.model.{FUSION_MODULE[arch]}.ladder_side."
    assert all(key.startswith(prefix) for key in state)
    assert any(key.startswith(prefix + "encoder.down.") for key in state)
    loaded = PeftModel.from_pretrained(tiny_seq2seq(arch), tmp_path)
    assert torch.equal(logits(loaded), expected)
    assert torch.equal(generate(loaded, inputs()), tokens)
    lean = PeftModel.from_pretrained(tiny_seq2seq(arch), tmp_path, low_cpu_mem_usage=True, adapter_name="other")
    assert torch.equal(logits(lean), expected)


@pytest.mark.slow
def test_reload_in_a_process_that_never_imports_peft_ladder(tmp_path):
    # One subprocess for all three (the start-up hook registers LADDER when peft is imported).
    jobs = []
    for arch in ARCHS:
        model = seq2seq_ladder(arch, init_weights=False).eval()
        base_dir, adapter_dir = tmp_path / f"{arch}-base", tmp_path / f"{arch}-adapter"
        tiny_seq2seq(arch).save_pretrained(base_dir)
        model.save_pretrained(adapter_dir)
        torch.save((logits(model), generate(model, inputs(), num_beams=2)), tmp_path / f"{arch}.pt")
        jobs.append((str(base_dir), str(adapter_dir), str(tmp_path / f"{arch}.pt")))
    batch = json.dumps({k: v.tolist() for k, v in inputs().items()})
    script = textwrap.dedent(f"""
        import torch, transformers
        from peft import PeftModel
        batch = {{k: torch.tensor(v) for k, v in {batch}.items()}}
        source = {{k: batch[k] for k in ("input_ids", "attention_mask")}}
        for base, adapter, expected in {jobs!r}:
            model = PeftModel.from_pretrained(transformers.AutoModelForSeq2SeqLM.from_pretrained(base), adapter)
            want_logits, want_tokens = torch.load(expected)
            with torch.no_grad():
                got = model(**batch).logits
                tokens = model.generate(**source, max_new_tokens=6, do_sample=False, pad_token_id=0, num_beams=2)
            assert torch.equal(got, want_logits), (adapter, (got - want_logits).abs().max())
            assert torch.equal(tokens, want_tokens), (adapter, tokens, want_tokens)
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-2000:]


@pytest.mark.parametrize("arch", ARCHS)
def test_several_adapters(arch):
    model = seq2seq_ladder(arch, init_weights=False).eval()
    first = logits(model)
    model.add_adapter("second", LadderConfig(task_type="SEQ_2_SEQ_LM", reduction_factor=2, init_weights=False))
    assert torch.equal(logits(model), first)
    model.set_adapter("second")
    second = logits(model)
    assert not torch.equal(second, first)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".ladder_side.second." in n
    }
    model.set_adapter("default")
    assert torch.equal(logits(model), first)
    with pytest.warns(UserWarning, match="Adapter default was active which is now deleted"):
        model.delete_adapter("default")
    assert model.active_adapter == "second" and torch.equal(logits(model), second)


@pytest.mark.parametrize("arch", ARCHS)
def test_unload_returns_the_plain_base_model(arch):
    expected = logits(tiny_seq2seq(arch))
    model = seq2seq_ladder(arch, init_weights=False)
    model.add_adapter("second", LadderConfig(task_type="SEQ_2_SEQ_LM", reduction_factor=4, init_weights=False))
    base = model.unload()
    assert not any(isinstance(m, (LadderTapLayer, LadderFusionLayer)) for m in base.modules())
    assert not any("ladder_" in n for n, _ in base.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in base.modules())
    assert torch.equal(logits(base), expected)


# --- generation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, config", [p for p in CASES if p.values[1] in ("ladder", "xladder", "explicit-map")])
def test_greedy_with_cache_equals_without_cache(arch, config):
    model = seq2seq_ladder(arch, init_weights=False, **CONFIG_CASES[config]).eval()
    cached = generate(model, inputs(), use_cache=True)
    assert torch.equal(cached, generate(model, inputs(), use_cache=False))
    with model.disable_adapter():
        base = generate(model, inputs())
    assert torch.equal(base, generate(tiny_seq2seq(arch), inputs()))
    assert not torch.equal(cached, base)  # the random adapter really takes part in generation


@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_with_cache_equals_without_cache(arch):
    model = seq2seq_ladder(arch, connections="xladder", init_weights=False).eval()
    kwargs = {"num_beams": 3, "num_return_sequences": 2}
    cached = generate(model, inputs(seed=3), **kwargs)
    assert cached.shape[0] == 4
    assert torch.equal(cached, generate(model, inputs(seed=3), use_cache=False, **kwargs))


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_generates_what_each_row_generates_alone(arch):
    # T5 (relative positions) is padded on the left, as decoder-only prompts are. BART counts its learned positions
    # from the first token, padding included, so its base model changes under left padding (by about 6e-3 in the
    # logits of the tiny model): its tokenizer pads on the right, and so does this test.
    model = seq2seq_ladder(arch, init_weights=False).eval()
    batch = inputs(seed=5, padding_side="right" if arch == "bart" else "left")
    together = generate(model, batch)
    for row in range(2):
        keep = batch["attention_mask"][row].bool()
        alone = {
            "input_ids": batch["input_ids"][row, keep][None],
            "attention_mask": batch["attention_mask"][row, keep][None],
        }
        assert torch.equal(together[row], generate(model, alone)[0]), row


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_side_encoder_runs_once_per_generate(arch, num_beams):
    model = seq2seq_ladder(arch, init_weights=False).eval()
    side = side_of(model)
    calls = {"encoder": 0, "decoder": 0}
    side.encoder.blocks[0].register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    side.blocks[0].register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    generate(model, inputs(), num_beams=num_beams, min_new_tokens=6)
    assert calls == {"encoder": 1, "decoder": 6}


@pytest.mark.parametrize("arch", ARCHS)
def test_side_decoder_owns_extra_self_and_cross_attention_slots(arch):
    model = seq2seq_ladder(arch, connections="xladder", side_layers=3, init_weights=False).eval()
    batch = inputs()
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    decoder_input_ids = torch.full((2, 4), 2)
    with torch.no_grad():
        model(
            **{k: batch[k] for k in ("input_ids", "attention_mask")},
            decoder_input_ids=decoder_input_ids,
            cache=cache,
            use_cache=True,
        )
    side_heads = side_of(model).side_config.num_attention_heads
    for half, length in ((cache.self_attention_cache, 4), (cache.cross_attention_cache, batch["input_ids"].shape[1])):
        assert len(half.layers) == DECODER_LAYERS + 3  # backbone layers, then one slot per side block
        keys = half.layers[DECODER_LAYERS].keys
        assert keys.shape[1] == side_heads and keys.shape[-2] == length


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_of_different_depths_each_generate_with_their_own_slots(arch):
    model = seq2seq_ladder(arch, side_layers=1, init_weights=False).eval()
    config = LadderConfig(task_type="SEQ_2_SEQ_LM", reduction_factor=2, side_layers=4, init_weights=False)
    model.add_adapter("deep", config)
    for adapter in ("default", "deep", "default"):
        model.set_adapter(adapter)
        assert torch.equal(
            generate(model, inputs(), num_beams=2), generate(model, inputs(), num_beams=2, use_cache=False)
        )


# --- what is particular to encoder-decoders ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fusion_sits_where_the_decoder_output_leaves_and_the_encoder_output_is_unchanged(arch):
    model = seq2seq_ladder(arch, init_weights=False).eval()
    base = model.base_model.model
    taps = [m for m in base.modules() if isinstance(m, LadderTapLayer)]
    assert [t.layer_index for t in taps] == [0, 1, 2, 0, 1]  # the encoder's 3 layers, then the decoder's 2
    assert isinstance(base.get_submodule(FUSION_MODULE[arch]), LadderFusionLayer)
    assert sum(isinstance(m, LadderFusionLayer) for m in base.modules()) == 1
    with torch.no_grad():
        out = model(**inputs())
        reference = tiny_seq2seq(arch)(**inputs())
    # The backbone decoder cross-attends to the encoder's own output: the side encoder does not change it.
    assert torch.equal(out.encoder_last_hidden_state, reference.encoder_last_hidden_state)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_base_model_computes_the_loss_from_labels(arch):
    model = seq2seq_ladder(arch, init_weights=False).eval()
    batch = inputs()
    with torch.no_grad():
        out = model(**batch)
        shifted = model.base_model.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        explicit = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=shifted
        )
    assert torch.equal(out.logits, explicit.logits)
    expected = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, out.logits.shape[-1]), batch["labels"].reshape(-1)
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_side_memory_travels_with_the_encoder_outputs(arch):
    model = seq2seq_ladder(arch, init_weights=False).eval()
    batch = inputs()
    source = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(**source)
        memory = encoder_outputs[side_memory_key("default")]
        assert memory.shape == (2, 9, side_of(model).side_config.hidden_size)
        reused = model(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.equal(reused.logits, logits(model))
    # The side encoder attends bidirectionally: changing the last source token changes the first position's memory.
    changed = dict(source, input_ids=source["input_ids"].clone())
    changed["input_ids"][:, -1] = (changed["input_ids"][:, -1] + 1) % VOCAB
    with torch.no_grad():
        other = model.get_encoder()(**changed)[side_memory_key("default")]
    assert (other[0, 0] - memory[0, 0]).abs().max() > 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_side_decoder_is_causal(arch):
    model = seq2seq_ladder(arch, init_weights=False).eval()
    batch = inputs()
    source = {k: batch[k] for k in ("input_ids", "attention_mask")}
    original = model.base_model.model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    changed = original.clone()
    changed[:, -1] = (original[:, -1] + 1) % VOCAB  # only the last decoder input token
    with torch.no_grad():
        before = model(**source, decoder_input_ids=original).logits
        after = model(**source, decoder_input_ids=changed).logits
    assert torch.equal(before[:, :-1], after[:, :-1])
    assert not torch.equal(before[:, -1], after[:, -1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_trainer_learns_with_checkpointing_and_keeps_the_backbone_out_of_autograd(arch, tmp_path):
    # A continuation task: the source is 8 consecutive tokens, the target the next 6.
    def rows(count, seed):
        return Dataset.from_list(
            [
                {"input_ids": r["input_ids"][:8], "attention_mask": [1] * 8, "labels": r["input_ids"][8:14]}
                for r in counting_rows(count, seed=seed)
            ]
        )

    model = seq2seq_ladder(arch)
    args = tf.Seq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=30,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        activation_checkpointing=True,
    )
    trainer = tf.Seq2SeqTrainer(model=model, args=args, train_dataset=rows(48, 0), eval_dataset=rows(8, 99))
    before = trainer.evaluate()["eval_loss"]
    with watch_training(model) as (probe, records):
        trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.01, (before, after)  # held-out rows: a real improvement
    assert probe.kept == (0, 0)  # nothing the backbone computed was kept for backward
    assert probe.calls >= 30 * (ENCODER_LAYERS + DECODER_LAYERS)  # no layer ran again during backward:
    assert probe.calls <= 30 * (2 + ENCODER_LAYERS + DECODER_LAYERS)  # once per step, embeddings included
    assert len([w for w in records if str(w.message) == GC_WARNING]) == 1
    side = side_of(model)
    assert all(block.gradient_checkpointing for block in [*side.blocks, *side.encoder.blocks])
    assert all(p.grad is None for n, p in model.named_parameters() if ".ladder_" not in n)


def test_encoder_outputs_without_the_side_memory_are_refused_with_a_fix():
    model = seq2seq_ladder("t5", init_weights=False).eval()
    batch = inputs()
    with torch.no_grad(), model.disable_adapter():
        encoder_outputs = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(RuntimeError, match=r"side decoder needs the side encoder's output.*disable_adapter"):
        model(encoder_outputs=encoder_outputs, attention_mask=batch["attention_mask"], labels=batch["labels"])


@pytest.mark.parametrize(
    "field, value, fix",
    [
        ("quantization", "4bit", "None"),
        ("trainable_token_indices", [5], "None"),
        ("side_init", "magnitude", "'default'"),
    ],
)
def test_options_not_implemented_for_encoder_decoders_are_refused(field, value, fix):
    model = tiny_seq2seq("t5")
    with pytest.raises(
        ValueError,
        match=rf"LadderConfig\({field}={re.escape(repr(value))}\) is not supported on encoder-decoder backbones yet "
        rf"\(T5ForConditionalGeneration\); set {field}={fix}",
    ):
        get_peft_model(model, LadderConfig(task_type="SEQ_2_SEQ_LM", **{field: value}))
    assert not any(isinstance(m, LadderTapLayer) for m in model.modules())


@pytest.mark.parametrize("entry, module", [("shared", "shared"), ("block.1", "encoder.block.1")])
def test_modules_to_save_inside_the_frozen_stacks_is_refused(entry, module):
    with pytest.raises(
        ValueError, match=rf"'{entry}' names `{module}`, inside the encoder-decoder `.*` .* without grad"
    ):
        seq2seq_ladder("t5", modules_to_save=[entry])


def test_untested_encoder_decoder_families_are_refused_with_what_is_supported():
    config = tf.MBartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    with pytest.raises(
        ValueError,
        match=r"MBartForConditionalGeneration is an encoder-decoder model of type 'mbart', which Ladder has not been "
        r"tested on; Ladder supports .* T5 and BART \(SEQ_2_SEQ_LM\)",
    ):
        get_peft_model(tf.MBartForConditionalGeneration(config), LadderConfig(task_type="SEQ_2_SEQ_LM"))


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHS)
def test_memory_options_and_down_rank_reach_both_side_stacks(arch):
    model = seq2seq_ladder(arch, saved_taps="int8", down_rank=2, side_checkpointing=True)
    side = side_of(model)
    for stack in (side, side.encoder):
        assert stack.saved_taps == "int8" and stack.checkpointing is True
        assert all(isinstance(down, torch.nn.Sequential) and down[0].out_features == 2 for down in stack.down.values())
        assert all(down[0].saved_taps == "int8" for down in stack.down.values())


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHS)
def test_side_checkpointing_keeps_loss_and_gradients_and_saves_less(arch):
    runs = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = seq2seq_ladder(arch, init_weights=False, side_checkpointing=checkpointing).train()
        batch = inputs()
        batch["labels"] = batch["input_ids"][:, :6].clone()
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs[checkpointing] = (loss.detach(), grads, saved_bytes(model, batch))
    (loss_off, grads_off, bytes_off), (loss_on, grads_on, bytes_on) = runs[False], runs[True]
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and any("encoder" in n for n in grads_on)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, atol=1e-6, rtol=1e-5)
    assert bytes_on < bytes_off
