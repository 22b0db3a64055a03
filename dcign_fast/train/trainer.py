"""The trainer: DC-IGN's procedure on one GPU, many GPUs (torchrun + DDP) or the CPU.

Never loses work: checkpoints are atomic (see checkpoint.py); a NaN/inf loss stops the run before
anything is written (or skips the step, if configured), found when the losses are read back: at the steps that
log, checkpoint or draw pictures (every step with skip), so that the others never wait for the GPU (for the
model's work: the built-in renderer, drawing on a GPU in this process, reads back as it renders; with data_workers
it renders on the CPUs, ahead). Ctrl-C or
SIGTERM finishes the current step, saves a checkpoint and returns. A resumed run continues exactly: batches and
latent noise are pure functions of (seed, step, shard), and the optimizer state is restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dcign_fast.devices import resolve_device
from dcign_fast.models import DCIGN
from dcign_fast.ops.backends import EXPLICIT_BACKENDS, check_backend_runs_on
from dcign_fast.train.checkpoint import (
    STATE,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_into,
    load_state,
    recover_checkpoints,
    save_checkpoint,
    weights_file,
)
from dcign_fast.train.config import RUN_CONTROLS, TrainConfig
from dcign_fast.train.data import BatchStream, dataset_location, default_source, latent_seed
from dcign_fast.train.distributed import (
    LostRankError,
    World,
    all_agree,
    close_world,
    ddp_exchanging,
    earliest_over_ranks,
    init_world,
    mean_over_ranks,
    run_together,
    training_device,
)
from dcign_fast.train.lock import LOCK_FILE, run_folder_lock
from dcign_fast.train.logs import IMAGES_FOLDER, METRICS_FILE, MetricsLog, save_progress_images
from dcign_fast.train.prefetch import Prefetcher
from dcign_fast.train.procedure import batch_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was. (The steps between two that
    log, checkpoint or draw pictures are taken before their losses are read back: the model in memory may hold
    such a step's weights, and the run continues from the checkpoint.)"""


@dataclass
class StepLosses:
    """One optimizer step's losses, on the device."""

    names: tuple[str, ...]  # DCIGN.loss's
    values: torch.Tensor  # [len(names)] float64: each the mean over the step's micro-batches
    kind: str  # the micro-batches' kinds, joined with "+"
    images: int  # on this rank (folder sweeps need not hold batch_size images)


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    interrupted: bool  # by a signal
    timed_out: bool = False  # stopped at time_limit_s, before config.steps


def stored_config(out: str | Path) -> TrainConfig | None:
    """The options of the newest checkpoint in run folder ``out``, or None when it holds none."""
    existing = list_checkpoints(Path(out) / "checkpoints")
    if not existing:
        return None
    with _naming_the_one_before(existing):
        return _stored_options(existing[-1], load_state(existing[-1]))


