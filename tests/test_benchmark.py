"""The benchmark runner: same checkpoint and batches for every method, repeatable memory figures, written reports."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import requires_bitsandbytes

from benchmarks.__main__ import main, parse_args
from benchmarks.models import prepare_checkpoint
from benchmarks.report import markdown_table, ratio
from benchmarks.runner import run_in_subprocess, run_method
from benchmarks.validate import validate, validation_table


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return prepare_checkpoint("tiny", str(tmp_path_factory.mktemp("tiny")))


def _spec(checkpoint, method, shapes=((1, 32),), **options):
    return {
        **options,
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


# --- precision as Trainer runs it: bf16 autocast, 8-bit AdamW (--autocast, --optimizer) -----------------------------


@pytest.mark.bitsandbytes
@requires_bitsandbytes
@pytest.mark.parametrize("method", ["lora", "ladder", "ladder-4bit-frozendown"])
def test_bf16_autocast_and_8bit_adamw_are_applied_and_recorded(checkpoint, method):
    plain = run_method(_spec(checkpoint, method, ((1, 256),)))
    mixed = run_method(_spec(checkpoint, method, ((1, 256),), optimizer="adamw_8bit", autocast="bf16"))
    assert (plain["optimizer"], plain["autocast"], plain["optimizer_class"]) == (
        "adamw",
        "none",
        "torch.optim.adamw.AdamW",
    )
    assert (mixed["optimizer"], mixed["autocast"]) == ("adamw_8bit", "bf16")
    assert mixed["optimizer_class"] == "bitsandbytes.optim.adamw.AdamW8bit"
    (plain_run,), (mixed_run,) = plain["runs"], mixed["runs"]
    assert mixed_run["saved_bytes"] < plain_run["saved_bytes"]  # bf16 copies of what fp32 adapters keep
    assert mixed_run["weights_bytes"] == plain_run["weights_bytes"]  # fp32 master weights stay fp32
    # On `tiny` every trainable tensor holds fewer than 4,096 values, so 8-bit AdamW keeps fp32 state for all of
    # them (bitsandbytes' min_8bit_size), as the planner counts it.
    results = {"args": {"model": "tiny", "dtype": "bfloat16"}, "methods": [plain, mixed]}
    path = os.path.join(checkpoint, f"results-{method}.json")
    with open(path, "w") as handle:
        json.dump(results, handle)
    rows = validate(path)
    assert [(r["optimizer"], r["autocast"]) for r in rows] == [("adamw", "none"), ("adamw_8bit", "bf16")]
    for row in rows:
        assert abs(row["error"]) < 0.10, row
    assert f"| {method} | adamw_8bit | bf16 | 1 | 256 |" in validation_table(rows)


def test_results_written_before_the_options_validate_as_adamw_without_autocast(checkpoint):
    record = run_method(_spec(checkpoint, "ladder"))
    for key in ("optimizer", "optimizer_class", "autocast"):
        del record[key]
    path = os.path.join(checkpoint, "results-old.json")
    with open(path, "w") as handle:
        json.dump({"args": {"model": "tiny", "dtype": "bfloat16"}, "methods": [record]}, handle)
    ((row),) = validate(path)
    assert (row["optimizer"], row["autocast"]) == ("adamw", "none")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--optimizer", "paged_adamw_8bit", "--device", "cpu"],
            "optimizer='paged_adamw_8bit' on device='cpu': paged optimizer state lives in CUDA unified memory",
        ),
        (
            ["--autocast", "bf16", "--dtype", "float32"],
            "autocast='bf16' with dtype='float32': the benchmark measures Trainer's bf16=True on a bf16 backbone",
        ),
        (["--optim", "sgd"], "argument --optimizer/--optim: invalid choice: 'sgd'"),
        (["--autocast", "fp16"], "argument --autocast: invalid choice: 'fp16'"),
    ],
)
def test_precision_options_that_cannot_be_measured_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_optim_is_an_alias_of_optimizer():
    assert parse_args(["--optim", "adamw_8bit", "--autocast", "bf16"]).optimizer == "adamw_8bit"


@pytest.mark.gpu
@pytest.mark.bitsandbytes
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: paged optimizer state is CUDA unified memory")
def test_paged_8bit_adamw_runs_on_cuda_and_is_recorded(checkpoint):
    spec = {**_spec(checkpoint, "ladder", ((1, 256),), optimizer="paged_adamw_8bit", autocast="bf16"), "device": "cuda"}
    record = run_method(spec)
    assert record["optimizer_class"] == "bitsandbytes.optim.adamw.PagedAdamW8bit"
    (run,) = record["runs"]
    assert "error" not in run and run["memory_method"].startswith("torch.cuda")
