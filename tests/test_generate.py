"""generate() with the side network's KV cache: the side blocks keep their keys and values in extra slots of the
backbone's own `DynamicCache`, so every decoding strategy transformers drives stays aligned with the backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import EXPENSIVE_CASES, VOCAB, ladder
from transformers.cache_utils import DynamicCache

from peft_ladder import LadderConfig

# Every adapter here has random weights (init_weights=False), so that it really takes part in what is generated.


def prompts(seed: int = 0):
    """Two prompts, the second left-padded by three tokens."""
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3] = 0
    attention_mask[1, :3] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate(model, inputs, **kwargs):
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, **kwargs)


@pytest.mark.parametrize("case", EXPENSIVE_CASES)
def test_greedy_with_cache_equals_without_cache(case):
    model = ladder(case.arch, **case.kwargs, init_weights=False).eval()
    inputs = prompts()
    cached = generate(model, inputs, use_cache=True)
    assert torch.equal(cached, generate(model, inputs, use_cache=False))
    with model.disable_adapter():
        base = generate(model, inputs, use_cache=True)
    assert not torch.equal(cached, base)  # the random adapter really takes part in generation


@pytest.mark.parametrize("arch_name", ["llama", "gemma3", "gpt2"])
def test_beam_search_with_cache_equals_without_cache(arch_name):
    model = ladder(arch_name, connections="xladder", init_weights=False).eval()
    inputs = prompts(seed=3)
    cached = generate(model, inputs, num_beams=3, use_cache=True)
    assert torch.equal(cached, generate(model, inputs, num_beams=3, use_cache=False))


@pytest.mark.parametrize("arch_name", ["llama", "qwen3", "opt"])
def test_left_padded_batch_generates_what_each_row_generates_alone(arch_name):
    model = ladder(arch_name, init_weights=False).eval()
    inputs = prompts(seed=5)
    together = generate(model, inputs)
    for row in range(2):
        keep = inputs["attention_mask"][row].bool()
        alone = generate(
            model,
            {
                "input_ids": inputs["input_ids"][row, keep][None],
                "attention_mask": inputs["attention_mask"][row, keep][None],
            },
        )
        assert torch.equal(together[row, -8:], alone[0, -8:]), row


def test_side_blocks_own_extra_slots_in_the_generation_cache():
    model = ladder("llama", connections="xladder", side_layers=3, init_weights=False).eval()
    inputs = prompts()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    assert len(cache.layers) == 4 + 3  # backbone layers, then one slot per side block
    side_keys = cache.layers[4].keys
    assert side_keys.shape[-2] == inputs["input_ids"].shape[1]
    side_heads = model.base_model.model.model.norm.ladder_side["default"].side_config.num_key_value_heads
    assert side_keys.shape[1] == side_heads


def test_a_static_cache_is_refused_with_a_fix():
    model = ladder("llama", init_weights=False).eval()
    with pytest.raises(NotImplementedError, match="DynamicCache.*cache_implementation"):
        generate(model, prompts(), cache_implementation="static")


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_adapters_of_different_depths_each_generate_with_their_own_cache_slots(arch_name):
    model = ladder(arch_name, connections="xladder", side_layers=2, init_weights=False).eval()
    model.add_adapter(
        "deep", LadderConfig(task_type="CAUSAL_LM", reduction_factor=2, side_layers=6, init_weights=False)
    )
    inputs = prompts()
    for adapter in ("default", "deep", "default"):
        model.set_adapter(adapter)
        assert torch.equal(generate(model, inputs, use_cache=True), generate(model, inputs, use_cache=False))
