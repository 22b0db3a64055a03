"""torchrun with 2 CPU processes (gloo), one sweep each, ends with the weights of 1 process that
accumulates gradients over the same two sweeps (each still clamped on its own); the ranks agree on when to stop
and on what they log."""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcign_fast.train.checkpoint import load_checkpoint
from dcign_fast.train.distributed import (
    LostRankError,
    World,
    all_agree,
    close_world,
    ddp_exchanging,
    earliest_over_ranks,
    mean_over_ranks,
    run_together,
)
from tests.helpers import assert_trained_alike

# Adam with a huge epsilon is SGD (step = lr / eps * gradient): plain Adam turns float rounding in
# near-zero gradients into full-size steps, which would hide what is compared.
OPTIONS = (
    "batch_size=4 device=cpu threads=1 checkpoint_every=3 log_every=1 image_every=1000 adam_eps=1e6 lr=1000 "
    "grad_clip=null invariance=1"  # a strong invariance pull, so that one counted twice would show
)
COMMON = ["--steps", "3"] + [arg for option in OPTIONS.split() for arg in ("--set", option)]


def train(out, launcher: list[str], *extra: str) -> str:
    """The run's standard error (the progress bar's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, "-m", "dcign_fast.train", "--out", str(out), *COMMON, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_accumulating_two_sweeps(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    bar = train(tmp_path / "ddp", torchrun, "--set", "data_workers=1")  # each rank's shard drawn by its own worker
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
    assert f"loss={totals[0][-1]:.1f}]" in bar  # and the progress bar's (it showed rank 0's)
    # So are the batch kinds: every rank's, in shard order (rank 0's alone before).
    assert [line["kind"] for line in logged[0]] == [line["kind"] for line in logged[1]]


def _agree_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = World(rank=rank, size=2)
    result = {
        "agree": [all_agree(flag, world) for flag in (rank == 1, False, True)],
        "mean": mean_over_ranks({"total": float(rank), "kind": f"k{rank}"}, world),
        "earliest": [earliest_over_ranks(step, world) for step in ([7, 3][rank], [None, 5][rank], None)],
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def _run_two_ranks(worker: Callable[[int, str, str], None], folder: Path) -> list[dict]:
    """What ``worker(rank, store, folder)`` wrote to ``folder/<rank>.json`` in each of 2 gloo processes."""
    ranks = mp.spawn(worker, args=(str(folder / "store"), str(folder)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=1):  # a hang fails the test instead of CI
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two gloo ranks did not finish within 300 s")
    return [json.loads((folder / f"{rank}.json").read_text()) for rank in (0, 1)]


def test_a_flag_one_rank_raises_stops_every_rank(tmp_path):
    """A NaN or a Ctrl-C seen by one rank must stop all of them at the same step (or the others hang in the next
    all-reduce); logged losses are the ranks' mean, their batch kinds joined in rank order. (2 gloo processes)"""
    for result in _run_two_ranks(_agree_worker, tmp_path):
        assert result == {
            "agree": [True, False, True],
            "mean": {"total": 0.5, "kind": "k0+k1"},
            "earliest": [3, 5, None],  # every rank names the first step any rank found a NaN at
        }


def _together_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = World(rank=rank, size=2)

    def full_disk_on_rank_0() -> None:
        if rank == 0:
            raise OSError("no space left for the checkpoint")

    result: dict[str, object] = {"value": run_together(lambda: 10 * rank, world)}
    try:
        run_together(full_disk_on_rank_0, world)
    except Exception as err:
        result["error"] = [type(err).__name__, str(err)]
    result["after"] = all_agree(rank == 1, world)  # the ranks still talk: none is left in a collective
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_work_that_fails_on_one_rank_stops_every_rank_with_its_message(tmp_path):
    """Rank 0 writes checkpoints, logs and pictures alone; when that fails, the other ranks must stop too, with
    its reason, not wait for it in their next collective (gloo: a traceback; NCCL: a hang). (2 gloo processes)"""
    first, second = _run_two_ranks(_together_worker, tmp_path)
    assert first == {"value": 0, "error": ["OSError", "no space left for the checkpoint"], "after": True}
    message = "rank 0 stopped the run: OSError: no space left for the checkpoint"
    assert second == {"value": 10, "error": ["OtherRankError", message], "after": True}


