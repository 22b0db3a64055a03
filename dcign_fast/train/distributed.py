"""Many processes: torchrun's environment -> a process group (NCCL on GPUs, gloo on CPUs)."""

from __future__ import annotations

import atexit
import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Where gloo's errors about a connection come from (its source path leads their message: "[.../gloo/transport/
# tcp/pair.cc:537] Read error ...: Connection reset by peer").
_GLOO_TRANSPORT = "gloo/transport/"


class OtherRankError(RuntimeError):
    """Raised on every other rank when a step that all ranks take together failed on one rank (which reports
    the cause itself): the others stop with it instead of waiting for that rank in their next collective."""


class LostRankError(OtherRankError):
    """Another rank could not be reached (it died, or was killed): nothing more can be done together."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    # The group the ranks exchange flags, errors and log values through: gloo, on CPU tensors (None: the default
    # group, gloo already). Through NCCL each exchange would queue behind the step's kernels on the GPU and be
    # read back: a host sync per step, which keeps the host from queueing the next step while the GPU works.
    control: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_type: str) -> World:
    """Joins the process group torchrun describes (WORLD_SIZE > 1); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        # Left at exit (a constructor's error, a Ctrl-C or torchrun's SIGTERM before close_world), gloo's
        # threads outlive the interpreter: "terminate called without an active exception", status 134.
        atexit.register(_leave_at_exit)
    control = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    # The GPU each rank takes, and makes current, is training_device's to say.
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        control=control,
    )


def training_device(requested: torch.device, world: World) -> torch.device:
    """The device this process trains on: under torchrun, a GPU rank takes its own (LOCAL_RANK's); alone, the one
    asked for (``cuda`` alone: the current one). (Alone, ``cuda:1`` used to train on cuda:0 without a word.)"""
    if requested.type != "cuda":
        return requested
    if world.distributed:
        return torch.device("cuda", world.local_rank)
    return requested if requested.index is not None else torch.device("cuda", torch.cuda.current_device())


def close_world(world: World, together: bool = True) -> None:
    """Leaves the process group; ``together`` (every rank got here normally) first waits for the others: a
    rank that tore its group down while another still wrote the last checkpoint could abort (gloo:
    "terminate called without an active exception"). After an error on one rank, waiting could hang."""
    if world.distributed and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def _leave_at_exit() -> None:
    """Destroys the process group init_world joined if the run left without close_world (upstream: a live gloo
    group at exit, pytorch/pytorch#190489)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _exchange(collective: Callable[..., object], *args: object, **kwargs: object) -> None:
    """``collective(*args, **kwargs)``, a torch.distributed call, with its failure to reach the other ranks
    (gloo: a plain RuntimeError, "Connection closed by peer", when one was killed) raised as a LostRankError
    in one line: the survivor's traceback through gloo's sources said no more, and the rank that stopped (or
    torchrun) reports why. (The exchanges hold CPU tensors, World.control's: no device fault of this rank's can
    surface in them.)"""
    try:
        collective(*args, **kwargs)
    except RuntimeError as err:
        raise _lost_contact(err) from err


def _lost_contact(err: RuntimeError) -> LostRankError:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return LostRankError(
        f"the ranks could not exchange their state ({first_line}): another rank has probably stopped (its "
        "output says why); the newest checkpoint stands, continue with --resume"
    )


@contextlib.contextmanager
def ddp_exchanging() -> Iterator[None]:
    """Around the exchanges DDP runs inside torch's own calls: its constructor's broadcast of the weights, and a
    step's forward and backward, whose all-reduce of the gradients runs inside backward (a rank that died there
    left the survivor gloo's 30-line traceback out of ``.backward()``). Gloo's failure to reach another rank is
    raised as the exchanges' one-line LostRankError; any other error (this rank's own: a shape, out of memory)
    passes unchanged, which is why the error's origin is checked, not just its type."""
    try:
        yield
    except RuntimeError as err:
        if not (isinstance(err, dist.DistNetworkError) or _GLOO_TRANSPORT in str(err)):
            raise
        raise _lost_contact(err) from err


def mean_over_ranks(values: Mapping[str, float | str], world: World) -> dict[str, float | str]:
    """``values`` with each float replaced by its mean over the ranks and each string by the ranks' strings
    joined with "+" in rank order, as one process accumulating their sweeps logs its batch kinds (every rank
    must call this)."""
    if not world.distributed:
        return dict(values)
    names = [k for k, v in values.items() if isinstance(v, float)]
    t = torch.tensor([values[k] for k in names], dtype=torch.float64)
    _exchange(dist.all_reduce, t, group=world.control)
    texts = {k: v for k, v in values.items() if isinstance(v, str)}
    gathered: list[dict[str, str] | None] = [None] * world.size
    _exchange(dist.all_gather_object, gathered, texts, group=world.control)
    joined = {k: "+".join(str(g[k]) for g in gathered if g is not None) for k in texts}
    return {**values, **dict(zip(names, (t / world.size).tolist())), **joined}


def all_agree(flag: bool, world: World) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a Ctrl-C or a NaN seen by one rank)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    _exchange(dist.all_reduce, t, op=dist.ReduceOp.MAX, group=world.control)
    return bool(t.item() > 0)


def earliest_over_ranks(step: int | None, world: World) -> int | None:
    """The smallest of the ranks' ``step``s, None where a rank has none; None when no rank has one. (A NaN
    found by some ranks is named by the first step any rank saw it at, on every rank.)"""
    if not world.distributed:
        return step
    t = torch.tensor([math.inf if step is None else float(step)], dtype=torch.float64)
    _exchange(dist.all_reduce, t, op=dist.ReduceOp.MIN, group=world.control)
    return None if math.isinf(t.item()) else int(t.item())


def run_together(action: Callable[[], T], world: World) -> T:
    """``action()`` on this rank; when it fails on any rank, every rank raises (the failed ones their own error,
    the others an OtherRankError quoting it). For the work one rank does alone (rank 0 writes checkpoints,
    logs and pictures): a rank stopped by it would otherwise leave the others in their next collective (gloo:
    a traceback about a closed connection; NCCL: a hang). Every rank must call this."""
    error: Exception | None = None
    try:
        result = action()
    except Exception as err:
        if not world.distributed:
            raise
        error = err
    if all_agree(error is not None, world):
        reports: list[str | None] = [None] * world.size
        report = None if error is None else f"{type(error).__name__}: {error}"
        _exchange(dist.all_gather_object, reports, report, group=world.control)
        if error is not None:
            raise error
        rank, report = next((r, text) for r, text in enumerate(reports) if text is not None)
        raise OtherRankError(f"rank {rank} stopped the run: {report}")
    return result
