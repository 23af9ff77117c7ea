"""Ladder on 4-bit and 8-bit bitsandbytes backbones (QST): from LadderConfig(quantization=...) and from a model loaded
with a BitsAndBytesConfig (QLoRA path). Real bitsandbytes layers; their CPU kernels run here, CUDA ones on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import ABSOLUTE_POSITIONS, ROTARY, batch, ladder, logits, tiny_causal_lm
from peft import PeftConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_ladder import LadderConfig
from peft_ladder import quantization as q
from peft_ladder.layer import LadderLayer
from peft_ladder.memory import saved_bytes

try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
pytestmark = [pytest.mark.bitsandbytes, pytest.mark.filterwarnings("ignore:MatMul8bitLt")]
# These check what happens *without* bitsandbytes, so they also run where it is missing.
RUN_WITHOUT_BNB = {
    "test_missing_bitsandbytes_raises_the_install_command_and_leaves_the_model_unchanged",
    "test_without_bitsandbytes_importable_ladder_works_and_quantization_says_how_to_install",
    "test_config_fields_are_recorded_json_safe_and_validated",
}

# One rotary and both absolute-position architectures, saved to disk once (the `saved` fixture).
SAVED_ARCHS = (ROTARY[0], *ABSOLUTE_POSITIONS)
KINDS = ("4bit", "8bit")
QLINEAR = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


@pytest.fixture(autouse=True)
def _needs_bitsandbytes(request):
    if bnb is None and request.node.originalname not in RUN_WITHOUT_BNB:
        pytest.skip("needs bitsandbytes: pip install 'peft-ladder[bnb]'")


def count(model, kind):
    return sum(isinstance(m, getattr(bnb.nn, QLINEAR[kind])) for m in model.modules())


# What LadderConfig(quantization=kind) is documented to be equivalent to (nf4 and double quant are its defaults).
BNB = {
    "4bit": lambda: BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny full-precision checkpoints on disk, so both paths start from `from_pretrained` like a user's would."""
    dirs = {}
    for arch in SAVED_ARCHS:
        dirs[arch] = tmp_path_factory.mktemp(arch)
        tiny_causal_lm(arch).save_pretrained(dirs[arch])
    return dirs


def load(path, kind=None, **bnb_kwargs):
    config = None if kind is None else (BitsAndBytesConfig(**bnb_kwargs) if bnb_kwargs else BNB[kind]())
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def lm_batch():
    return dict(batch(), labels=batch()["input_ids"], use_cache=False)


def module_types(model):
    """Module classes by name, seen through Ladder's wrappers (`layers.0.base_layer.mlp` -> `layers.0.mlp`)."""
    return {
        name.replace(".base_layer", ""): type(m)
        for name, m in model.named_modules()
        if "ladder_" not in name and not isinstance(m, LadderLayer)
    }


def unchanged(model, reference_state):
    """The model is still the plain full-precision model it was (same modules, same tensors, no quantizer state)."""
    assert not any(isinstance(m, LadderLayer) for m in model.modules()) and q.describe(model) is None
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    state = model.state_dict()
    assert state.keys() == reference_state.keys() and all(torch.equal(state[k], reference_state[k]) for k in state)


# --- LadderConfig(quantization=...) quantizes like BitsAndBytesConfig loading ---------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", SAVED_ARCHS)
def test_config_quantizes_in_place_exactly_as_bitsandbytes_loading(saved, arch, kind):
    reference = load(saved[arch], kind)
    with pytest.warns(q.LadderQuantizationWarning, match=rf"quantized the backbone in place.*{kind} layers"):
        model = get_peft_model(
            load(saved[arch]), LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, quantization=kind)
        )
    base = model.get_base_model()
    # Same layers, same quantized tensors (compared before any forward: bnb repacks CPU weights on first use).
    assert module_types(base) == module_types(reference)
    assert count(base, kind) == count(reference, kind) > 0
    expected = reference.state_dict()
    got = {k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "ladder_" not in k}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # The flags PEFT and transformers read.
    assert getattr(base, f"is_loaded_in_{kind}") is True and base.is_quantized
    assert type(base.hf_quantizer) is type(reference.hf_quantizer)
    assert base.config.quantization_config.to_dict() == reference.config.quantization_config.to_dict()
    # The embeddings and LM head stay float; the side network is float and the only trainable part.
    assert base.get_input_embeddings().weight.dtype == base.get_output_embeddings().weight.dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".ladder_" in n}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    # A fresh adapter reproduces the quantized base model exactly.
    assert torch.equal(logits(model), logits(reference))