def _killed_peer_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = World(rank=rank, size=2)
    all_agree(False, world)
    if rank == 1:
        os._exit(0)  # as a SIGKILL leaves it: no goodbye to the group
    try:
        all_agree(False, world)
        result = {"error": None}
    except Exception as err:
        result = {"error": [type(err).__name__, str(err)]}
    Path(out, "0.json").write_text(json.dumps(result))
    Path(out, "1.json").write_text("{}")
    close_world(world, together=False)  # as the trainer leaves after an error: left to exit, gloo could abort


def test_a_rank_that_dies_stops_the_others_in_one_line(tmp_path):
    """A killed rank left the survivor a 30-line traceback through gloo's sources at its next collective."""
    survivor, _ = _run_two_ranks(_killed_peer_worker, tmp_path)
    kind, message = survivor["error"]
    assert kind == "LostRankError" and message.startswith("the ranks could not exchange their state (")
    assert message.endswith("another rank has probably stopped (its output says why); the newest checkpoint "
                            "stands, continue with --resume")  # fmt: skip


def _dead_peer_worker(rank: int, store: str, out: str, when: str) -> None:
    """Rank 1 leaves ``when`` ("before DDP": before DDP's constructor broadcasts the weights; "in backward":
    between two steps, before the next all-reduce of the gradients); rank 0 records what it met there."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    dist.barrier()  # (both connected)
    if when == "in backward":
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        model(torch.randn(2, 4)).sum().backward()  # both ranks meet once in the gradients' all-reduce
    if rank == 1:
        os._exit(0)  # as a SIGKILL leaves it, or a rank whose model failed to build
    try:
        with ddp_exchanging():
            if when == "in backward":
                model(torch.randn(2, 4)).sum().backward()
            else:
                torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        result = {"error": None}
    except Exception as err:
        result = {"error": [type(err).__name__, str(err)]}
    Path(out, "0.json").write_text(json.dumps(result))
    Path(out, "1.json").write_text("{}")
    close_world(World(rank=rank, size=2), together=False)


@pytest.mark.parametrize("when", ["in backward", "before DDP"])
def test_a_rank_that_dies_while_ddp_exchanges_stops_the_others_in_one_line(tmp_path, when):
    """DDP all-reduces the gradients inside backward, and its constructor broadcasts rank 0's weights: the
    survivor got gloo's 30-line traceback out of ``.backward()`` in the trainer (and gloo's message alone out of
    the constructor), not the one line its other exchanges give."""
    survivor, _ = _run_two_ranks(functools.partial(_dead_peer_worker, when=when), tmp_path)
    kind, message = survivor["error"]
    assert kind == "LostRankError" and message.startswith("the ranks could not exchange their state ([")
    assert "gloo/transport/" in message and message.endswith("continue with --resume")


def test_an_error_of_this_ranks_own_in_backward_is_not_blamed_on_another_rank():
    """Only gloo's connection errors become OtherRankError: a shape error, or running out of memory, is this
    rank's, and its message must reach the user unchanged."""
    own = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x4)")
    with pytest.raises(RuntimeError) as raised, ddp_exchanging():
        raise own
    assert raised.value is own
    with pytest.raises(LostRankError, match=r"could not exchange their state \(timed out\)"), ddp_exchanging():
        raise dist.DistNetworkError("timed out")


def _leave_worker(rank: int, store: str, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun's (the group is init_world's)
    from dcign_fast.train.distributed import init_world

    init_world("cpu")
    joined = dist.is_initialized()
    atexit._run_exitfuncs()  # (what the interpreter runs as the process leaves)
    Path(out, f"{rank}.json").write_text(json.dumps({"joined": joined, "left": not dist.is_initialized()}))


