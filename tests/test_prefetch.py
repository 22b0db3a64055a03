"""data_workers > 0: the next steps' batches drawn in worker processes (dcign_fast/train/prefetch.py)."""

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from dcign_fast.train import TrainConfig, Trainer
from dcign_fast.train.checkpoint import list_checkpoints
from dcign_fast.train.data import BatchStream, shard_generator
from dcign_fast.train.prefetch import DataWorkerError, Prefetcher
from tests.test_train import blobs, config


def _final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    trainer.train()
    return {name: value.clone() for name, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize("source", ["blobs", "render"])
def test_workers_train_the_weights_the_training_process_does(source, tmp_path):
    """Batches are a pure function of (seed, step, shard); on the CPU the workers render them bit for bit."""
    render = blobs if source == "blobs" else None
    runs = {}
    for workers in (0, 2):
        options = {"steps": 5, "accumulation": 2, "data_workers": workers, "threads": 1}
        runs[workers] = _final_weights(Trainer(config(tmp_path / str(workers), **options), render=render))
    for name, value in runs[0].items():
        assert torch.equal(value, runs[2][name]), name


def test_a_second_train_call_and_a_resume_draw_from_where_they_are(tmp_path):
    straight = _final_weights(Trainer(config(tmp_path / "straight", steps=6), render=blobs))
    trainer = Trainer(config(tmp_path / "parts", steps=6, data_workers=1, time_limit_s=0.0), render=blobs)
    trainer.train()  # stops before its first step
    trainer.config.time_limit_s = None
    trainer.config.steps = 3
    trainer.train()
    resumed = Trainer(config(tmp_path / "parts", steps=6, data_workers=2), resume=True, render=blobs)
    assert resumed.step == 3
    for name, value in _final_weights(resumed).items():
        assert torch.equal(value, straight[name]), name


class _FailsAtStep:
    """blobs, but the sweep of one step (shard 0) cannot be drawn."""

    def __init__(self, step: int) -> None:
        self.seed = shard_generator(0, step, 0).initial_seed()

    def __call__(self, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        if generator.initial_seed() == self.seed:
            raise ValueError("no such sweep on disk")
        return blobs(kind, generator)


def test_a_workers_data_error_is_raised_as_drawing_in_process_raises_it(tmp_path):
    """The trainer stops at that step with its own message and a checkpoint of the steps before; the DataLoader
    would have raised it wrapped in the worker's traceback."""
    messages = {}
    for workers in (0, 2):
        out = tmp_path / str(workers)
        trainer = Trainer(config(out, steps=6, checkpoint_every=100, data_workers=workers), render=_FailsAtStep(3))
        with pytest.raises(ValueError) as raised:
            trainer.train()
        messages[workers] = str(raised.value)
        assert [path.name for path in list_checkpoints(out / "run" / "checkpoints")] == ["step-00000003"]
    assert messages[2] == messages[0] == "no such sweep on disk"


@pytest.mark.parametrize(
    "options, words",
    [
        ({"data_workers": 2, "data_pool": 3}, "data_workers must be 0 with data_pool > 0"),
        ({"data_workers": -1}, "data_workers must be in [0, 1025), got -1"),
        ({"data_workers": 1.5}, "data_workers must be int"),
    ],
)
def test_data_workers_is_checked(options, words):
    with pytest.raises((TypeError, ValueError), match=re.escape(words)):
        TrainConfig(**options)


@pytest.mark.slow
def test_a_signal_to_the_whole_process_group_stops_with_a_checkpoint(tmp_path):
    """A terminal's Ctrl-C and a scheduler's SIGTERM reach the workers too: they ignore them, the trainer
    finishes its step, saves and stops them."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "dcign_fast.train", "--out", str(out), "--steps", "100000"]
    for option in ("batch_size=4", "device=cpu", "threads=1", "data_workers=2", "checkpoint_every=100000"):
        args += ["--set", option]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    log = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.stat().st_size) and run.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, signal.SIGTERM)
    output = run.communicate(timeout=120)[0].decode()
    assert run.returncode == 130, output
    assert "interrupted at step" in output and list_checkpoints(out / "checkpoints"), output


def test_workers_off_linux_are_refused_by_name(tmp_path, monkeypatch):
    """Workers are forked (a render callable need not pickle): Linux only."""
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(ValueError, match="data_workers > 0 needs Linux, where worker processes are forked; got darwin"):
        Trainer(config(tmp_path, data_workers=1), render=blobs)


class _Unpicklable(Exception):
    def __init__(self, path: str, line: int) -> None:  # (unpickling calls it with the message alone)
        super().__init__(f"{path}:{line} is corrupt")


class _Raises:
    """blobs, but step 2's sweep raises ``error()`` (with a cause), or its worker is killed."""

    def __init__(self, error) -> None:
        self.error, self.seed = error, shard_generator(0, 2, 0).initial_seed()

    def __call__(self, kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        if generator.initial_seed() == self.seed:
            if self.error is None:
                os.kill(os.getpid(), signal.SIGKILL)  # (in the worker: render= runs there)
            raise self.error() from OSError("the disk said no")
        return blobs(kind, generator)


def test_a_workers_error_that_does_not_pickle_comes_back_as_a_runtime_error_with_its_traceback(tmp_path):
    """It hung the DataLoader's queue, or came out as unpickling's TypeError; the cause and traceback were lost."""
    trainer = Trainer(config(tmp_path, steps=4, data_workers=1), render=_Raises(lambda: _Unpicklable("a.png", 3)))
    with pytest.raises(RuntimeError, match=r"^_Unpicklable: a\.png:3 is corrupt\n") as raised:
        trainer.train()
    (note,) = raised.value.__notes__
    assert note.startswith("in a data worker:") and "OSError: the disk said no" in note and "__call__" in note


def test_close_stops_the_workers_while_an_error_they_raised_is_held(tmp_path):
    """The error's traceback holds the DataLoader's iterator: a notebook keeping it kept the workers alive (and
    such a process hung at exit)."""
    c = config(tmp_path, data_workers=2)
    prefetcher = Prefetcher(BatchStream(blobs, c, show_progress=False), range(1), 2, pin_memory=False)
    before = set(multiprocessing.active_children())
    prefetcher.draw(0, 1000)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    try:
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].join()  # (dead before the draws: its loss is then named as such, not as a broken connection)
        with pytest.raises(DataWorkerError, match=r"^a data worker died \(DataLoader worker \(pid") as raised:
            for step in range(1, 1001):  # the dead worker's step is missing; its loss is found within 5 s
                prefetcher.draw(step, 1000)
        prefetcher.close()
        assert raised.value is not None and not any(worker.is_alive() for worker in workers)
    finally:  # (without the mend, the held error kept the other worker, and pytest hung at exit)
        for worker in workers:
            worker.kill()


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_at_a_step_boundary_with_a_checkpoint(tmp_path):
    """The DataLoader's SIGCHLD handler raised its error mid-step, where nothing was saved."""
    trainer = Trainer(config(tmp_path, steps=6, checkpoint_every=100, data_workers=1), render=_Raises(None))
    with pytest.raises(DataWorkerError, match=r"DataLoader worker .*it was killed, or ran out of memory"):
        trainer.train()
    # Steps the worker had drawn but not yet handed over die with it: the run stops at step 1 or 2, saved.
    assert trainer.step in (1, 2)
    assert [path.name for path in list_checkpoints(tmp_path / "run" / "checkpoints")] == [f"step-{trainer.step:08d}"]
