"""Interrupted training loses nothing: a Trainer run of a Ladder model killed by a signal resumes exactly.

The killed runs are real processes (`tests/resume_worker.py`) that send themselves SIGKILL or SIGTERM at a fixed
point: inside a step's forward pass, or inside a checkpoint write. They are started together, since they spend their
time importing; the uninterrupted and the resumed runs train in this process with the worker's own code. The run has
attention dropout on, so an exact result needs the checkpoint's RNG state, not only its weights
(`test_without_the_rng_state_the_resumed_run_differs` shows the comparison can fail). Every test that uses the
killed runs is marked slow: the four processes take about 7 s of CPU time each, nearly all of it imports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_worker import run
from safetensors.torch import load_file
from tiny_training import CHECKPOINT_FILES

from peft_ladder import IncompleteCheckpointWarning, last_complete_checkpoint

WORKER = Path(__file__).with_name("resume_worker.py")
# name -> (--kill, --at): where each killed run dies.
KILLED = {
    "sigkill": ("sigkill", 4),  # in step 4's forward: the last checkpoint is checkpoint-2, mid-epoch
    "sigterm": ("sigterm", 6),  # in step 6's forward: the last checkpoint is checkpoint-4, at an epoch's end
    "sigkill-in-save": ("sigkill-in-save", 4),  # after checkpoint-4's adapter files, before the rest
    "sigterm-jit": ("sigterm-jit", 3),  # transformers' graceful stop, requested in step 3's forward
}
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The killed runs' output directories and exit statuses, and the uninterrupted run (trained meanwhile)."""
    root = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(WORKER), "--output-dir", str(root / name), "--kill", kill, "--at", str(at)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (kill, at) in KILLED.items()
    }
    killed = {}
    try:
        reference = run(root / "uninterrupted")
        for name, process in processes.items():
            _, stderr = process.communicate(timeout=300)
            killed[name] = (root / name, process.returncode, stderr)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return killed, reference, root / "uninterrupted"


def checkpoints(output_dir: Path) -> dict[str, set[str]]:
    return {path.name: {f.name for f in path.iterdir()} for path in sorted(output_dir.glob("checkpoint-*"))}