def test_a_rank_that_leaves_without_closing_its_world_destroys_its_group_as_it_exits(tmp_path, monkeypatch):
    """A rank that leaves with its gloo group live (Trainer() raised, or torchrun's SIGTERM came before
    close_world) can abort as the interpreter ends: "terminate called without an active exception", status 134
    (about 1 exit in 80 of a bare 2-rank script). The group init_world joined is destroyed at exit."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert _run_two_ranks(_leave_worker, tmp_path) == [{"joined": True, "left": True}] * 2


def _picture_fails_worker(rank: int, store: str, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))  # as torchrun's (the group is ours)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from dcign_fast.train import Trainer
    from dcign_fast.train import trainer as trainer_module
    from tests.test_train import blobs, config

    trainer_module.save_progress_images = lambda *args, **kwargs: _raise(PermissionError("images: read-only"))
    trainer = Trainer(config(Path(out), steps=5, checkpoint_every=10, image_every=3), render=blobs)
    try:
        trainer.train()
        result: dict[str, object] = {"error": None}
    except Exception as err:
        result = {"error": [type(err).__name__, str(err)]}
    trainer.close()  # together: every rank stopped at the same point
    result["checkpoints"] = sorted(path.name for path in Path(out, "run", "checkpoints").glob("step-*"))
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def test_a_picture_rank_0_cannot_save_stops_both_ranks_with_the_steps_trained_saved(tmp_path):
    """The save after a failed picture is a collective too: every rank must take it, or one would wait forever."""
    first, second = _run_two_ranks(_picture_fails_worker, tmp_path)
    assert first == {"error": ["PermissionError", "images: read-only"], "checkpoints": ["step-00000003"]}
    message = "rank 0 stopped the run: PermissionError: images: read-only"
    assert second == {"error": ["OtherRankError", message], "checkpoints": ["step-00000003"]}


def test_an_exchange_that_fails_names_another_rank_in_one_line(monkeypatch):
    from dcign_fast.train import distributed

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda *args, **kwargs: _raise(RuntimeError("closed by peer")))
    with pytest.raises(distributed.LostRankError, match=r"could not exchange their state \(closed by peer\)"):
        mean_over_ranks({"total": 1.0}, World(rank=0, size=2))


def _raise(error: Exception) -> None:
    raise error


@pytest.mark.slow
def test_an_out_rank_0_cannot_create_stops_every_rank_in_one_line(tmp_path):
    """(The other rank used to fail in its next collective with a traceback about a closed connection.)"""
    (tmp_path / "afile").write_text("")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*torchrun, "-m", "dcign_fast.train", "--out", str(tmp_path / "afile" / "run"), *COMMON],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode != 0
    # One line from each rank (written at once, they may share a line), and only torchrun's own traceback.
    assert done.stderr.count("dcign_fast.train: error:") == 2, done.stderr
    assert not re.search(r'File "[^"]*dcign_fast', done.stderr), done.stderr
    assert f"error: out={tmp_path / 'afile' / 'run'}: cannot create the run folder" in done.stderr
    assert "error: rank 0 stopped the run: OSError: out=" in done.stderr


def test_a_process_alone_trains_on_the_gpu_asked_for_and_a_torchrun_rank_on_its_own(monkeypatch):
    """device=cuda:1 trained on cuda:0: the trainer took LOCAL_RANK's GPU, 0 without torchrun."""
    from dcign_fast.train.distributed import training_device

    alone, rank_3 = World(), World(rank=3, size=4, local_rank=3)
    assert training_device(torch.device("cuda", 1), alone) == torch.device("cuda", 1)
    assert training_device(torch.device("cuda", 1), rank_3) == torch.device("cuda", 3)
    assert training_device(torch.device("cuda"), rank_3) == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)  # (torch.cuda.set_device(2) in a notebook)
    assert training_device(torch.device("cuda"), alone) == torch.device("cuda", 2)
    assert training_device(torch.device("cpu"), rank_3) == torch.device("cpu")


def test_under_nccl_the_ranks_exchange_flags_through_a_gloo_group_on_the_cpu(monkeypatch):
    """Through NCCL, each per-step flag (a Ctrl-C, the time limit, a data error) was a CUDA tensor queued behind
    the step's kernels and read back: a host sync per step. Checked by recording the calls (no GPUs here)."""
    from dcign_fast.train import distributed

    control, exchanged = object(), []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in {"is_initialized": True, "get_backend": "nccl", "get_rank": 1, "get_world_size": 2}.items():
        monkeypatch.setattr(distributed.dist, name, lambda value=value: value)
    monkeypatch.setattr(distributed.dist, "new_group", lambda backend: control if backend == "gloo" else None)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, group, **kw: exchanged.append((t.device, group)))
    world = distributed.init_world("cpu")  # (a process group made by the caller, with NCCL)
    assert world == World(rank=1, size=2, control=control)
    all_agree(True, world)
    assert exchanged == [(torch.device("cpu"), control)]
