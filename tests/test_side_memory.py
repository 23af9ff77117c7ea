"""What a Ladder training step keeps for backward: checkpointed side blocks and cheaper saved taps (issue 13, 1-2).

* `LadderConfig.side_checkpointing`: the side blocks are recomputed in backward; same loss and gradients, fewer bytes
  saved, and only side blocks rerun (never a backbone layer). The backbone's gradient checkpointing changes nothing.
* `LadderConfig.saved_taps`: each down-projection keeps its tap at the backbone's precision ("native", exact), as
  per-token int8 ("int8") or in pinned CPU memory ("cpu", CUDA only).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import batch, ladder, side_of, tiny_causal_lm
from tiny_training import BackboneSaveProbe
from torch import nn

from peft_ladder import LadderConfig
from peft_ladder.layer import GC_WARNING
from peft_ladder.memory import SavedTensorCounter, saved_bytes
from peft_ladder.taps import TapLinear, dequantize_per_token, quantize_per_token

HIDDEN = 64  # conftest's tiny models


def lm_batch() -> dict:
    inputs = batch(length=16)
    return {**inputs, "labels": inputs["input_ids"]}


def trained(arch: str = "llama", dtype: torch.dtype = torch.float32, **config) -> nn.Module:
    """A Ladder model with a non-identity side network (same seed for every config), in train mode."""
    base = tiny_causal_lm(arch).to(dtype)
    return ladder(base, seed=0, init_weights=False, loss_chunk_size=None, **config).train()


def step(model: nn.Module) -> tuple[float, int, dict[str, torch.Tensor]]:
    """(loss, bytes saved for backward, gradients by name) of one forward + backward."""
    counter = SavedTensorCounter(model)
    with counter.track():
        loss = model(**lm_batch()).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), counter.bytes, grads


# --- side_checkpointing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_checkpointed_side_blocks_give_the_same_loss_and_gradients_with_fewer_saved_bytes(arch):
    loss_off, saved_off, grads_off = step(trained(arch, side_checkpointing=False))
    loss_on, saved_on, grads_on = step(trained(arch))  # the default: checkpointed when training with 2+ blocks
    assert loss_on == loss_off
    assert sorted(grads_on) == sorted(grads_off) and all(".ladder_" in name for name in grads_on)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert saved_on < 0.5 * saved_off, (saved_on, saved_off)


def test_the_recompute_reruns_side_blocks_only_and_keeps_nothing_of_the_backbone():
    model = trained()
    side = side_of(model)
    calls = {"side": 0, "backbone": 0}
    for block in side.blocks:  # the recompute reruns the block's forward (its submodules), not its __call__ hooks
        block.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("side", calls["side"] + 1))
    probe = BackboneSaveProbe(model)
    with probe.track():
        loss = model(**lm_batch()).loss
        forward_calls = dict(calls)
        backbone_calls = probe.calls
        loss.backward()
    assert probe.kept == (0, 0)
    assert probe.calls == backbone_calls  # no backbone layer ran again during backward
    assert forward_calls["side"] == len(side.blocks)
    assert calls["side"] == 2 * len(side.blocks)  # each side block once more, in backward


def test_trainer_gradient_checkpointing_changes_nothing_and_says_so():
    reference = step(trained())
    model = trained()
    model.activation_checkpointing_enable({"use_reentrant": True})  # as Trainer/TRL do, after the adapter is attached
    assert model.is_activation_checkpointing
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        loss, saved, grads = step(model)
    assert [str(w.message) for w in records].count(GC_WARNING) == 1
    assert (loss, saved) == reference[:2]
    assert all(torch.equal(grads[name], grad) for name, grad in reference[2].items())
    assert model.is_activation_checkpointing  # the side pass put the side blocks' flags back

    # side_checkpointing=False wins over the backbone's flag: the side blocks keep their activations.
    off = trained(side_checkpointing=False)
    off.activation_checkpointing_enable({"use_reentrant": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert step(off)[1] == step(trained(side_checkpointing=False))[1]


def test_default_checkpoints_only_when_it_lowers_the_peak():
    one_block = trained(side_layers=1, connections="xladder")
    assert not side_of(one_block).checkpoints_blocks()  # one block: same peak, one more block forward
    assert side_of(trained(side_layers=1, connections="xladder", side_checkpointing=True)).checkpoints_blocks()
    model = trained()
    assert side_of(model).checkpoints_blocks()
    with torch.no_grad():
        assert not side_of(model).checkpoints_blocks()
    assert not side_of(model.eval()).checkpoints_blocks()


def test_a_training_forward_with_a_cache_checkpoints_without_writing_the_side_slots_twice():
    outputs = {}
    for checkpointing in (False, True):
        model = trained(side_checkpointing=checkpointing)
        out = model(**lm_batch(), use_cache=True)
        out.loss.backward()
        outputs[checkpointing] = (out.loss.item(), side_of(model).up.weight.grad.clone())
    assert outputs[True][0] == outputs[False][0]
    torch.testing.assert_close(outputs[True][1], outputs[False][1], rtol=1e-6, atol=1e-7)


# --- saved_taps ------------------------------------------------------------------------------------------------------


def linear_pair(dtype=torch.float32) -> tuple[TapLinear, nn.Linear]:
    torch.manual_seed(0)
    tap_linear = TapLinear(HIDDEN, 16).to(dtype)
    plain = nn.Linear(HIDDEN, 16).to(dtype)
    plain.load_state_dict(tap_linear.state_dict())
    return tap_linear, plain


def outliers_tap(dtype=torch.bfloat16) -> torch.Tensor:
    """A (2, 16, 64) hidden state with a few large dimensions, as pretrained residual streams have."""
    generator = torch.Generator().manual_seed(3)
    tap = torch.randn(2, 16, HIDDEN, generator=generator)
    tap[..., :3] *= 30.0
    return tap.to(dtype)


def run_linear(linear: nn.Module, tap: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    counter = SavedTensorCounter(linear)
    with counter.track():
        out = linear(tap)
    out.pow(2).sum().backward()
    return out.detach(), counter.bytes, linear.weight.grad


def test_native_taps_keep_the_backbone_tensor_not_an_fp32_copy_and_give_nn_linears_gradients():
    tap_linear, plain = linear_pair()
    tap = outliers_tap()
    out, saved, grad = run_linear(tap_linear, tap)
    out_ref, saved_ref, grad_ref = run_linear(plain, tap.float())  # what the side network did before
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(tap_linear.bias.grad, plain.bias.grad, rtol=1e-6, atol=1e-5)
    assert saved == tap.numel() * 2  # the bf16 tap itself
    assert saved_ref == tap.numel() * 4  # the fp32 copy


def test_native_taps_under_bf16_autocast_match_nn_linear():
    tap_linear, plain = linear_pair()
    tap = outliers_tap()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, grad = run_linear(tap_linear, tap)
        out_ref, _, grad_ref = run_linear(plain, tap.float())
    assert out.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-2, atol=1e-2)  # bf16 matmuls, summed in different orders


def test_int8_taps_halve_the_saved_bytes_with_a_small_gradient_error():
    tap = outliers_tap()
    native, _ = linear_pair()
    int8, _ = linear_pair()
    int8.saved_taps = "int8"
    out, saved_native, grad_native = run_linear(native, tap)
    out8, saved_int8, grad_int8 = run_linear(int8, tap)
    assert torch.equal(out8, out)  # the forward is exact; only the kept copy is compressed
    tokens = tap.numel() // HIDDEN
    assert saved_int8 == tap.numel() + 4 * tokens  # int8 codes + an fp32 scale per token
    assert saved_native == 2 * tap.numel()
    error = (grad_int8 - grad_native).norm() / grad_native.norm()
    assert 0 < error < 0.01, error
    codes, scale = quantize_per_token(tap)
    assert codes.abs().amax(-1).eq(127).all()  # per-token absmax: every token uses the full range
    assert (dequantize_per_token(codes, scale, torch.float32) - tap.float()).abs().le(scale / 2 + 1e-6).all()


def test_int8_taps_of_zero_tokens_give_zero_not_nan():
    codes, scale = quantize_per_token(torch.zeros(2, 3, HIDDEN))
    assert torch.equal(dequantize_per_token(codes, scale, torch.float32), torch.zeros(2, 3, HIDDEN))


def test_frozen_down_projections_keep_no_tap():
    tap_linear, _ = linear_pair()
    tap_linear.weight.requires_grad_(False)
    tap_linear.bias.requires_grad_(False)
    tap = outliers_tap().requires_grad_(True)  # as the side stream's token rows make the source tap
    counter = SavedTensorCounter(tap_linear)
    with counter.track():
        tap_linear(tap).sum().backward()
    assert counter.bytes == 0 and tap.grad is not None


def test_a_bf16_backbone_keeps_its_taps_in_bf16_and_int8_halves_them():
    """Exact accounting on a whole model: int8 saves each tap's bf16 bytes minus its codes and scales."""
    native = step(trained(dtype=torch.bfloat16))
    int8 = step(trained(dtype=torch.bfloat16, saved_taps="int8"))
    taps = len(side_of(trained()).down)
    tokens = 2 * 16
    assert native[1] - int8[1] == taps * (2 * tokens * HIDDEN - (tokens * HIDDEN + 4 * tokens))
    assert int8[0] == native[0]  # same forward
    for name, grad in native[2].items():
        error = (int8[2][name].float() - grad.float()).norm() / grad.float().norm().clamp_min(1e-12)
        assert error < 0.02, (name, error)