def _stored_options(path: Path, state: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.from_stored(state["config"])
    except (TypeError, ValueError) as err:  # (the error named the option, not the checkpoint)
        # Not a CheckpointError: every checkpoint of the run holds these options, none is a way round it.
        raise ValueError(f"checkpoint state {path / STATE} holds options this version refuses: {err}") from err


@contextlib.contextmanager
def _naming_the_one_before(existing: list[Path]) -> Iterator[None]:
    """A CheckpointError about the newest of ``existing`` (damaged, say) names the one before it too: what a
    resume would start from once that is moved away."""
    try:
        yield
    except CheckpointError as err:
        if len(existing) < 2:
            raise
        raise CheckpointError(
            f"{err}; to resume from the checkpoint before it, {existing[-2].name}, move {existing[-1]} away"
        ) from err


# Longer than a forwarded signal takes to arrive; shorter than a person takes to press Ctrl-C again.
REPEATED_SIGNAL_GRACE_S = 1.0


class Trainer:
    """Trains a DC-IGN as ``config`` says. ``render(kind, generator)`` replaces the built-in renderer."""

    def __init__(self, config: TrainConfig, resume: bool = False, render: Callable | None = None) -> None:
        if not isinstance(resume, bool):  # ("no" would resume)
            raise TypeError(f"resume must be True or False, got {resume!r}")
        if not isinstance(config, TrainConfig):
            raise TypeError(
                f"config must be a TrainConfig (TrainConfig.from_dict or from_yaml make one), "
                f"got {type(config).__name__}"
            )
        config.check()  # (edited since it was made, perhaps)
        if render is not None and not callable(render):
            raise TypeError(f"render must be a function (kind, generator) -> (images, factors), got {render!r}")
        if render is not None and config.data != "render":  # it would be recorded, and a resume would read it
            raise ValueError(f"render= replaces the data source: leave data at 'render', got data={config.data!r}")
        if render is not None and config.identity_contrast:
            raise ValueError(
                "render= cannot be used with identity_contrast, which renders other identities at a sweep's views "
                "with the built-in renderer; set identity_contrast=0"
            )
        self.config = config
        device = resolve_device(config.device)
        # Here, not at the first forward: before the process group, the run folder and the data pool.
        check_backend_runs_on(config.backend, device, supported=EXPLICIT_BACKENDS)
        self.world: World = init_world(device.type)
        self.device = training_device(device, self.world)
        if self.device.type == "cuda":  # (also the device of pin_memory's thread and of synchronize())
            torch.cuda.set_device(self.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        on_gpu = self.device.type == "cuda"
        self.bf16 = on_gpu if config.bf16 is None else config.bf16
        # channels_last by default on the CPU too: oneDNN's convolutions and max pooling run faster in it (a
        # demo64 training step takes 0.58x the time of NCHW's on a 2-core Xeon, the encoder's pooling 0.11x).
        self.memory_format = None if config.channels_last is False else torch.channels_last
        self.out = config.run_folder
        self.checkpoints = self.out / "checkpoints"
        # Found now, not at the first save or picture, after work to lose.
        for folder in (self.out, self.checkpoints, self.out / IMAGES_FOLDER):
            if folder.exists() and not folder.is_dir():
                raise NotADirectoryError(f"out={self.out}: {folder} is a file, where the run keeps a folder")
        for file in (self.out / METRICS_FILE, self.out / LOCK_FILE):
            if file.is_dir():
                raise IsADirectoryError(f"out={self.out}: {file} is a folder, where the run keeps a file")

        # Now, before any work to lose. The lock is held from here to the end of train(): before this trainer
        # reads checkpoints, trims metrics.jsonl or renders data, so a second one on a busy folder changes
        # nothing in it.
        self._folder_lock: contextlib.ExitStack | None = None
        self._claim_run_folder()
        try:
            self._build(config, resume, render)
        except BaseException:
            self._unlock_run_folder()
            raise

    def _build(self, config: TrainConfig, resume: bool, render: Callable | None) -> None:
        """The model, optimizer (restored on resume), data stream and metrics log."""
        # Only the built-in renderer renders on the training device (or the workers' CPU); stored sweeps are read
        # on the CPU, and a render= callable renders wherever it does.
        self._builtin_renderer = render is None and config.data == "render"
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.model = DCIGN.from_preset(config.preset, backend=config.backend).to(self.device)
        if self.memory_format is not None:
            self.model = self.model.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # not in the stubs
        # foreach on the CPU too, where torch would loop over the tensors in Python (it picks foreach for CUDA ones):
        # the same float operations in the same order, so the same weights bit for bit, in 0.8x the time.
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=config.lr, betas=config.betas, eps=config.adam_eps, foreach=True
        )
        self.step = 0
        self._checkpointed_step = 0  # the step of the newest checkpoint (written or restored); 0 before any
        existing = list_checkpoints(self.checkpoints)
        if resume and existing:
            with _naming_the_one_before(existing):
                self._restore(existing[-1])
        elif resume:
            if self.world.is_main:  # once, not once per process
                warnings.warn(
                    f"resume asked, but {self.checkpoints} holds no checkpoint: starting at step 0", stacklevel=2
                )
        elif existing:
            raise FileExistsError(
                f"{self.checkpoints} already holds checkpoints; pass --resume to continue or choose another --out"
            )

        self.net: torch.nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if self.world.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            with ddp_exchanging():  # (its weights are broadcast from rank 0)
                self.net = self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.net = cast(torch.nn.Module, torch.compile(self.net))  # an OptimizedModule (around the DDP one if any)
        kinds, source = None, "render(kind, generator)"
        if render is None:
            render, kinds = default_source(config, self.model.config.image_size, self._data_device)
            source = f"data={config.data}"
        self.stream = BatchStream(
            render, config, rank=self.world.rank, kinds=kinds, show_progress=self.world.is_main, source=source
        )
        self.batches = self._prefetcher()
        self.log = self._open_log()
        self._stop_requested_at: float | None = None  # time.monotonic() of the first Ctrl-C / SIGTERM
        # Of the steps taken since the last read back (see _read_back), on the device: the first whose loss or
        # gradient norm was not finite (-1: none; None: no step unread). One tensor, however many steps.
        self._first_nonfinite: torch.Tensor | None = None
        # The first non-finite step a read found under on_nonfinite=stop: the model in memory may hold its weights
        # (steps between reads are taken unread), so nothing may be saved or trained from it.
        self._nonfinite_at: int | None = None
        self._images_since_log, self._time_since_log = 0, 0.0  # on this rank, for images/s

    def _claim_run_folder(self) -> None:
        """Creates the run folder and takes its lock on the main rank, unless this trainer holds it; when that
        fails (an unwritable out, another process holding the lock), every rank raises."""

        def claim() -> None:
            if not self.world.is_main or self._folder_lock is not None:
                return
            try:
                self.checkpoints.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                why = err.strerror or err
                raise OSError(f"out={self.out}: cannot create the run folder {self.checkpoints} ({why})") from err
            held = contextlib.ExitStack()
            held.enter_context(run_folder_lock(self.out))
            self._folder_lock = held
            recover_checkpoints(self.checkpoints)  # now that no other process saves there (the others wait)

        run_together(claim, self.world)

    def _unlock_run_folder(self) -> None:
        if self._folder_lock is not None:
            self._folder_lock.close()
            self._folder_lock = None

    def _restore(self, path: Path) -> None:
        weights, model_config, state = load_checkpoint(path)
        ranks = state.get("world_size", self.world.size)  # not recorded by earlier versions: nothing to compare
        if ranks != self.world.size:  # each step's sweeps are the shards rank x accumulation + micro-batch
            raise ValueError(
                f"resuming continues the run in {self.out} exactly, but it trained on {ranks} process(es) and "
                f"this resume has {self.world.size}: launch it as it was launched (torchrun --nproc_per_node)"
            )
        stored = _stored_options(path, state)
        if self.config.bf16 is None and stored.bf16 is not None:
            # An unset precision continues the checkpoint's: a run begun on the CPU stays float32 on a GPU.
            self.bf16 = stored.bf16
            stored = dataclasses.replace(stored, bf16=None)
        elif stored.bf16 is None:  # written before checkpoints recorded the precision: nothing to compare
            stored = dataclasses.replace(stored, bf16=self.config.bf16)
        mine = dataclasses.replace(self.config, data=dataset_location(self.config.data))
        stored = dataclasses.replace(stored, data=dataset_location(stored.data))
        changed = mine.differences(stored, ignore=RUN_CONTROLS)
        if changed:
            listing = ", ".join(f"{key}={new!r} (checkpoint: {old!r})" for key, (new, old) in changed.items())
            raise ValueError(
                f"resuming continues the run in {self.out} exactly, but these options differ from its newest "
                f"checkpoint: {listing}. Leave them out to keep the checkpoint's, or start a new run in another out"
            )
        self._warn_of_other_rounding(state.get("execution"))
        # The options agree, so this model is the one trainer.pt describes: the weights must be of it too.
        if model_config != self.model.config:
            raise CheckpointError(f"checkpoint {path}: its weights are not of the model its {STATE} describes")
        load_into(self.model, weights, weights_file(path))
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # (a checkpoint of an earlier version stored foreach=None)
            group["foreach"] = True
        torch.set_rng_state(state["rng"])
        self.step = self._checkpointed_step = int(state["step"])

    def _prefetcher(self) -> Prefetcher:
        """Draws this rank's micro-batches of each step: shards rank * accumulation + micro-batch (see data.py)."""
        c = self.config
        shards = range(self.world.rank * c.accumulation, (self.world.rank + 1) * c.accumulation)
        return Prefetcher(self.stream, shards, c.data_workers, pin_memory=self.device.type == "cuda")

    @property
    def _data_device(self) -> torch.device:
        """Where the built-in data sources render and read: the CPU for worker processes (data_workers > 0)."""
        return torch.device("cpu") if self.config.data_workers else self.device

    def _execution(self) -> dict[str, object]:
        """What, beside the options, sets a step's floating-point rounding: the kind of device (a GPU's model,
        not its index), the ops' backend, the compiler, the memory layout and, on the CPU, the threads (which
        split the CPU kernels' sums)."""
        on_gpu = self.device.type == "cuda"
        execution: dict[str, object] = {
            "device": f"cuda ({torch.cuda.get_device_name(self.device)})" if on_gpu else self.device.type,
            "backend": self.config.backend,
            "compile": self.config.compile,
            "memory_format": "NCHW" if self.memory_format is None else "channels_last",
        }
        if self._builtin_renderer:
            execution["data_device"] = self._data_device.type
        return execution if on_gpu else {**execution, "threads": torch.get_num_threads()}

    def _warn_of_other_rounding(self, stored: dict[str, object] | None) -> None:
        """A warning when this resume runs other than the run so far (its checkpoint's record; None in earlier
        versions): it continues the run, but an uninterrupted run's weights are bit-identical only to a resume
        that runs as it did."""
        if stored is None or not self.world.is_main:
            return
        now = self._execution()
        # What a checkpoint of an earlier version did not record: rendered on its device, and otherwise unknown.
        before = {"data_device": str(stored.get("device", "")).split(" ")[0], **stored}
        changed = [
            f"{key} {value} (before: {before[key]})" for key, value in now.items() if before.get(key, value) != value
        ]
        if changed:
            warnings.warn(
                f"this resume runs with {', '.join(changed)}: the run continues, with other floating-point "
                "rounding, so its weights will not be bit-identical to those of an uninterrupted run",
                stacklevel=5,  # the caller's Trainer(...), through __init__, _build and _restore
            )

    def save(self) -> Path | None:
        """Writes a checkpoint of the current step on rank 0; returns its path there and None on the other ranks.
        Every rank calls it, and every rank raises when the write fails (or NonFiniteLossError, for a step that was
        not read back yet)."""
        if self._nonfinite_at is not None:
            raise self._nonfinite_error(self._nonfinite_at)
        if self._first_nonfinite is not None:
            self._read_back()
        path = run_together(self._write_checkpoint, self.world)
        self._checkpointed_step = self.step
        return path

    @contextlib.contextmanager
    def _keeping_steps_if_it_fails(self, failure: str) -> Iterator[None]:
        """Runs work that every rank took part in (:func:`run_together`'s) between steps; when it fails, saves
        the steps trained since the last checkpoint before its error goes on, says ``failure`` and what was kept.
        A checkpoint that fails too (a full disk) is named, but the first error is the one raised."""
        try:
            yield
        except LostRankError:
            raise  # (a checkpoint is written together: with a rank gone, it cannot be)
        except Exception:
            try:
                kept = self._save_what_was_trained()
            except Exception as err:
                kept = f"saving the steps since the last checkpoint failed too ({type(err).__name__}: {err})"
            self._say(f"{failure}; {kept}")
            raise

    def _save_what_was_trained(self) -> str:
        """A checkpoint of the steps trained since the last one, and what to say of it. None were: a checkpoint of
        step 0 would keep the failed run's folder from a fresh start."""
        if self.step > self._checkpointed_step:
            return f"checkpoint: {self.save()}; mend what failed and continue with --resume"
        since = f"its checkpoint of step {self.step}" if self.step else "the start"
        return f"no step was trained since {since}: nothing was saved"

    def _write_checkpoint(self) -> Path | None:
        if not self.world.is_main:
            return None
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            # The precision in effect (not None), and the folders: the dataset's as an absolute path.
            "config": {
                **self.config.to_dict(),
                "bf16": self.bf16,
                "out": str(self.out),
                "data": dataset_location(self.config.data),
            },
            "world_size": self.world.size,
            "execution": self._execution(),
        }
        return save_checkpoint(
            self.checkpoints,
            self.step,
            self.model.state_dict(),
            self.model.config.to_dict(),
            state,
            keep=self.config.keep_checkpoints,
        )

    def _request_stop(self, signum: int, frame: object) -> None:
        # The first Ctrl-C / SIGTERM finishes the step and saves; another one later, while that is under way,
        # quits at once (the last checkpoint written stays the newest). One stop request often arrives twice:
        # torchrun forwards the signal it gets to workers that got it too (from a terminal's Ctrl-C to the
        # process group, or a scheduler's SIGTERM to every process of the job), so repeats within a grace
        # period are that same request.
        now = time.monotonic()
        if self._stop_requested_at is None:
            self._stop_requested_at = now
        elif now - self._stop_requested_at >= REPEATED_SIGNAL_GRACE_S:
            raise KeyboardInterrupt(f"signal {signum} received again: stopping without a checkpoint")

    def _draw(self, step: int) -> list[tuple[int, torch.Tensor, str]]:
        """This rank's (shard, images, kind) for each micro-batch of ``step``. Every rank calls it, before any of
        the step's work: a data error (a corrupt file, a sweep a source cannot give) then stops every rank at a
        step boundary, where a checkpoint keeps all that was trained."""

        return run_together(lambda: self.batches.draw(step, self.config.steps - 1), self.world)

    def _forward_backward(self, step: int, batches: list[tuple[int, torch.Tensor, str]]) -> StepLosses:
        """Gradients of one optimizer step from its micro-batches (:meth:`_draw`), and its losses, left on the
        device: reading them back every step would stall the GPU's launch queue."""
        c = self.config
        plain = not c.disentangle or step < c.pretrain_steps
        sums: torch.Tensor | None = None
        kinds, images_seen = [], 0
        for micro, (shard, images, kind) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            if self.memory_format is not None:
                images = images.contiguous(memory_format=self.memory_format)
            # All-reduced at the last micro-batch only (the DDP module's no_sync holds under compile's wrapper too).
            unsynced = self.ddp if micro < c.accumulation - 1 else None
            with ddp_exchanging(), contextlib.nullcontext() if unsynced is None else unsynced.no_sync():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    losses = batch_loss(self.net, images, kind, c, latent_seed(c.seed, step, shard), plain)
                (losses["total"] / c.accumulation).backward()
            # In float64 from 0, as Python floats summed them: the logged values stay those of earlier versions.
            values = torch.stack([value.detach() for value in losses.values()]).double() / c.accumulation
            sums = (torch.zeros_like(values) if sums is None else sums) + values
            kinds.append(kind)
            images_seen += len(images)
        assert sums is not None  # (accumulation >= 1)
        return StepLosses(tuple(losses), sums, "+".join(kinds), images_seen)

    def _read_back(self, losses: StepLosses | None = None) -> dict[str, float] | None:
        """Reads, in one host sync, whether the steps since the last read were finite, and ``losses``' values.
        A non-finite step raises NonFiniteLossError under on_nonfinite=stop (before anything of it is written);
        under skip, where every step is read before it is taken, None says to skip it. Every rank calls it."""
        assert self._first_nonfinite is not None  # (called with a step unread)
        first_nonfinite = self._first_nonfinite.double().view(1)
        read = torch.cat([first_nonfinite] if losses is None else [first_nonfinite, losses.values]).tolist()
        self._first_nonfinite = None
        first = earliest_over_ranks(int(read[0]) if read[0] >= 0 else None, self.world)
        if first is not None:
            if self.config.on_nonfinite == "stop":
                self._nonfinite_at = first
                raise self._nonfinite_error(first)
            return None
        return {} if losses is None else dict(zip(losses.names, read[1:]))

    def _nonfinite_error(self, step: int) -> NonFiniteLossError:
        latest = self._latest()
        kept = f"the last good one is {latest}" if latest else "no checkpoint was written yet"
        return NonFiniteLossError(
            f"the loss or its gradient became NaN or infinite at step {step}; stopping without writing a "
            f"checkpoint ({kept}); set on_nonfinite=skip to skip such steps instead"
        )

    def train(self) -> TrainResult:
        """Runs until ``config.steps``; returns where it stopped and the last checkpoint."""
        c = self.config
        if self._nonfinite_at is not None:  # (a notebook calling train() again after a NonFiniteLossError)
            raise self._nonfinite_error(self._nonfinite_at)
        # An earlier train() (a notebook continuing after a time limit or a Ctrl-C) released the folder, closed
        # the log and acted on its signals: this one takes the folder again, reopens the log and starts afresh.
        self._claim_run_folder()
        if self.log.closed:
            self.log = self._open_log()
        self._stop_requested_at = None
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        checkpoint = None
        bar = tqdm(total=c.steps, initial=self.step, disable=not self.world.is_main, desc="train", unit="step")
        deadline = None if c.time_limit_s is None else time.monotonic() + c.time_limit_s
        try:
            self.model.train()
            while self.step < c.steps:
                # images/s counts a step's time up to its bar update, the ranks' agreements below included; the
                # checkpoints, pictures and log lines some steps write are not training time.
                start = time.perf_counter()
                if deadline is not None and all_agree(time.monotonic() > deadline, self.world):
                    reached = f"time limit of {c.time_limit_s:.0f} s reached at step {self.step}"
                    self._say(f"{reached}; continue with --resume")
                    return TrainResult(self.step, self.save() or self._latest(), interrupted=False, timed_out=True)
                if all_agree(self._stop_requested_at is not None, self.world):
                    checkpoint = self.save()
                    self._say(f"interrupted at step {self.step}; checkpoint: {checkpoint}; continue with --resume")
                    return TrainResult(self.step, checkpoint, interrupted=True)
                with self._keeping_steps_if_it_fails(f"the data failed at step {self.step + 1}"):
                    batches = self._draw(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                losses = self._forward_backward(self.step, batches)
                # The gradient norm is checked too: one inf gradient would turn every weight into NaN.
                max_norm = float("inf") if c.grad_clip is None else c.grad_clip
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
                taken = self.step + 1  # numbered as metrics, checkpoints and the bar number it
                # A float64 sum is finite if and only if both are.
                nonfinite = ~torch.isfinite(losses.values[losses.names.index("total")] + norm)
                first = self._first_nonfinite
                if first is None:
                    self._first_nonfinite = torch.where(nonfinite, taken, -1)
                else:
                    self._first_nonfinite = torch.where(nonfinite & (first < 0), taken, first)
                logs = taken % c.log_every == 0 or taken == c.steps
                saves = taken % c.checkpoint_every == 0 or taken == c.steps
                draws = taken % c.image_every == 0
                # Read back before the step is taken where the host must know: to log, save or draw (so that a NaN
                # step is never written), or to skip it. A NaN step in between is found at the next read.
                metrics = None
                if logs or saves or draws or c.on_nonfinite == "skip":
                    metrics = self._read_back(losses if logs else None)
                if metrics is None and c.on_nonfinite == "skip":
                    self.optimizer.zero_grad(set_to_none=True)
                    self._say(f"skipped step {taken}: non-finite loss or gradient")
                else:
                    self.optimizer.step()
                    self._images_since_log += losses.images
                self.step += 1
                bar.update(1)
                self._time_since_log += time.perf_counter() - start  # (a skipped step's too: it took the time)
                if logs and metrics is not None:
                    # Over the steps since the last line: the steps between read nothing back (on a GPU their own
                    # time would be the launches'), and all their work is done by this step's read.
                    rate = self._images_since_log * self.world.size / self._time_since_log
                    self._images_since_log, self._time_since_log = 0, 0.0
                    # every rank's losses, averaged (the same call on every rank: same steps)
                    averaged = mean_over_ranks({**metrics, "kind": losses.kind}, self.world)
                    bar.set_postfix(loss=f"{averaged['total']:.1f}", img_s=f"{rate:.0f}")
                    record = {"step": self.step, **averaged, "images_per_s": rate}
                    failed = f"the metrics log failed at step {self.step} (its line will not be written again)"
                    with self._keeping_steps_if_it_fails(failed):
                        run_together(functools.partial(self.log.write, record), self.world)
                if saves:
                    checkpoint = self.save()  # before the pictures, which may fail (disk full, say)
                if draws:
                    failed = f"the progress pictures failed at step {self.step} (they will not be drawn again)"
                    with self._keeping_steps_if_it_fails(failed):
                        run_together(self._save_progress_images, self.world)
            return TrainResult(self.step, checkpoint or self._latest(), interrupted=False)
        finally:
            # Each runs, even if one before it raises; last registered, first run.
            with contextlib.ExitStack() as cleanup:
                cleanup.callback(self._unlock_run_folder)
                for s, handler in previous.items():
                    cleanup.callback(signal.signal, s, handler)
                cleanup.callback(self.log.close)
                cleanup.callback(bar.close)
                cleanup.callback(self.batches.close)

    def _open_log(self) -> MetricsLog:
        """The metrics log, which rank 0 writes (a no-op object on the others)."""
        return run_together(lambda: MetricsLog(self.out, enabled=self.world.is_main, resume_step=self.step), self.world)

    def _save_progress_images(self) -> None:
        if self.world.is_main:
            save_progress_images(self.model, self.stream, self.out / IMAGES_FOLDER, self.step, self.device)

    def _say(self, text: str) -> None:
        """Prints ``text`` above the progress bar, on the main rank only (the others hold no bar, and would
        print it once more each; their save() returns no checkpoint to name)."""
        if self.world.is_main:
            tqdm.write(text)

    def _latest(self) -> Path | None:
        existing = list_checkpoints(self.checkpoints)
        return existing[-1] if existing else None

    def close(self, together: bool = True) -> None:
        """Releases the run folder and leaves the process group (see close_world); ``together=False`` after an
        error on this rank alone."""
        self._unlock_run_folder()
        close_world(self.world, together)