def assert_identical(got, expected, path="result"):
    """Equal to the bit: tensors with torch.equal, containers item by item, everything else with ==."""
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), f"{path}: max difference {(got - expected).abs().max().item():.3g}"
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for key in expected:
            assert_identical(got[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_identical(a, b, f"{path}[{i}]")
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"


def assert_resumed_exactly(resumed: dict, reference: dict, from_step: int) -> None:
    assert reference["steps_run"] == reference["global_step"] == 6
    assert resumed["steps_run"] == 6 - from_step  # it continued from the checkpoint, it did not start over
    assert len(resumed["side"]) == 48  # every ladder_ parameter of the side network is compared
    resumed = {**resumed, "steps_run": reference["steps_run"]}
    assert_identical(resumed, reference)  # weights, AdamW moments and steps, scheduler, all six losses


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, signum, last",
    [("sigkill", signal.SIGKILL, "checkpoint-2"), ("sigterm", signal.SIGTERM, "checkpoint-4")],
    ids=["sigkill", "sigterm"],
)
def test_a_run_killed_mid_step_resumes_to_the_weights_of_the_uninterrupted_run(runs, name, signum, last):
    killed, reference, _ = runs
    output_dir, returncode, stderr = killed[name]
    assert returncode == -signum, stderr
    assert set(checkpoints(output_dir)) <= {"checkpoint-2", "checkpoint-4"}
    assert max(checkpoints(output_dir), key=lambda n: int(n.split("-")[1])) == last
    assert all(files == CHECKPOINT_FILES for files in checkpoints(output_dir).values())

    resumed = run(output_dir, resume_from=True)
    assert_resumed_exactly(resumed, reference, from_step=int(last.split("-")[1]))


@pytest.mark.slow
def test_without_the_rng_state_the_resumed_run_differs(runs, tmp_path):
    # What makes the resume above exact is the RNG state in rng_state.pth: the dropout masks of the replayed steps.
    _, reference, uninterrupted = runs
    shutil.copytree(uninterrupted / "checkpoint-2", tmp_path / "checkpoint-2")
    (tmp_path / "checkpoint-2" / "rng_state.pth").unlink()
    resumed = run(tmp_path, resume_from=True)
    assert resumed["steps_run"] == 4
    assert resumed["losses"][:2] == reference["losses"][:2]  # restored from trainer_state.json
    difference = max((resumed["side"][n] - reference["side"][n]).abs().max().item() for n in reference["side"])
    assert difference > 1e-3


@pytest.mark.slow
def test_a_checkpoint_half_written_when_the_kill_lands_is_skipped_on_resume(runs):
    killed, reference, uninterrupted = runs
    output_dir, returncode, stderr = killed["sigkill-in-save"]
    assert returncode == -signal.SIGKILL, stderr
    assert checkpoints(output_dir) == {"checkpoint-2": CHECKPOINT_FILES, "checkpoint-4": ADAPTER_FILES}

    # transformers 5.25 picks the highest-numbered directory and fails on it, on every retry.
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4/trainer_state\.json"):
        run(output_dir, resume_from=True)

    with pytest.warns(IncompleteCheckpointWarning, match=r"Skipping .*checkpoint-4: it has no trainer_state\.json"):
        start = last_complete_checkpoint(output_dir)
    assert start == str(output_dir / "checkpoint-2")
    resumed = run(output_dir, resume_from=start)
    assert_resumed_exactly(resumed, reference, from_step=2)
    # The resumed run wrote checkpoint-4 again, whole, with the uninterrupted run's adapter.
    assert checkpoints(output_dir)["checkpoint-4"] == CHECKPOINT_FILES
    expected = load_file(uninterrupted / "checkpoint-4" / "adapter_model.safetensors")
    assert_identical(load_file(output_dir / "checkpoint-4" / "adapter_model.safetensors"), expected)


@pytest.mark.slow
def test_jit_checkpoint_on_sigterm_resumes_but_not_exactly_with_dropout(runs):
    # transformers' enable_jit_checkpoint: SIGTERM requests a checkpoint at the next callback point. Requested in
    # step 3's forward pass, it is taken in on_pre_optimizer_step: checkpoint-2 is written again with the weights,
    # optimizer and step count of step 2 but the RNG state after step 3's forward. The resume replays step 3 with
    # other dropout masks. Documented in docs/how-to/training.md; this test fails when transformers changes it.
    killed, reference, uninterrupted = runs
    output_dir, returncode, stderr = killed["sigterm-jit"]
    assert returncode == 0, stderr  # a graceful stop
    assert checkpoints(output_dir) == {"checkpoint-2": CHECKPOINT_FILES}  # no incomplete-marker left
    jit, regular = output_dir / "checkpoint-2", uninterrupted / "checkpoint-2"
    assert json.loads((jit / "trainer_state.json").read_text())["global_step"] == 2
    assert_identical(load_file(jit / "adapter_model.safetensors"), load_file(regular / "adapter_model.safetensors"))
    rng = {path: torch.load(path / "rng_state.pth", weights_only=False)["cpu"] for path in (jit, regular)}
    assert not torch.equal(rng[jit], rng[regular])

    resumed = run(output_dir, resume_from=last_complete_checkpoint(output_dir))
    assert resumed["global_step"] == 6 and resumed["steps_run"] == 4
    difference = max((resumed["side"][n] - reference["side"][n]).abs().max().item() for n in reference["side"])
    assert 1e-4 < difference < 0.2


def test_last_complete_checkpoint_skips_every_kind_of_unfinished_save(tmp_path):
    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(tmp_path) is None

    def checkpoint(name: str, state: str | None, marker: bool = False) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"")
        if state is not None:
            (tmp_path / name / "trainer_state.json").write_text(state)
        if marker:
            (tmp_path / name / "checkpoint-is-incomplete.txt").write_text("in progress")

    checkpoint("checkpoint-2", '{"global_step": 2}')
    checkpoint("checkpoint-9", '{"global_step": 9}')
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-9")  # by step number, not by name
    checkpoint("checkpoint-10", None)  # killed before trainer_state.json
    checkpoint("checkpoint-11", "")  # killed while writing it
    checkpoint("checkpoint-12", '{"global_step": 12}', marker=True)  # a just-in-time save killed before its end
    (tmp_path / "checkpoint-13").write_text("a file, not a checkpoint")
    (tmp_path / "runs").mkdir()

    with pytest.warns(IncompleteCheckpointWarning) as records:
        assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-9")
    messages = [str(record.message) for record in records]
    assert [m.split(":")[0] for m in messages] == [f"Skipping {tmp_path / f'checkpoint-{n}'}" for n in (12, 11, 10)]
    assert "checkpoint-is-incomplete.txt is still there" in messages[0]
    assert "its trainer_state.json does not parse (JSONDecodeError" in messages[1]
    assert "it has no trainer_state.json, which Trainer writes last" in messages[2]
