"""The next steps' batches drawn in worker processes (``data_workers > 0``) while the device trains.

Rendering a sweep in the training process holds up every step: on a GPU the renderer's small kernels and host
syncs take longer than a step of the model (benchmarks/RESULTS.md, the train suite's "data" rows). The workers
render (or read) on the CPU, in step order and ahead of the step that needs them, and hand each step's
micro-batches over in pinned memory for an asynchronous copy. A step's batches are a pure function of (seed,
step, shard), so they are the same with workers or without; on a GPU rendered on the CPU instead of the GPU,
they differ from those in float rounding.
"""

from __future__ import annotations

import pickle
import signal
import sys
import traceback

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dcign_fast.train.data import BatchStream

Drawn = list[tuple[int, torch.Tensor, str]]  # (shard, images [B, C, S, S], kind) per micro-batch


class DataWorkerError(RuntimeError):
    """A data worker process died (killed, out of memory): said in one line, not as the DataLoader's traceback,
    which tells no more."""


class _StepBatches(Dataset):
    """Step -> (step, this rank's micro-batches of it, or the exception drawing them raised): what one worker
    computes per request. The exception comes back as a value, so that the trainer raises it as drawing in its
    own process would (the DataLoader would wrap it in a worker's traceback)."""

    def __init__(self, stream: BatchStream, shards: range) -> None:
        self.stream, self.shards = stream, shards

    def __getitem__(self, step: int) -> tuple[int, Drawn | Exception]:
        try:
            return step, [(shard, *self.stream.batch(step, shard)[::2]) for shard in self.shards]
        except Exception as err:  # (re-raised by Prefetcher.draw)
            return step, err if get_worker_info() is None else _portable(err)


def _portable(err: Exception) -> Exception:
    """``err`` as it can cross to the training process: pickled, an exception loses its traceback and cause (so
    they go along as a note), and one that does not pickle and unpickle would have hung the DataLoader's queue
    or come out as another error (so a RuntimeError with its type and message stands in for it)."""
    note = "in a data worker:\n" + "".join(traceback.format_exception(err))
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        err = RuntimeError(f"{type(err).__name__}: {err}")
    err.add_note(note)
    return err


def _quiet_worker(worker_id: int) -> None:
    """A worker ignores Ctrl-C and SIGTERM: they go to the whole process group, and the trainer answers them by
    finishing its step and saving, then stopping its workers (a worker that died first would fail that step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Prefetcher:
    """Draws the micro-batches ``shards`` of each step of ``stream``: in this process (``workers`` 0), or in
    ``workers`` processes a few steps ahead, handed out in order (and started over where a run jumps: a second
    ``train()``)."""

    def __init__(self, stream: BatchStream, shards: range, workers: int, pin_memory: bool) -> None:
        if workers and sys.platform != "linux":
            # Forked, a render callable (a closure, a lambda) need not pickle; fork is Linux's start method only
            # (macOS's is unsafe with its system libraries, Windows has none).
            raise ValueError(f"data_workers > 0 needs Linux, where worker processes are forked; got {sys.platform}")
        self.dataset, self.workers, self.pin_memory = _StepBatches(stream, shards), workers, pin_memory
        self._next_step: int | None = None
        self._batches: object = None  # the DataLoader's iterator

    def draw(self, step: int, last_step: int) -> Drawn:
        """Step ``step``'s micro-batches; the workers go on with the steps after it, up to ``last_step``."""
        drawn = self._from_workers(step, last_step) if self.workers else self.dataset[step][1]
        if isinstance(drawn, Exception):
            raise drawn
        return drawn

    def _from_workers(self, step: int, last_step: int) -> Drawn | Exception:
        """Step ``step``'s batches from the workers, which are started (or started over) where they are not at it."""
        if self._next_step != step:
            self.close()
            loader = DataLoader(
                self.dataset,
                batch_size=None,  # each item is a whole step already
                sampler=range(step, last_step + 1),
                num_workers=self.workers,
                pin_memory=self.pin_memory,
                worker_init_fn=_quiet_worker,
                multiprocessing_context="fork",  # (the workers touch no GPU)
            )
            handler = signal.getsignal(signal.SIGCHLD)
            self._batches = iter(loader)
            # The DataLoader's SIGCHLD handler raised a dead worker's error wherever the trainer was, mid-step
            # too, where nothing is saved; without it the error comes from the next draw (the DataLoader polls its
            # workers), where the trainer saves the steps trained.
            signal.signal(signal.SIGCHLD, handler)
        try:
            drawn_step, drawn = next(self._batches)  # type: ignore[call-overload]
        except RuntimeError as err:
            if not str(err).startswith("DataLoader worker (pid"):  # (torch's words for a worker that is gone)
                raise
            raise DataWorkerError(
                f"a data worker died ({err}): it was killed, or ran out of memory (each of data_workers renders "
                "in its own process: fewer use less)"
            ) from err
        assert drawn_step == step, (drawn_step, step)  # (the sampler hands the steps out in order)
        self._next_step = step + 1
        return drawn

    def close(self) -> None:
        """Stops the workers (they are started again at the next :meth:`draw`)."""
        batches, self._batches, self._next_step = self._batches, None, None
        # Dropping the iterator is not enough after an error it raised: that error's traceback holds it (a
        # notebook keeps the last one), and with it the workers, until the error is let go.
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
