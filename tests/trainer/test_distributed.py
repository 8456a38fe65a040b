"""uda-train as several processes on CPU (gloo): two ranks, two steps of the tiny ViT each.

Under torchrun rank 0 alone writes the log, checkpoint, artifact and report and publishes once.
When one rank fails, the other must not wait for it forever: a non-finite loss on one rank
stops both at the same step with the same one-line error, and a rank that dies makes the other
fail within seconds. Those two are launched by hand (RANK/WORLD_SIZE/MASTER_* as torchrun
would set them): torchrun's agent would otherwise kill the surviving rank itself.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from residual_store.stores import open_store

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 90  # a hang fails the test here instead of pytest's global timeout


@pytest.fixture
def argv(world, tmp_path) -> list[str]:
    return ["--source", str(world["photo"]), "--target", str(world["sketch"]),
            "--model", "uda-tiny-vit", "--pretrained", "random", "--epochs", "1",
            "--iters-per-epoch", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu",
            "--lr", "1e-3", "--head-lr-mult", "10", "--workdir", str(tmp_path / "run")]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def test_torchrun_two_processes_train_and_rank0_exports_and_publishes_once(argv, tmp_path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trainer.cli", *argv, "--rst", "--publish", str(store), "--task", "p2s"]
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("published task p2s version 1") == 1
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"]["steps"] == 2 and report["metrics"]["target_images"] == 15
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2]  # one writer
    assert [v.version for v in open_store(str(store)).versions("p2s")] == [1]


def launch(per_rank: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Run one process per argument list as ranks 0..n-1 of one job, as torchrun would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(len(per_rank)),
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r, args in enumerate(per_rank)]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if "WARNING" not in line]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_step(argv, tmp_path):
    """Rank 1's L_reg weight overflows float32, so only its loss is infinite; rank 0's is finite
    and its weights are already poisoned by the averaged gradient. Both stop after step 1."""
    rank0, rank1 = launch([argv, [*argv, "--lambda2", "1e39"]])
    assert rank0.returncode == rank1.returncode == 1
    assert error_line(rank1).startswith("uda-train: error: loss is not finite at step 1 (")
    assert error_line(rank0).startswith("uda-train: error: loss is not finite at step 1 on another process")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # no checkpoint of a poisoned step


def test_a_rank_that_fails_does_not_leave_the_other_waiting(argv, tmp_path):
    bad = [*argv]
    bad[bad.index("--source") + 1] = str(tmp_path / "missing")
    rank0, rank1 = launch([argv, bad])  # communicate() raises TimeoutExpired on a hang
    assert rank1.returncode == 2 and "does not exist" in error_line(rank1)
    assert rank0.returncode != 0 and "by peer" in rank0.stderr  # gloo: connection closed/reset
