"""Saving, loading and managing Ladder adapters the way PEFT users do with LoRA."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch
from conftest import EXPENSIVE_CASES, batch, ladder, logits, tiny_causal_lm, tiny_seq_cls
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from safetensors.torch import load_file

from peft_ladder import LadderConfig
from peft_ladder.layer import LadderLayer
from peft_ladder.quantization import LadderQuantizationWarning


@pytest.fixture
def trained(tmp_path):
    """A Ladder adapter with non-trivial weights, saved next to its base model."""
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_causal_lm("llama").save_pretrained(base_dir)
    model = ladder("llama", connections="xladder", init_weights=False)
    model.save_pretrained(adapter_dir)
    return types.SimpleNamespace(model=model, base_dir=base_dir, adapter_dir=adapter_dir, logits=logits(model))


def side_keys(model, adapter="default"):
    return {k.replace(f".{adapter}.", ".") for k, _ in model.named_parameters() if ".ladder_" in k}


def test_save_pretrained_writes_only_adapter_files_with_ladder_keys(trained):
    files = {p.name for p in trained.adapter_dir.iterdir()}
    assert files == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    state = load_file(trained.adapter_dir / "adapter_model.safetensors")
    assert set(state) == side_keys(trained.model)
    assert all(".ladder_side." in key and ".default." not in key for key in state)
    config = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LADDER" and config["connections"] == "xladder"


def test_peft_model_from_pretrained_gives_identical_logits(trained):
    loaded = PeftModel.from_pretrained(tiny_causal_lm("llama"), trained.adapter_dir)
    assert torch.equal(logits(loaded), trained.logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable = PeftModel.from_pretrained(tiny_causal_lm("llama"), trained.adapter_dir, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, _ in trainable.named_parameters() if ".ladder_" in n
    }


def test_low_cpu_mem_usage_and_another_adapter_name_give_identical_logits(trained):
    lean = PeftModel.from_pretrained(tiny_causal_lm("llama"), trained.adapter_dir, low_cpu_mem_usage=True)
    assert torch.equal(logits(lean), trained.logits)
    renamed = PeftModel.from_pretrained(tiny_causal_lm("llama"), trained.adapter_dir, adapter_name="math")
    assert renamed.active_adapter == "math"
    assert torch.equal(logits(renamed), trained.logits)


def test_auto_peft_model_and_peft_config_from_pretrained(trained):
    config = PeftConfig.from_pretrained(trained.adapter_dir)
    assert isinstance(config, LadderConfig) and config.connections == "xladder" and config.init_weights is False
    config_json = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    config_json["base_model_name_or_path"] = str(trained.base_dir)
    (trained.adapter_dir / "adapter_config.json").write_text(json.dumps(config_json))
    model = AutoPeftModelForCausalLM.from_pretrained(trained.adapter_dir)
    assert torch.equal(logits(model), trained.logits)


def test_transformers_load_adapter_gives_identical_logits(trained):
    base = tiny_causal_lm("llama")
    base.load_adapter(str(trained.adapter_dir))
    assert torch.equal(logits(base), trained.logits)


@pytest.mark.parametrize("imports", ["import torch, peft_ladder", "import torch"])
def test_reload_in_a_fresh_process(trained, tmp_path, imports):
    # The second case never imports peft_ladder: the start-up hook registers LADDER when peft is imported.
    torch.save(trained.logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        {imports}
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(trained.base_dir)!r}),
                                          {str(trained.adapter_dir)!r})
        inputs = {{k: torch.tensor(v) for k, v in {json.dumps({k: v.tolist() for k, v in batch().items()})}.items()}}
        with torch.no_grad():
            got = model(**inputs).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(got, expected), (got - expected).abs().max()
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-2000:]


def test_add_set_delete_adapter(trained):
    model = PeftModel.from_pretrained(tiny_causal_lm("llama"), trained.adapter_dir, adapter_name="a")
    model.add_adapter(
        "b", LadderConfig(task_type="CAUSAL_LM", reduction_factor=8, connections="ladder", init_weights=False)
    )
    assert model.active_adapter == "a" and torch.equal(logits(model), trained.logits)
    model.set_adapter("b")
    other = logits(model)
    assert not torch.equal(other, trained.logits)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".ladder_side.b." in n
    }
    model.set_adapter("a")
    assert torch.equal(logits(model), trained.logits)
    model.delete_adapter("a")
    assert model.active_adapter == "b" and torch.equal(logits(model), other)
    assert not any(".ladder_side.a." in n for n, _ in model.named_parameters())


def test_load_adapter_second_adapter_and_save_both(trained, tmp_path):
    model = ladder("llama")
    model.load_adapter(trained.adapter_dir, adapter_name="trained")
    model.set_adapter("trained")
    assert torch.equal(logits(model), trained.logits)
    model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "trained" / "adapter_model.safetensors").exists()
    state = load_file(tmp_path / "both" / "trained" / "adapter_model.safetensors")
    assert set(state) == set(load_file(trained.adapter_dir / "adapter_model.safetensors"))


def test_unload_returns_the_plain_base_model(trained):
    expected = logits(tiny_causal_lm("llama"))
    model = PeftModel.from_pretrained(tiny_causal_lm("llama"), trained.adapter_dir)
    base = model.unload()
    assert not any(isinstance(m, LadderLayer) for m in base.modules())
    assert not any("ladder_" in n for n, _ in base.named_parameters())
    assert torch.equal(logits(base), expected)
    assert not base.model._forward_pre_hooks and not base.model._forward_hooks


def test_merge_and_unload_explains_and_points_to_unload(trained):
    model = PeftModel.from_pretrained(tiny_causal_lm("llama"), trained.adapter_dir)
    with pytest.raises(NotImplementedError, match=r"side network.*unload\(\)"):
        model.merge_and_unload()
    assert torch.equal(logits(model), trained.logits)  # nothing half-unloaded


def _captured_push(trained, monkeypatch) -> tuple[dict, str]:
    """`push_to_hub("someone/ladder-adapter")` against a captured Hub: (the uploaded files and repo id, base path)."""
    import transformers.utils.hub as transformers_hub

    uploaded = {}

    class CapturedHub:
        def create_repo(self, repo_id, **kwargs):
            return types.SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            uploaded.update({op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations})
            uploaded["repo_id"] = repo_id

    monkeypatch.setattr(transformers_hub, "_hf_api", CapturedHub())
    base = str(trained.base_dir)  # a local path: PEFT reads the base model's config.json while saving
    monkeypatch.setattr(trained.model.peft_config["default"], "base_model_name_or_path", base)
    trained.model.push_to_hub("someone/ladder-adapter")
    return uploaded, base


def test_push_to_hub_uploads_adapter_files_and_a_peft_model_card(trained, monkeypatch):
    uploaded, base = _captured_push(trained, monkeypatch)
    assert uploaded.pop("repo_id") == "someone/ladder-adapter"
    assert set(uploaded) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = uploaded["README.md"].decode()
    front_matter = card.split("---")[1]
    assert "library_name: peft" in front_matter
    assert "- ladder" in front_matter
    assert f"base_model: {base}" in front_matter


def test_pushed_model_card_says_how_to_load_and_records_the_config_and_base_model(trained, monkeypatch):
    uploaded, base = _captured_push(trained, monkeypatch)
    card = uploaded["README.md"].decode()
    body = card.split("---", 2)[2]
    assert "## How to load" in body and "pip install peft-ladder" in body
    assert 'PeftModel.from_pretrained(base, "someone/ladder-adapter")' in body
    assert f'AutoModelForCausalLM.from_pretrained("{base}")' in body
    assert "import peft_ladder" in body and "PEFT_LADDER_NO_AUTOLOAD=1" in body
    assert f"Base model: `{base}`" in body
    recorded = json.loads(body.split("```json\n", 1)[1].split("\n```", 1)[0])
    saved = json.loads(uploaded["adapter_config.json"])
    assert recorded["peft_type"] == "LADDER" and recorded["connections"] == "xladder"
    for field in ("reduction_factor", "side_layers", "connections", "gate", "quantization", "loss_chunk_size"):
        assert recorded[field] == saved[field], field


@pytest.mark.parametrize("case", EXPENSIVE_CASES)
def test_every_case_saves_and_reloads_with_identical_logits(case, tmp_path):
    model = ladder(case.arch, init_weights=False, **case.kwargs)
    # Taken before saving: a quantized model's state_dict() can shift its own later outputs (test_quantization.py).
    expected = logits(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LadderQuantizationWarning)  # a 4-bit adapter quantizes the float base again
        loaded = PeftModel.from_pretrained(tiny_causal_lm(case.arch), tmp_path)
    assert torch.equal(logits(loaded), expected)


def test_sequence_classification_adapter_saves_the_new_head_and_reloads(tmp_path):
    model = ladder(tiny_seq_cls("llama"), task_type="SEQ_CLS", init_weights=False)
    with torch.no_grad():  # a trained head differs from the freshly initialised one of the reloaded base
        model.base_model.model.score.modules_to_save["default"].weight.normal_()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in state
    assert all(".ladder_side." in k for k in state if k != "base_model.model.score.weight")
    loaded = PeftModel.from_pretrained(tiny_seq_cls("llama"), tmp_path)
    assert torch.equal(logits(loaded), logits(model))
