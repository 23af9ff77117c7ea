"""Stable first steps on backbones with outliers, and saved adapters that keep computing what they computed.

Gemma 3 270M, a supported backbone, reaches its final norm with a per-token RMS of 1,236 for a median |value| of 221
(a few dimensions near 27,700), and that norm multiplies by 1 + w with w up to 300. With the format-1 fusion
(side output x rms(h_L)) Ladder's first step at the recommended 1e-3 raised its training loss from 4.1 to 9.3.
`outlier_model` gives tiny models the same statistics; docs/defaults.md ("Backbones with outliers") has the numbers.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import pytest
import torch
from conftest import VOCAB, batch, logits, tiny_causal_lm
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_ladder import LadderConfig
from peft_ladder.config import BASE_FORMAT, LADDER_FORMAT_VERSION

FIXTURE = "tests/fixtures/adapter-0.1.0.dev0-llama"  # saved by 0.1.0.dev0 (format 1, fusion x rms(h_L))
RECOMMENDED_LR = 1e-3  # docs/defaults.md; AdamW without weight decay, as examples/demo.py trains
MAX_RISE = 1.10  # the training loss after each of the first steps stays within 10% of the base model's
# name -> (architecture, what the last hidden state and the final norm carry)
OUTLIER_MODELS = {
    "llama-outliers": ("llama", {}),
    "qwen2-outliers": ("qwen2", {}),
    "gemma3-outliers": ("gemma3", {}),  # gains are 1 + w, as in Gemma 3 270M
}
STREAM_MEDIAN, STREAM_RMS, LARGE_GAIN, LARGE_GAIN_DIMS = 220.0, 1236.0, 301.0, 16
# SIDE: the default settings but reduction_factor=4, so the side is 16 wide rather than 8: a step's effect grows with
# the side width, and Gemma 3 270M's is 80 at the default r = 8. At width 8 the format-1 rise is 2-5%, not 17%.


PRETRAIN_STEPS = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models train for ~40 steps here; on a shared CPU one thread does it in a second, two in ten."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def task(seed: int, size: int = 16, length: int = 16) -> dict:
    """A fixed next-token task (a permutation of the vocabulary, 30% noise) that a tiny model learns in seconds."""
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(0)) + 3
    ids = torch.empty(size, length, dtype=torch.long)
    ids[:, 0] = torch.randint(3, VOCAB, (size,), generator=generator)
    for t in range(1, length):
        noise = torch.rand(size, generator=generator) < 0.3
        ids[:, t] = torch.where(noise, torch.randint(3, VOCAB, (size,), generator=generator), perm[ids[:, t - 1] - 3])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def loss(model, inputs: dict) -> float:
    model.eval()
    with torch.no_grad():
        return model(**inputs).loss.item()


def stream_at_final_norm(model, inputs: dict) -> torch.Tensor:
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    loss(model, inputs)
    hook.remove()
    return seen[0]


def residual_norms(model) -> list:
    """Every norm that reads the residual stream: each layer's two pre-norms and the final norm."""
    norms = []
    for layer in model.model.layers:
        norms += [layer.input_layernorm, getattr(layer, "pre_feedforward_layernorm", layer.post_attention_layernorm)]
    return norms + [model.model.norm]


def scale_gain(norm, factor, gemma: bool) -> None:
    """Multiply the norm's gain (Gemma: 1 + w) by `factor`, a number or one per dimension."""
    if gemma:
        norm.weight.copy_((1 + norm.weight) * factor - 1)
    else:
        norm.weight.mul_(factor)


def residual_writers(model, gemma: bool) -> list:
    """(weight, is_norm) of what writes into the residual stream after the embeddings."""
    if gemma:  # Gemma 3 norms each block's output before adding it
        return [
            (n, True)
            for layer in model.model.layers
            for n in (layer.post_attention_layernorm, layer.post_feedforward_layernorm)
        ]
    return [(m.weight, False) for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]


