"""The benchmark runner: same checkpoint and batches for every method, repeatable memory figures, written reports."""

from __future__ import annotations

import json
import os

import pytest

from benchmarks.__main__ import main, parse_args
from benchmarks.models import prepare_checkpoint
from benchmarks.report import markdown_table, ratio
from benchmarks.runner import run_in_subprocess, run_method


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return prepare_checkpoint("tiny", str(tmp_path_factory.mktemp("tiny")))


def _spec(checkpoint, method, shapes=((1, 32),)):
    return {
        "model_dir": checkpoint,
        "device": "cpu",
        "dtype": "bfloat16",
        "threads": 1,
        "seed": 0,
        "lr": 1e-4,
        "steps": 1,
        "shapes": [list(s) for s in shapes],
        "method": method,
    }


def test_ladder_keeps_less_for_backward_than_lora(checkpoint):
    lora = run_method(_spec(checkpoint, "lora"))
    ladder = run_method(_spec(checkpoint, "ladder-nochunk"))
    assert ladder["trainable_params"] < lora["trainable_params"]
    (lora_run,), (ladder_run,) = lora["runs"], ladder["runs"]
    for run in (lora_run, ladder_run):
        assert run["peak_bytes"] > run["baseline_bytes"] >= run["weights_bytes"] > 0
        assert run["memory_method"].startswith("live tensor storages")
        assert run["final_loss"] > 0 and run["tokens_per_s"] > 0
    assert ladder_run["saved_bytes"] < lora_run["saved_bytes"]
    results = {"methods": [lora, ladder]}
    assert (
        ratio(results, "ladder-nochunk", "lora", "saved_bytes", 1, 32)
        == ladder_run["saved_bytes"] / lora_run["saved_bytes"]
    )
    table = markdown_table(results)
    assert "| lora | 1 | 32 | " in table and "| ladder-nochunk | 1 | 32 | " in table


def test_unknown_method_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--methods", "lora,dora"])
    assert "unknown method(s) ['dora']" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.bitsandbytes
def test_fresh_processes_give_identical_memory(checkpoint):
    first = run_in_subprocess(_spec(checkpoint, "ladder-4bit"))
    second = run_in_subprocess(_spec(checkpoint, "ladder-4bit"))
    assert "error" not in first, first.get("error")
    keys = ("peak_bytes", "baseline_bytes", "saved_bytes", "final_loss")
    assert [first["runs"][0][k] for k in keys] == [second["runs"][0][k] for k in keys]


@pytest.mark.slow
def test_cli_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "out"
    code = main(["--model", "tiny", "--methods", "ladder", "--seq-lens", "16,32", "--steps", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert {"torch", "transformers", "peft", "device"} <= set(results["environment"])
    assert [r["method"] for r in results["methods"]] == ["ladder"]
    assert [(r["batch_size"], r["seq_len"]) for r in results["methods"][0]["runs"]] == [(1, 16), (1, 32)]
    assert "| ladder | 1 | 32 |" in (out / "results.md").read_text()
    assert os.path.getsize(out / "results.png") > 1000
