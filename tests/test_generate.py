"""generate() with the side network's KV cache: the side blocks keep their keys and values in extra slots of the
backbone's own cache (a `DynamicCache`, or a `StaticCache` for `cache_implementation="static"` and `torch.compile`),
so every decoding strategy transformers drives stays aligned with the backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import EXPENSIVE_CASES, VOCAB, ladder, side_of, tiny_causal_lm, tiny_config
from transformers import CompileConfig
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache

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


# --- a static cache (cache_implementation="static", a user's StaticCache) and torch.compile ------------------------


@pytest.mark.parametrize("case", EXPENSIVE_CASES)
def test_static_cache_generates_what_the_dynamic_cache_generates(case):
    model = ladder(case.arch, **case.kwargs, init_weights=False).eval()
    inputs = prompts()  # the second row left-padded
    assert torch.equal(generate(model, inputs, cache_implementation="static"), generate(model, inputs))


@pytest.mark.parametrize("arch_name", ["llama", "gemma3", "gpt2"])
def test_beam_search_with_a_static_cache_equals_without_cache(arch_name):
    model = ladder(arch_name, connections="xladder", init_weights=False).eval()
    inputs = prompts(seed=3)
    static = generate(model, inputs, num_beams=3, cache_implementation="static")
    assert torch.equal(static, generate(model, inputs, num_beams=3, use_cache=False))


@pytest.mark.parametrize("arch_name", ["gemma3", "qwen2"])
def test_static_cache_with_sliding_and_full_layers_equals_without_cache(arch_name):
    # Layers alternate sliding (a 4-token window, which the 7 + 8 tokens outgrow) and full attention; the side slots
    # take the type of the reference layer and the length of the backbone's slots of that type.
    layer_types = ["sliding_attention", "full_attention"] * 2
    base = tiny_causal_lm(arch_name, sliding_window=4, layer_types=layer_types, use_sliding_window=True)
    model = ladder(base, connections="xladder", init_weights=False).eval()
    inputs = prompts(seed=7)
    uncached = generate(model, inputs, use_cache=False)
    assert torch.equal(generate(model, inputs, cache_implementation="static"), uncached)
    assert torch.equal(generate(model, inputs), uncached)
    with model.disable_adapter():
        assert not torch.equal(generate(model, inputs, cache_implementation="static"), uncached)


@pytest.mark.parametrize("arch_name", ["llama", "gemma3"])
def test_a_users_static_cache_gets_static_side_slots_of_the_side_shape(arch_name):
    model = ladder(arch_name, side_layers=3, init_weights=False).eval()
    inputs = prompts()
    cache = StaticCache(config=model.config, max_cache_len=24)
    static = generate(model, inputs, past_key_values=cache)
    assert torch.equal(static, generate(model, inputs))
    assert len(cache.layers) == 4 + 3  # backbone layers, then one slot per side block
    backbone_slot, side_slot = cache.layers[0], cache.layers[4]
    assert type(side_slot) is type(backbone_slot) and side_slot.max_cache_len == backbone_slot.max_cache_len
    heads, head_dim = side_of(model).side_config.num_key_value_heads, side_of(model).side_config.head_dim
    assert side_slot.keys.shape == (2, heads, backbone_slot.max_cache_len, head_dim)
    assert int(side_slot.get_seq_length()) == int(backbone_slot.get_seq_length()) == 7 + 8 - 1


def test_a_cache_of_another_kind_is_refused_with_a_fix():
    model = ladder("llama", init_weights=False).eval()
    with pytest.raises(NotImplementedError, match="DynamicCache or a StaticCache; got Cache.*cache_implementation"):
        with torch.no_grad():
            model(**prompts(), past_key_values=Cache(layer_class_to_replicate=DynamicLayer), use_cache=True)


def test_a_static_cache_without_a_slot_of_the_side_blocks_type_is_refused_with_a_fix():
    model = ladder("gemma3", init_weights=False).eval()  # every layer sliding: so are the side blocks
    cache = StaticCache(config=tiny_config("llama"), max_cache_len=24)  # full-attention slots only
    with pytest.raises(NotImplementedError, match="StaticSlidingWindowLayer.*StaticCache\\(config=model.config"):
        with torch.no_grad():
            model(**prompts(), past_key_values=cache, use_cache=True)


def compile_config(backend: str) -> CompileConfig:
    config = CompileConfig(backend=backend, fullgraph=True, mode="default")  # fullgraph: a graph break raises
    config._compile_all_devices = True  # transformers compiles on GPUs only, unless told (its own tests do this)
    return config


def test_compiled_static_decoding_captures_the_side_network_in_one_graph():
    # Dynamo traces the whole decoding forward, hooks and side blocks included, into one graph (fullgraph=True), and
    # generate() runs it; the "eager" backend keeps the test fast, inductor is tested below.
    model = ladder("llama", connections="xladder", init_weights=False).eval()
    inputs = prompts()
    compiled = generate(model, inputs, cache_implementation="static", compile_config=compile_config("eager"))
    assert hasattr(model.base_model.model, "_compiled_call")  # generate() took its compiled decoding path
    assert torch.equal(compiled, generate(model, inputs))


@pytest.mark.slow
def test_inductor_compiled_static_decoding_generates_the_same_tokens():
    model = ladder("llama", init_weights=False).eval()
    inputs = prompts()
    compiled = generate(model, inputs, cache_implementation="static", compile_config=compile_config("inductor"))
    assert hasattr(model.base_model.model, "_compiled_call")
    assert torch.equal(compiled, generate(model, inputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (offloading uses CUDA streams)")
@pytest.mark.parametrize("implementation", ["offloaded", "offloaded_static"])
def test_offloaded_caches_generate_what_the_dynamic_cache_generates(implementation):
    model = ladder("llama", connections="xladder", init_weights=False).eval().to("cuda")
    inputs = {key: value.to("cuda") for key, value in prompts().items()}
    assert torch.equal(generate(model, inputs, cache_implementation=implementation), generate(model, inputs))


def test_the_final_norms_gain_is_measured_again_when_its_weights_change_in_place():
    # The fusion keeps the final norm's gain between forwards (decoding would otherwise measure it at every token);
    # weights changed in place afterwards (load_state_dict copies in place) must count as a fresh model's would.
    def with_large_gain(model):
        with torch.no_grad():
            model.base_model.model.model.norm.base_layer.weight[:3] = 50.0  # dimensions the fusion scales down
        return model

    reused = ladder("llama", seed=0, init_weights=False).eval()
    generate(reused, prompts())  # measures the gain of the weights as built
    fresh = with_large_gain(ladder("llama", seed=0, init_weights=False).eval())
    assert torch.equal(generate(with_large_gain(reused), prompts()), generate(fresh, prompts()))


@pytest.mark.slow  # six compilations (about 40 s on a busy CPU)
def test_compiled_decoding_follows_adapter_switches_and_disable_adapter():
    # The compiled forward must not keep running the adapter it was traced with: dynamo's guards see the switch.
    model = ladder("llama", connections="xladder", init_weights=False).eval()
    model.add_adapter("other", LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, init_weights=False))
    inputs, config = prompts(), compile_config("eager")
    expected = {}
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        expected[adapter] = generate(model, inputs)
    with model.disable_adapter():
        expected["base"] = generate(model, inputs)
    assert len({tuple(tokens.flatten().tolist()) for tokens in expected.values()}) == 3
    for adapter in ("default", "other", "default"):
        model.set_adapter(adapter)
        assert torch.equal(
            generate(model, inputs, cache_implementation="static", compile_config=config), expected[adapter]
        )
        with model.disable_adapter():
            compiled = generate(model, inputs, cache_implementation="static", compile_config=config)
        assert torch.equal(compiled, expected["base"])
