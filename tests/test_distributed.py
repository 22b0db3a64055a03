"""torchrun with 2 CPU processes (gloo), one sweep each, ends with the weights of 1 process that
accumulates gradients over the same two sweeps (each still clamped on its own); the ranks agree on when to stop
and on what they log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcign_fast.train.checkpoint import load_checkpoint
from dcign_fast.train.distributed import World, all_agree, mean_over_ranks
from tests.helpers import assert_trained_alike

# Adam with a huge epsilon is SGD (step = lr / eps * gradient): plain Adam turns float rounding in
# near-zero gradients into full-size steps, which would hide what is compared.
OPTIONS = (
    "batch_size=4 device=cpu threads=1 checkpoint_every=3 log_every=1 image_every=1000 adam_eps=1e6 lr=1000 "
    "grad_clip=null invariance=1"  # a strong invariance pull, so that one counted twice would show
)
COMMON = ["--steps", "3"] + [arg for option in OPTIONS.split() for arg in ("--set", option)]


def train(out, launcher: list[str], *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, "-m", "dcign_fast.train", "--out", str(out), *COMMON, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_accumulating_two_sweeps(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    train(tmp_path / "ddp", torchrun)
    train(tmp_path / "single", [sys.executable], "--set", "accumulation=2")
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step-00000003")[0]
    single = load_checkpoint(tmp_path / "single" / "checkpoints" / "step-00000003")[0]
    assert_trained_alike(ddp, single)
    # The logged losses are the ranks' mean, as the accumulating process logs the mean of its two sweeps.
    logged = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("ddp", "single")
    ]
    totals = [[line["total"] for line in lines] for lines in logged]
    assert len(totals[0]) == 3 and totals[0] == pytest.approx(totals[1], rel=1e-4)
    # So are the batch kinds: every rank's, in shard order (rank 0's alone before).
    assert [line["kind"] for line in logged[0]] == [line["kind"] for line in logged[1]]


def _agree_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world, cpu = World(rank=rank, size=2), torch.device("cpu")
    result = {
        "agree": [all_agree(flag, world, cpu) for flag in (rank == 1, False, True)],
        "mean": mean_over_ranks({"total": float(rank), "kind": f"k{rank}"}, world, cpu),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_a_flag_one_rank_raises_stops_every_rank(tmp_path):
    """A NaN or a Ctrl-C seen by one rank must stop all of them at the same step (or the others hang in the next
    all-reduce); logged losses are the ranks' mean, their batch kinds joined in rank order. (2 gloo processes)"""
    ranks = mp.spawn(_agree_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=1):  # a hang fails the test instead of CI
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 300 s")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"{rank}.json").read_text())
        assert result == {"agree": [True, False, True], "mean": {"total": 0.5, "kind": "k0+k1"}}