def test_config_fields_are_recorded_json_safe_and_validated():
    config = LadderConfig(quantization="4bit", bnb_4bit_compute_dtype=torch.bfloat16)
    assert config.bnb_4bit_compute_dtype == "bfloat16"
    json.dumps(config.to_dict())
    for field, value, match in [
        ("quantization", "3bit", r"quantization='3bit' is unknown; use '4bit', '8bit' or None"),
        ("bnb_4bit_quant_type", "int4", r"bnb_4bit_quant_type='int4' is unknown; use 'nf4' or 'fp4'"),
        ("bnb_4bit_compute_dtype", "float64", r"bnb_4bit_compute_dtype='float64' .* use 'float32', 'bfloat16'"),
        ("bnb_4bit_use_double_quant", "yes", r"bnb_4bit_use_double_quant='yes' must be True or False"),
    ]:
        with pytest.raises(ValueError, match=match):
            LadderConfig(**{field: value})


def test_the_resolved_compute_dtype_follows_the_backbone(saved):
    model = ladder(load(saved["llama"]).to(torch.bfloat16), quantization="4bit")
    assert model.peft_config["default"].bnb_4bit_compute_dtype == "bfloat16"
    assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


# --- both paths train, and the backbone stays out of autograd -------------------------------------------------------


def build(saved, arch, kind, path):
    if path == "config":
        return ladder(load(saved[arch]), quantization=kind)
    return ladder(prepare_model_for_kbit_training(load(saved[arch], kind), use_gradient_checkpointing=False))


# Each path meets both bit widths and both architectures (the full product is 2x slower for no new code path).
@pytest.mark.parametrize(
    ("arch", "kind", "path"),
    [("llama", "4bit", "config"), ("llama", "8bit", "qlora"), ("opt", "8bit", "config"), ("opt", "4bit", "qlora")],
)
def test_training_steps_lower_the_loss_and_change_only_the_side_network(saved, arch, kind, path):
    model = build(saved, arch, kind, path).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".ladder_" not in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(**lm_batch()).loss
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if ".ladder_" not in n)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_backbone_saves_nothing_for_backward_whatever_is_switched_on(saved, kind):
    plain = ladder(load(saved["llama"], kind), init_weights=False).train()
    reference = saved_bytes(plain, lm_batch())
    switched_base = load(saved["llama"], kind).train()
    # QLoRA's preparation switches on all three: fp32 upcast, enable_input_require_grads, gradient checkpointing.
    prepare_model_for_kbit_training(switched_base, use_gradient_checkpointing=True)
    assert switched_base.is_activation_checkpointing
    switched = ladder(switched_base, init_weights=False).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Ladder's "checkpointing has no effect" notice
        assert saved_bytes(switched, lm_batch()) == reference
    assert all(p.grad is None for n, p in switched.named_parameters() if ".ladder_" not in n)
    # The config path builds the same model, so it saves the same bytes.
    assert (
        saved_bytes(ladder(load(saved["llama"]), quantization=kind, init_weights=False).train(), lm_batch())
        == reference
    )


# --- what a saved adapter says about its backbone, and reloading on it ----------------------------------------------


def test_qlora_path_records_the_backbone_in_the_saved_config(saved, tmp_path):
    base = load(saved["llama"], "4bit", load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)
    model = ladder(base)
    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert {k: saved_config[k] for k in q.FIELDS} == {
        "quantization": "4bit",
        "bnb_4bit_quant_type": "fp4",
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": "float32",
    }
    eight = ladder(load(saved["llama"], "8bit"))
    assert eight.peft_config["default"].quantization == "8bit"