def test_cpu_offloaded_taps_refuse_a_cpu_training_forward_and_name_the_field():
    model = trained(saved_taps="cpu")
    with pytest.raises(ValueError, match=r"saved_taps='cpu' offloads .* needs a CUDA device; this tap is on cpu"):
        model(**lm_batch())
    with torch.no_grad():  # nothing is kept for backward: inference runs anywhere
        assert model(**lm_batch()).loss is not None


def test_config_names_the_field_and_the_value_it_refuses():
    with pytest.raises(ValueError, match=r"saved_taps='fp8' is unknown; use 'native'"):
        LadderConfig(saved_taps="fp8")
    with pytest.raises(ValueError, match=r"side_checkpointing='yes' must be None"):
        LadderConfig(side_checkpointing="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_offloaded_taps_give_native_gradients_and_keep_nothing_on_the_device():
    results = {}
    for saved in ("native", "cpu"):
        model = trained(dtype=torch.bfloat16, saved_taps=saved).cuda()
        inputs = {k: v.cuda() for k, v in lm_batch().items()}
        loss = model(**inputs).loss
        loss.backward()
        results[saved] = (loss.item(), saved_bytes(model, inputs), side_of(model).down["0"].weight.grad.clone())
    assert results["cpu"][0] == results["native"][0]
    torch.testing.assert_close(results["cpu"][2], results["native"][2], rtol=0, atol=0)
    assert results["cpu"][1] < results["native"][1]


def test_taps_are_read_by_tap_linears_with_the_configured_saving():
    side = side_of(trained(saved_taps="int8"))
    assert all(isinstance(down, TapLinear) and down.saved_taps == "int8" for down in side.down.values())
