"""The memory planner against real models: parameter counts, weight bytes and saved activations."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.models import build, model_config, prepare_checkpoint
from benchmarks.runner import make_batch
from peft_ladder.memory import SavedTensorCounter, held_tensors, storage_bytes
from peft_ladder.methods import METHODS
from peft_ladder.planner import Shape, estimate, main, saved_activation_bytes

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "configs")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return prepare_checkpoint("tiny", str(tmp_path_factory.mktemp("tiny")))


def _built(checkpoint, method):
    torch.manual_seed(0)
    return build(checkpoint, METHODS[method], torch.bfloat16, torch.device("cpu"))


def test_shape_from_config_files():
    qwen = Shape.from_config(os.path.join(CONFIGS, "qwen2.5-7b.json"))
    assert (qwen.hidden, qwen.layers, qwen.head_dim, qwen.q, qwen.kv, qwen.qkv_bias) == (3584, 28, 128, 3584, 512, True)
    llama = Shape.from_config(os.path.join(CONFIGS, "llama-3.1-70b.json"))
    assert (llama.layers, llama.kv, llama.vocab, llama.qkv_bias) == (80, 1024, 128256, False)


@pytest.mark.parametrize("method", ["full", "lora", "ladder", "xladder", "ladder-4bit-frozendown"])
def test_trainable_parameters_match_the_real_model(checkpoint, method):
    model = _built(checkpoint, method)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate(model_config("tiny"), method).trainable_params == real


@pytest.mark.parametrize("method", ["lora", "ladder"])
def test_weight_bytes_match_the_real_model(checkpoint, method):
    model = _built(checkpoint, method)
    measured = storage_bytes(held_tensors(model))
    predicted = estimate(model_config("tiny"), method).weights
    buffers = sum(b.nbytes for b in model.buffers())  # rotary inv_freq: not modelled, a few hundred bytes
    assert predicted == measured - buffers


@pytest.mark.parametrize(
    "method",
    [
        "lora",
        "ladder-nochunk",
        "ladder-4bit-nockpt",
        "ladder-4bit-int8taps",
        "full",
    ],
)
def test_saved_activations_match_autograd(checkpoint, method):
    model = _built(checkpoint, method)
    batch = make_batch(model.config.vocab_size, 2, 64, "cpu", seed=0)
    counter = SavedTensorCounter(model)
    with counter.track():
        loss = model(**batch).loss
    loss.backward()
    tokens, vocab, hidden = 128, model.config.vocab_size, model.config.hidden_size
    # Counted in the planner's logits term: the log-softmax output, or the chunked loss's bf16 input (peft_ladder.loss)
    by_loss = 4 * tokens * vocab if METHODS[method].loss_chunk_size is None else 2 * tokens * hidden
    predicted = saved_activation_bytes(model_config("tiny"), method, batch_size=2, seq_len=64)
    assert predicted + by_loss == pytest.approx(counter.bytes, rel=0.07)  # within 1-5% at 8+ layers


def test_unknown_method_and_optimizer_are_refused():
    with pytest.raises(ValueError, match=r"method='dora' is unknown"):
        estimate(model_config("tiny"), "dora")
    with pytest.raises(ValueError, match=r"optimizer='sgd' is unknown"):
        estimate(model_config("tiny"), "lora", optimizer="sgd")


def test_8bit_adamw_shrinks_only_the_optimizer_state():
    config = os.path.join(CONFIGS, "llama-3.1-8b.json")
    fp32, int8 = estimate(config, "ladder-4bit"), estimate(config, "ladder-4bit", optimizer="adamw8bit")
    assert int8.optimizer < fp32.optimizer / 3.5
    assert (int8.weights, int8.activations, int8.logits) == (fp32.weights, fp32.activations, fp32.logits)


def test_cli_prints_every_method(capsys):
    assert main(["--config", os.path.join(CONFIGS, "qwen2.5-7b.json"), "--seq-len", "2048"]) == 0
    table = capsys.readouterr().out
    for method in ("full", "qlora-gc", "ladder-4bit"):
        assert f"| {method} |" in table


SIDE_CASES = {
    "defaults": dict(),
    "side_layers": dict(side_layers=2),
    "xladder_depth": dict(connections="xladder", side_layers=4, xladder_depth=3),
    "explicit map": dict(connections={0: 0, 3: 2}),
    "learned gate": dict(gate="learned"),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(SIDE_CASES))
def test_side_network_prediction_follows_the_built_module(arch, case):
    from conftest import tiny_causal_lm
    from peft import get_peft_model

    from peft_ladder import LadderConfig

    config = LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, **SIDE_CASES[case])
    model = get_peft_model(tiny_causal_lm(arch), config)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    predicted = estimate(model.config, "ladder", ladder_config=config).trainable_params
    assert predicted == real


def test_side_options_change_the_prediction_in_the_right_direction():
    config = os.path.join(CONFIGS, "qwen2.5-7b.json")
    default = estimate(config, "ladder")
    fewer = estimate(config, "ladder", ladder_config=argparse.Namespace(side_layers=14))
    shallow = estimate(config, "xladder", ladder_config=argparse.Namespace(xladder_depth=4))
    assert fewer.trainable_params < default.trainable_params and fewer.activations < default.activations
    assert shallow.trainable_params < estimate(config, "xladder").trainable_params
    assert estimate(config, "ladder", reduction_factor=16).trainable_params < default.trainable_params


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"method='dora' is unknown; choose one of \[.*'ladder'"):
        saved_activation_bytes(model_config("tiny"), "dora")


def test_cli_imports_neither_peft_nor_bitsandbytes():
    # `python -m peft_ladder.planner` plans from a config alone: the training stack, and bitsandbytes' start-up
    # warning about CPU kernels, have no business there.
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    command = [
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "peft_ladder.planner",
        "--config",
        "benchmarks/configs/qwen2.5-7b.json",
        "--seq-len",
        "2048",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=root, timeout=300, env={**os.environ, "PYTHONPATH": root}
    )
    assert result.returncode == 0, result.stderr
    assert "| ladder-4bit |" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")
    }
    assert "transformers" in imported  # the -X importtime report was read
    assert not {"peft", "bitsandbytes"} & imported
    assert "kernels-community" not in result.stdout + result.stderr


# --- mixed precision as Trainer runs it, 8-bit AdamW, the longest context -------------------------------------------


def _autocast_loss(chunk_size):
    from benchmarks.runner import _loss_fn

    def loss_fn(model, batch):
        with torch.autocast("cpu", torch.bfloat16):  # Trainer's bf16=True: autocast around the forward only
            return _loss_fn(chunk_size)(model, batch)

    return loss_fn


@pytest.mark.parametrize("method", ["lora", "ladder", "ladder-4bit-frozendown"])
def test_bf16_autocast_prediction_matches_a_real_cpu_step(checkpoint, method):
    from benchmarks.models import external_chunk_size
    from peft_ladder.memory import measure_training_step

    model = _built(checkpoint, method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(model.config.vocab_size, 1, 256, "cpu", seed=0)
    loss_fn = _autocast_loss(external_chunk_size(METHODS[method]))
    measure_training_step(model, optimizer, batch, loss_fn=loss_fn)  # AdamW creates its state
    measured = measure_training_step(model, optimizer, batch, loss_fn=loss_fn)
    plain = estimate(model_config("tiny"), method, seq_len=256)
    predicted = estimate(model_config("tiny"), method, seq_len=256, autocast="bf16")
    assert predicted.total == pytest.approx(measured.peak_bytes, rel=0.05)
    assert predicted.activations < plain.activations  # bf16 copies instead of fp32 ones
    assert (predicted.weights, predicted.optimizer) == (plain.weights, plain.optimizer)  # fp32 master weights


def test_autocast_is_refused_where_it_is_not_modelled():
    with pytest.raises(ValueError, match=r"autocast='fp8' is unknown; choose None, 'none' or 'bf16'"):
        estimate(model_config("tiny"), "ladder", autocast="fp8")
    with pytest.raises(ValueError, match=r"autocast='bf16' with dtype='float32' is not modelled"):
        estimate(model_config("tiny"), "ladder", dtype="float32", autocast="bf16")


@pytest.mark.parametrize("method", ["lora", "ladder"])
def test_8bit_adamw_state_matches_bitsandbytes(method):
    bnb = pytest.importorskip("bitsandbytes", minversion="0.50")  # its 8-bit optimizers run on CPU from 0.50
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from peft_ladder import LadderConfig

    # Every matrix holds >= 4,096 values (bitsandbytes' min_8bit_size), as at 7B; vectors get fp32 state.
    config = tf.LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    adapter = LadderConfig(task_type="CAUSAL_LM") if method == "ladder" else None
    if adapter is None:
        adapter = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(model, adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4)
    for param in trainable:
        param.grad = torch.randn_like(param)
    optimizer.step()
    shared_code_books = 2 * 256 * 4  # qmap1, qmap2: one pair for all parameters
    measured = storage_bytes(held_tensors(optimizer=optimizer)) - shared_code_books
    assert estimate(config, method, optimizer="adamw_8bit").optimizer == pytest.approx(measured, rel=1e-3)
    assert estimate(config, method, optimizer="paged_adamw_8bit").optimizer == pytest.approx(measured, rel=1e-3)


def test_longest_context_is_the_last_length_that_fits():
    from peft_ladder.planner import fits_card, longest_context

    config = os.path.join(CONFIGS, "llama-3.1-8b.json")
    answer = longest_context(config, 12, "ladder-4bit", optimizer="adamw_8bit", autocast="bf16")
    assert answer.seq_len > 0 and answer.estimate.seq_len == answer.seq_len
    assert fits_card(answer.estimate, 12)
    one_more = estimate(config, "ladder-4bit", seq_len=answer.seq_len + 1, optimizer="adamw_8bit", autocast="bf16")
    assert not fits_card(one_more, 12)
    assert longest_context(config, 24, "ladder-4bit").seq_len > longest_context(config, 12, "ladder-4bit").seq_len
    assert answer.dominant == "weights" and answer.limiting == "activations"  # 4-bit backbone; side activations


def test_longest_context_is_zero_when_the_weights_do_not_fit():
    from peft_ladder.planner import longest_context

    answer = longest_context(os.path.join(CONFIGS, "llama-3.1-8b.json"), 12, "full")
    assert answer.seq_len == 0 and answer.estimate.total > 12 * 2**30


def test_longest_context_refuses_a_sequence_length():
    from peft_ladder.planner import longest_context

    with pytest.raises(ValueError, match=r"searches the sequence length at batch 1; do not pass seq_len="):
        longest_context(os.path.join(CONFIGS, "llama-3.1-8b.json"), 12, "ladder", seq_len=2048)


def test_cli_answers_the_longest_context_on_a_card(capsys):
    config = os.path.join(CONFIGS, "llama-3.1-8b.json")
    assert main(["--config", config, "--gpu-gb", "12", "--optimizer", "adamw_8bit", "--autocast", "bf16"]) == 0
    table = capsys.readouterr().out
    assert "longest context on 12 GB" in table and "| full | none (weights + optimizer do not fit) |" in table
    with pytest.raises(SystemExit):
        main(["--config", config, "--gpu-gb", "12", "--seq-len", "4096"])
    assert "--gpu-gb searches the longest sequence at batch 1" in capsys.readouterr().err


# --- the planner's yardstick at 7B: the real module code on fake tensors (benchmarks/fake_validate.py) -------------


@pytest.mark.parametrize("method", ["lora", "ladder", "ladder-nochunk", "qlora-gc-chunk", "ladder-4bit"])
def test_fake_tensor_peak_equals_the_real_cpu_peak(checkpoint, method):
    from benchmarks.fake_validate import fake_step_peak
    from benchmarks.models import external_chunk_size
    from benchmarks.runner import _loss_fn
    from peft_ladder.memory import measure_training_step

    model = _built(checkpoint, method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(model.config.vocab_size, 1, 256, "cpu", seed=0)
    loss_fn = _loss_fn(external_chunk_size(METHODS[method]))
    measure_training_step(model, optimizer, batch, loss_fn=loss_fn)
    real = measure_training_step(model, optimizer, batch, loss_fn=loss_fn)
    fake = fake_step_peak(model_config("tiny"), method, seq_len=256)
    # bf16 backbones: the same ops on the same shapes. 4-bit: bitsandbytes' storage and GPU matmul, emulated.
    tolerance = 0.03 if METHODS[method].quantization else 0.001
    assert fake["peak_bytes"] == pytest.approx(real.peak_bytes, rel=tolerance)
    assert fake["baseline_bytes"] == pytest.approx(real.baseline_bytes, rel=tolerance)


def test_fake_tensor_run_keeps_sdpa_is_causal_and_restores_transformers():
    from transformers import masking_utils

    from benchmarks.fake_validate import fake_step_peak

    original = masking_utils.is_tracing
    short, long = (fake_step_peak(model_config("tiny"), "ladder", seq_len=n)["peak_bytes"] for n in (512, 1024))
    assert masking_utils.is_tracing is original
    # No sequence x sequence mask: doubling the length less than doubles the peak's growth term.
    assert long - short < 2.2 * (short - fake_step_peak(model_config("tiny"), "ladder", seq_len=256)["peak_bytes"])