@pytest.mark.parametrize(("kind", "path"), [("4bit", "config"), ("8bit", "qlora")])
def test_adapter_reloaded_on_a_full_precision_base_runs_on_the_same_quantization(saved, tmp_path, kind, path):
    model = build(saved, "llama", kind, path)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**lm_batch()).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    before = logits(model)
    model.save_pretrained(tmp_path)
    with pytest.warns(q.LadderQuantizationWarning, match="quantized the backbone in place"):
        loaded = PeftModel.from_pretrained(load(saved["llama"]), tmp_path)
    assert getattr(loaded.get_base_model(), f"is_loaded_in_{kind}") is True
    assert count(loaded, kind) == count(model, kind) > 0
    # Exactly the logits taken before saving. (Not the saved model's own later logits: on CPUs with AVX512-BF16,
    # bitsandbytes repacks 4-bit weights on the first forward, and state_dict() unpacks them again; the saved
    # model's outputs then shift by about 1e-3.)
    assert torch.equal(logits(loaded), before)
    # ... and on a base loaded in the same quantization, with the adapter's numbers exactly.
    again = PeftModel.from_pretrained(
        load(
            saved["llama"],
            kind,
            **(
                {}
                if kind == "8bit"
                else dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
            ),
        ),
        tmp_path,
    )
    assert torch.equal(logits(again), before)


