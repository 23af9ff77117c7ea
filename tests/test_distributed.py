"""Data-parallel Ladder training in two real processes on CPU (gloo): torchrun, accelerate launch, FSDP2.

Each run is compared with one process training on the same global batch (tests/distributed_worker.py): the ranks
must hold identical side weights after every step, and the final weights must match the single process's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch

WORKER = str(Path(__file__).with_name("distributed_worker.py"))
TIMEOUT = 300  # seconds; a run takes 20-60 s on 2 shared cores


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: list[str], engine: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{engine}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", *launcher, WORKER, "--engine", engine, "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert result.returncode == 0 and out.exists(), (
        f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return torch.load(out, weights_only=False)


def torchrun() -> list[str]:
    return [
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]


def accelerate_multi_process() -> list[str]:
    # --multi_gpu starts two processes on CPU too; `--cpu --num_processes 2` would silently start one.
    return [
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
    ]


@pytest.fixture(scope="module")
def single_trainer(tmp_path_factory) -> dict:
    """Trainer in this (single) process with the whole global batch per step."""
    assert "WORLD_SIZE" not in os.environ
    torch.manual_seed(0)
    return worker.run_trainer(str(tmp_path_factory.mktemp("single") / "out"))


def assert_same_run(distributed: dict, single: dict) -> None:
    assert distributed["ranks_started"] == distributed["world_size"] == 2
    assert distributed["rank_diffs"] == [0.0] * worker.STEPS  # every rank, every step: bit-identical side weights
    assert distributed["side"].keys() == single["side"].keys() and distributed["side"]
    for name, expected in single["side"].items():
        torch.testing.assert_close(distributed["side"][name], expected, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(
        torch.tensor(distributed["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_torchrun_ddp_trainer_matches_one_process_with_the_global_batch(tmp_path, single_trainer):
    run = launch(torchrun(), "trainer", tmp_path)
    assert run["distributed_type"] == "DistributedType.MULTI_CPU" and run["wrapped"] == "DistributedDataParallel"
    assert_same_run(run, single_trainer)


@pytest.mark.slow
def test_accelerate_launch_ddp_trainer_matches_one_process_with_the_global_batch(tmp_path, single_trainer):
    run = launch(accelerate_multi_process(), "trainer", tmp_path)
    assert run["distributed_type"] == "DistributedType.MULTI_CPU" and run["wrapped"] == "DistributedDataParallel"
    assert_same_run(run, single_trainer)


@pytest.mark.slow
def test_fsdp2_sharded_backbone_matches_one_process_with_the_global_batch(tmp_path):
    run = launch(torchrun(), "fsdp2", tmp_path)
    assert run["backbone_local_fraction"] == pytest.approx(0.5, abs=0.05)  # the frozen layers really are sharded
    assert run["side_blocks_local_fraction"] == pytest.approx(0.5, abs=0.05)  # and so are the side blocks
    torch.manual_seed(0)
    assert_same_run(run, worker.run_single_loop())