@torch.no_grad()
def scale_stream(model, factor: torch.Tensor, gemma: bool) -> None:
    """Scale residual dimension k by factor[k] from the embeddings on: each layer's output and the embedding."""
    embed = model.model.embed_tokens
    embed.weight.mul_(factor)
    for module, is_norm in residual_writers(model, gemma):
        if is_norm:
            scale_gain(module, factor, gemma=True)
        else:
            module.mul_(factor[:, None])


def norm_input_rms(model, inputs: dict) -> list[float]:
    values = []
    hooks = [
        n.register_forward_pre_hook(lambda m, a: values.append(a[0].pow(2).mean(-1).sqrt().mean().item()))
        for n in residual_norms(model)
    ]
    loss(model, inputs)
    for hook in hooks:
        hook.remove()
    return values


@functools.cache
def outlier_model(name: str):
    """A tiny model trained on `task`, then given Gemma 3 270M's outliers at the final norm's input and gain.

    1. The whole residual stream is scaled up (median |h_L| about 220). 2. One dimension carries a constant near
    10,000 (per-token RMS about 1,236; d = 64 instead of 640 keeps both statistics); every norm reading the stream
    gives it no weight and scales the others up by the RMS it gained, as a trained model would. 3. Sixteen dimensions
    are shrunk in the stream and their gains raised to match, up to 301 (Gemma's w = 300). Each step keeps the
    model's loss on `task` close to the trained one, so a rise in loss is the adapter's doing.
    """
    arch, overrides = OUTLIER_MODELS[name]
    model = tiny_causal_lm(arch, tie_word_embeddings=False, **overrides).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(PRETRAIN_STEPS):
        model(**task(100 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    gemma = arch.startswith("gemma")
    probe, d = task(7), model.config.hidden_size
    with torch.no_grad():
        scale_stream(model, torch.full((d,), STREAM_MEDIAN / stream_at_final_norm(model, probe).abs().median()), gemma)
        before = norm_input_rms(model, probe)
        typical = stream_at_final_norm(model, probe).pow(2).mean().sqrt()
        embed = model.model.embed_tokens
        embed.weight[:, 0] += math.sqrt(d * (STREAM_RMS**2 - typical**2)) / float(getattr(embed, "embed_scale", 1.0))
        for norm, old, new in zip(residual_norms(model), before, norm_input_rms(model, probe), strict=True):
            factor = torch.full((d,), new / old)
            factor[0] = 0.0
            scale_gain(norm, factor, gemma)
        dims = torch.arange(1, 1 + LARGE_GAIN_DIMS)
        gains = (1 + model.model.norm.weight) if gemma else model.model.norm.weight
        shrink = torch.ones(d)
        shrink[dims] = torch.linspace(LARGE_GAIN / 6, LARGE_GAIN, LARGE_GAIN_DIMS) / gains[dims].abs()
        scale_stream(model, 1 / shrink, gemma)
        for norm in residual_norms(model):
            scale_gain(norm, shrink, gemma)
    return model.eval()


def first_steps(name: str, steps: int = 3, **config_kwargs) -> list[float]:
    """Held-fixed training-batch loss before and after each of the first `steps` steps of a fresh adapter."""
    base = copy.deepcopy(outlier_model(name))
    torch.manual_seed(0)  # the side network's init, whichever test built the (cached) base model
    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, **config_kwargs)  # side width 16 (see SIDE)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=RECOMMENDED_LR, weight_decay=0.0
    )
    measured = task(999, size=32)
    losses = [loss(model, measured)]
    for step in range(steps):
        model.train()
        model(**task(500 + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss(model, measured))
    return losses


def test_outlier_models_have_gemma3_270m_statistics():
    gemma = outlier_model("gemma3-outliers")
    stream = stream_at_final_norm(gemma, task(7))
    assert 1_000 < stream.pow(2).mean(-1).sqrt().mean() < 1_500  # Gemma 3 270M: 1,236
    assert 100 < stream.abs().median() < 300  # 221
    assert stream.abs().max() > 9_000  # 27,700 at d = 640; one such value at d = 64 would make the RMS 3,460
    assert (1 + gemma.model.norm.weight).abs().max().item() == pytest.approx(LARGE_GAIN)  # w up to 300
    assert loss(gemma, task(999, size=32)) < 0.6 * math.log(VOCAB)  # a trained model, far from chance


@pytest.mark.parametrize("name", list(OUTLIER_MODELS))
def test_first_steps_do_not_raise_the_loss_on_outlier_backbones(name):
    losses = first_steps(name)
    assert max(losses[1:]) <= MAX_RISE * losses[0], losses


@pytest.mark.parametrize("name", ["llama-outliers", "gemma3-outliers"])
def test_format_1_fusion_raised_the_loss_on_outlier_backbones(name):
    """Why the default changed: x rms(h_L) alone lets the dimensions with large final-norm gains take the steps."""
    losses = first_steps(name, steps=1, fusion_scale="rms")
    assert losses[1] > MAX_RISE * losses[0], losses


def test_adapter_saved_before_the_fusion_change_loads_with_identical_logits():
    model = PeftModel.from_pretrained(tiny_causal_lm("llama", seed=0), FIXTURE).eval()
    config = model.peft_config["default"]
    assert (config.ladder_format_version, config.fusion_scale) == (1, "rms")
    expected = load_file(f"{FIXTURE}/expected_logits.safetensors")["logits"]
    # Bit-identical on the stack that wrote the fixture. A newer transformers may round the base model's own ops
    # differently (8.9e-8 between 5.23 and 5.25); anything the adapter computes differently moves these logits by far
    # more (the adapter itself moves them by about 0.6, checked below).
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-6)
    with model.disable_adapter():
        assert (logits(model) - expected).abs().max() > 0.1