def test_low_cpu_mem_usage_and_transformers_load_adapter_quantize_a_full_precision_base_too(saved, tmp_path):
    model = ladder(load(saved["llama"]), quantization="4bit", init_weights=False)
    before = logits(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", q.LadderQuantizationWarning)
        lean = PeftModel.from_pretrained(load(saved["llama"]), tmp_path, low_cpu_mem_usage=True)  # meta init context
        native = load(saved["llama"])
        native.load_adapter(str(tmp_path))
    assert torch.equal(logits(lean), before) and torch.equal(logits(native), before)
    assert native.is_loaded_in_4bit and not any(p.device.type == "meta" for p in lean.parameters())


def test_a_base_quantized_differently_is_refused_with_the_way_to_choose(saved, tmp_path):
    ladder(load(saved["llama"]), quantization="4bit", init_weights=False).save_pretrained(tmp_path)
    base = load(saved["llama"], "8bit")
    types_before = module_types(base)
    with pytest.raises(
        ValueError,
        match=r"asks for a backbone quantized as BitsAndBytesConfig\(load_in_4bit=True, "
        r"bnb_4bit_quant_type='nf4'.*already quantized as BitsAndBytesConfig\("
        r"load_in_8bit=True\).*config.quantization = None",
    ):
        PeftModel.from_pretrained(base, tmp_path)
    assert module_types(base) == types_before  # nothing wrapped, nothing replaced
    # The documented override: run the adapter on this backbone anyway.
    config = PeftConfig.from_pretrained(tmp_path)
    config.quantization = None
    loaded = PeftModel.from_pretrained(base, tmp_path, config=config)
    assert loaded.peft_config["default"].quantization == "8bit"  # what it now runs on


def test_another_compute_dtype_warns_and_records_what_runs(saved):
    with pytest.warns(q.LadderQuantizationWarning, match="bnb_4bit_compute_dtype='bfloat16'.* differs"):
        model = get_peft_model(
            load(saved["llama"], "4bit"),
            LadderConfig(
                task_type="CAUSAL_LM", reduction_factor=4, quantization="4bit", bnb_4bit_compute_dtype="bfloat16"
            ),
        )
    assert model.peft_config["default"].bnb_4bit_compute_dtype == "float32"


def test_old_adapter_configs_without_the_fields_still_load(saved, tmp_path):
    model = ladder(load(saved["llama"]), init_weights=False)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    old = {k: v for k, v in json.loads(config_path.read_text()).items() if k not in q.FIELDS}
    config_path.write_text(json.dumps(old))
    loaded = PeftModel.from_pretrained(load(saved["llama"]), tmp_path)
    assert loaded.peft_config["default"].quantization is None
    assert not getattr(loaded.get_base_model(), "is_quantized", False)
    assert torch.equal(logits(loaded), logits(model))


# --- errors leave the model as it was -------------------------------------------------------------------------------


def test_missing_bitsandbytes_raises_the_install_command_and_leaves_the_model_unchanged(saved, monkeypatch):
    monkeypatch.setattr(q, "bitsandbytes_version", lambda: None)  # the cached probe, as if the import failed
    model = load(saved["llama"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ImportError,
        match=r"quantization='4bit'.*bitsandbytes package.*pip install "
        r"'peft-ladder\[bnb\]'.*pip install 'bitsandbytes>=0.48'",
    ):
        get_peft_model(model, LadderConfig(task_type="CAUSAL_LM", quantization="4bit"))
    unchanged(model, state)
    ladder(model)  # without quantization, bitsandbytes is never needed


def test_without_bitsandbytes_importable_ladder_works_and_quantization_says_how_to_install(saved):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None  # any `import bitsandbytes` now raises ImportError
        import peft_ladder
        from peft import get_peft_model
        from peft_ladder import LadderConfig
        from transformers import AutoModelForCausalLM
        model = get_peft_model(AutoModelForCausalLM.from_pretrained({str(saved["llama"])!r}),
                               LadderConfig(task_type="CAUSAL_LM", reduction_factor=4))
        try:
            get_peft_model(AutoModelForCausalLM.from_pretrained({str(saved["llama"])!r}),
                           LadderConfig(task_type="CAUSAL_LM", quantization="8bit"))
        except ImportError as error:
            print("ImportError:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ImportError: LadderConfig(quantization='8bit') needs the bitsandbytes package" in result.stdout, (
        result.stderr[-2000:]
    )
    assert "pip install 'peft-ladder[bnb]'" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_unavailable_on_the_device_names_the_option_and_the_alternatives(kind):
    with pytest.raises(
        ValueError,
        match=rf"LadderConfig\(quantization='{kind}'.*not available on device 'cuda'.*"
        r"quantization=None",
    ):
        q.check_kind_available(kind, "nf4", torch.device("cuda"))


def test_unquantizable_weights_are_refused_before_any_layer_changes(saved):
    model = load(saved["llama"])
    model.model.layers[3].mlp.down_proj.double()  # the last layer: earlier ones would be quantized first
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.down_proj.weight is torch.float64.*model.to\("):
        get_peft_model(model, LadderConfig(task_type="CAUSAL_LM", quantization="8bit"))
    unchanged(model, state)


def test_a_second_adapter_cannot_quantize_under_the_first(saved):
    model = ladder(load(saved["llama"]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"backbone that has no adapters yet.*first adapter"):
        model.add_adapter("other", LadderConfig(task_type="CAUSAL_LM", reduction_factor=4, quantization="4bit"))
    assert model.state_dict().keys() == state.keys()
    assert count(model, "4bit") == 0
    # On a quantized backbone, later adapters inherit what it is.
    quantized = ladder(load(saved["llama"]), quantization="4bit")
    quantized.add_adapter("other", LadderConfig(task_type="CAUSAL_LM", reduction_factor=4))
    assert quantized.peft_config["other"].quantization == "4bit"


# --- CUDA kernels ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_config_path_matches_bitsandbytes_loading_and_trains(saved, kind):
    reference = AutoModelForCausalLM.from_pretrained(
        saved["llama"], quantization_config=BNB[kind](), device_map={"": 0}
    )
    model = ladder(AutoModelForCausalLM.from_pretrained(saved["llama"]).cuda(), quantization=kind)
    inputs = {k: v.cuda() for k, v in lm_batch().items()}
    torch.testing.assert_close(logits(model, inputs), logits(reference, inputs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model.train()(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if ".ladder_" not in n)
