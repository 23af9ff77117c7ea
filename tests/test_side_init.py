"""LadderConfig.side_init: side blocks pruned from the backbone (magnitude, Fisher), as Ladder Side-Tuning does."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, BITSANDBYTES, batch, ladder, logits, side_of, tiny_causal_lm
from peft import PeftModel

from peft_ladder import LadderConfig, initialize_side_fisher, resolve_plan
from peft_ladder.side_init import block_layers

FISHER_BATCHES = [batch(seed=s) for s in range(2, 5)]


def layers_of(model):
    base = model.get_base_model()
    if hasattr(base, "transformer"):
        return base.transformer.h
    return base.model.decoder.layers if hasattr(base.model, "decoder") else base.model.layers


def layer(model, i: int):
    module = layers_of(model)[i]
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def q_and_norm(block, width: int):
    """The query projection as (out, in) and the first norm's weight, whatever the architecture calls them."""
    if hasattr(block, "attn"):  # GPT-2: Conv1D c_attn (in, 3 * out)
        return block.attn.c_attn.weight.t()[:width], block.ln_1.weight
    norm = block.self_attn_layer_norm if hasattr(block, "self_attn_layer_norm") else block.input_layernorm
    return block.self_attn.q_proj.weight, norm.weight


def trained_once(model):
    model.train()
    out = model(**batch(), labels=batch()["input_ids"])
    out.loss.backward()
    return model


@pytest.mark.parametrize("arch", list(ARCHS))
def test_magnitude_side_block_is_its_backbone_layer_pruned(arch):
    model = ladder(arch, side_init="magnitude")
    side, hidden = side_of(model), model.config.hidden_size
    side_width = side.side_config.hidden_size
    kept = model.get_base_model().get_input_embeddings().weight.abs().sum(0).topk(side_width).indices.sort().values
    for j, block in enumerate(side.blocks):
        source = layer(model, j)  # the ladder preset connects block j to layer j
        side_q, side_norm = q_and_norm(block, side_width)
        backbone_q, backbone_norm = q_and_norm(source, hidden)
        assert torch.equal(side_norm, backbone_norm[kept])
        head_dim = side_q.shape[0] // side.side_config.num_attention_heads
        backbone_heads = backbone_q[:, kept].split(head_dim)
        for side_head in side_q.split(head_dim):  # every side head is one whole backbone head on the kept dims
            assert any(torch.equal(side_head, h) for h in backbone_heads)
    for down in side.down.values():  # a selection of the kept dims
        assert torch.equal(down.weight, torch.eye(hidden)[kept]) and not down.bias.any()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("connections", ["ladder", "xladder"])
def test_pruned_adapters_are_an_exact_identity_and_train_only_ladder_params(arch, connections):
    base_logits = logits(tiny_causal_lm(arch))
    magnitude = ladder(arch, side_init="magnitude", connections=connections)
    fisher = ladder(arch, side_init="fisher", connections=connections)
    initialize_side_fisher(fisher, FISHER_BATCHES)
    for model in (magnitude, fisher):
        assert not side_of(model).up.weight.any()
        assert torch.equal(logits(model), base_logits)
        trained_once(model)
        for name, param in model.named_parameters():
            if ".ladder_" in name:
                assert param.requires_grad and param.grad is not None, name
            else:
                assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fisher_needs_initialize_before_training_and_differs_from_magnitude(arch):
    model = ladder(arch, side_init="fisher")
    logits(model)  # evaluation before initialisation is allowed
    model.train()
    with pytest.raises(RuntimeError, match=r"side_init='fisher'.*initialize_side_fisher\(model, batches\)"):
        model(**batch())
    initialize_side_fisher(model, FISHER_BATCHES)
    trained_once(model)  # no longer refused
    fisher, magnitude = side_of(model).state_dict(), side_of(ladder(arch, side_init="magnitude")).state_dict()
    assert any(not torch.equal(fisher[k], magnitude[k]) for k in fisher if ".blocks." in k or k.startswith("blocks."))


def test_initialize_side_fisher_refuses_other_inits():
    with pytest.raises(ValueError, match=r"side_init='magnitude'; it only applies to LadderConfig\(side_init='fisher'"):
        initialize_side_fisher(ladder("llama", side_init="magnitude"), FISHER_BATCHES)


def test_unknown_side_init_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"side_init='pruned' is unknown; use 'default'.*'magnitude'.*'fisher'"):
        LadderConfig(side_init="pruned")


def test_side_heads_smaller_than_backbone_heads_are_rejected():
    # GPT-2 derives its side head size from the width: 64 / 8 = 8 < the backbone's 16, no whole head fits.
    with pytest.raises(ValueError, match=r"side_init='magnitude' keeps whole attention heads of size 16"):
        ladder("gpt2", side_init="magnitude", reduction_factor=8)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_default_init_is_unchanged(arch):
    implicit = side_of(ladder(arch, seed=0)).state_dict()
    explicit = side_of(ladder(arch, seed=0, side_init="default")).state_dict()
    assert implicit.keys() == explicit.keys()
    assert all(torch.equal(implicit[k], explicit[k]) for k in implicit)


def test_unconnected_blocks_copy_the_layer_after_the_previous_block():
    assert block_layers(resolve_plan("xladder", 4, 4, None)) == [2, 3, 3, 3]  # extra depth: the last layer, clipped
    assert block_layers(resolve_plan({0: 0, 1: 1}, 4, 3, None)) == [0, 1, 2]
    assert block_layers(resolve_plan({2: 1}, 4, 2, None)) == [2, 2]  # a leading unconnected block: the source layer


@pytest.mark.parametrize("side_init", ["magnitude", "fisher"])
def test_saved_pruned_adapter_reloads_with_identical_outputs(side_init, tmp_path):
    model = ladder("llama", side_init=side_init, init_weights=False)  # random up-projection: a non-identity adapter
    if side_init == "fisher":
        initialize_side_fisher(model, FISHER_BATCHES)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path, is_trainable=True)
    assert torch.equal(logits(loaded.eval()), logits(model.eval()))
    trained_once(loaded)  # the weights came from the save: a fisher adapter needs no new initialisation


@pytest.mark.parametrize("side_init", [pytest.param("magnitude", marks=BITSANDBYTES)])
def test_quantized_backbone_with_pruned_init_is_rejected_before_any_change(side_init):
    base = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match=rf"side_init='{side_init}' prunes the backbone's float weights"):
        ladder(base, side_init=side_init, quantization="4bit")
    assert type(base.model.layers[0].self_attn.q_proj).__name__ == "Linear"