@pytest.mark.parametrize("reader", [PeftConfig, LadderConfig])
def test_every_config_reader_sees_the_fixture_as_format_1(reader):
    config = reader.from_pretrained(FIXTURE)
    assert isinstance(config, LadderConfig)
    assert (config.ladder_format_version, config.fusion_scale) == (1, "rms")


def test_new_adapter_saves_and_reloads_its_fusion_and_format(tmp_path):
    assert LadderConfig().fusion_scale == "rms_gain"
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm("gemma3"), LadderConfig(task_type="CAUSAL_LM", init_weights=False))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["fusion_scale"], saved["ladder_format_version"]) == ("rms_gain", BASE_FORMAT)
    reloaded = PeftModel.from_pretrained(tiny_causal_lm("gemma3"), tmp_path).eval()
    assert reloaded.peft_config["default"].fusion_scale == "rms_gain"
    assert torch.equal(logits(reloaded), logits(model.eval()))


def test_fusion_scale_rms_gain_differs_from_rms_on_large_gains():
    """The recorded field is what decides the fusion: the same weights under the two scales give different logits."""
    outputs = {}
    for scale in ("rms", "rms_gain"):
        torch.manual_seed(0)
        base = outlier_model("gemma3-outliers")
        model = get_peft_model(
            copy.deepcopy(base), LadderConfig(task_type="CAUSAL_LM", init_weights=False, fusion_scale=scale)
        )
        outputs[scale] = logits(model, task(3))
    assert not torch.allclose(outputs["rms"], outputs["rms_gain"])


def test_a_newer_format_names_the_version_that_wrote_it(tmp_path):
    config = json.loads(open(f"{FIXTURE}/adapter_config.json").read())
    config.update(ladder_format_version=LADDER_FORMAT_VERSION + 1, peft_ladder_version="9.9.0")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    newer = LADDER_FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=rf"format {newer} by peft-ladder 9\.9\.0; .* 'peft-ladder>=9\.9\.0'"):
        LadderConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fusion_scale": "median"}, r"fusion_scale='median' is unknown; use 'rms_gain'"),
        ({"ladder_format_version": 0}, r"ladder_format_version=0 must be a positive integer"),
    ],
)
def test_invalid_fusion_fields_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LadderConfig(**kwargs)


def test_fixture_is_the_conftest_batch():
    """The fixture's logits are on conftest's `batch()`: a change there would break the comparison, not the code."""
    assert load_file(f"{FIXTURE}/expected_logits.safetensors")["logits"].shape == (*batch()["input_ids"].shape, VOCAB)
