"""`.ci/run oldest` tests the floors `pyproject.toml` states: `.ci/oldest.txt` must pin exactly those floors."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PINNED = {"peft", "transformers", "accelerate", "safetensors", "bitsandbytes", "trl"}


def floors() -> dict[str, Version]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["test"]
    found = {}
    for requirement in map(Requirement, requirements):
        lows = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
        if requirement.name in PINNED and lows:
            found[requirement.name] = max(lows)
    return found


def pins() -> dict[str, Version]:
    lines = (ROOT / ".ci" / "oldest.txt").read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: Version(next(iter(r.specifier)).version) for r in requirements}


def test_oldest_pins_are_exactly_the_floors_of_pyproject():
    assert set(floors()) == PINNED
    assert pins() == floors()
