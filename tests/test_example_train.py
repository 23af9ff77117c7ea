"""examples/train.py runs every method from the same code and prints each one's trainable parameters."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftConfig, get_peft_model
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def load_example():
    spec = importlib.util.spec_from_file_location("example_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_trains_every_method_and_prints_its_trainable_parameters(tmp_path):
    example = load_example()
    methods = [m for m in example.METHODS if m != "qlora" or HAS_BNB]
    command = [
        sys.executable,
        str(SCRIPT),
        "--method",
        *methods,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--output-dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]

    printed = re.findall(r"== (\w+) ==\ntrainable params: ([\d,]+) \|\| all params: ([\d,]+)", result.stdout)
    assert [m for m, _, _ in printed] == methods
    model_dir = tmp_path / "tiny-llama"
    for method, trainable, total in printed:
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        expected = get_peft_model(base, example.peft_config(method)).get_nb_trainable_parameters()
        if method != "qlora":  # 4-bit packing changes the total, not the adapter
            assert (int(trainable.replace(",", "")), int(total.replace(",", ""))) == expected, method
        else:
            assert int(trainable.replace(",", "")) == expected[0]
        adapter = tmp_path / method / "adapter"
        assert (adapter / "adapter_model.safetensors").exists()
        assert PeftConfig.from_pretrained(adapter).peft_type == ("LORA" if "lora" in method else "LADDER")
    assert f"\n{'ladder':<9} " in result.stdout and "last loss" in result.stdout


def test_only_the_peft_config_differs_between_methods():
    example = load_example()
    configs = {method: example.peft_config(method) for method in example.METHODS}
    assert type(configs["lora"]).__name__ == type(configs["qlora"]).__name__ == "LoraConfig"
    assert configs["ladder"].connections == "ladder" and configs["xladder"].connections == "xladder"
    assert configs["ladder"].peft_type == configs["xladder"].peft_type == "LADDER"
