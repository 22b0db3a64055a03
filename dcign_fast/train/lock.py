"""One training process per run folder: two writing the same ``<out>`` would interleave their checkpoints and
logs, and a second one starting would trim the first's metrics."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

LOCK_FILE = ".lock"
# Folders this process holds: (the open lock file, how many holders). Trainers that one process builds on one
# folder share its lock (they run one after another), where a lock per trainer would refuse the second.
_HELD: dict[Path, tuple[IO[Any], int]] = {}


def _let_go_in_a_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file, and an flock lasts until every copy is
    closed: a trainer killed with its workers still winding down left its folder locked for seconds. Closing the
    child's copy (not unlocking it, which would unlock the parent's) leaves the lock to the parent alone."""
    for handle, _ in _HELD.values():
        handle.close()
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # (not on Windows, where nothing is locked)
    os.register_at_fork(after_in_child=_let_go_in_a_child)


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``out/.lock`` (POSIX ``flock``) inside the block: a BlockingIOError naming
    the folder when another process holds it. Re-entrant within this process. The lock goes with the process,
    so a killed run never leaves the folder locked. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    key = Path(out).resolve()
    if key not in _HELD:
        handle: IO[Any] = open(key / LOCK_FILE, "a")  # noqa: SIM115 (held open past this call, closed on release)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise BlockingIOError(
                f"out={out}: another trainer is writing this run folder (it holds {out / LOCK_FILE}); wait for it "
                "to finish or choose another --out"
            ) from None
        _HELD[key] = (handle, 0)
    handle, holders = _HELD[key]
    _HELD[key] = (handle, holders + 1)
    try:
        yield
    finally:
        # Not held: a forked child leaving the block (its copy was closed at the fork; the lock is the parent's).
        held = _HELD.pop(key, None)
        if held is not None and held[1] > 1:
            _HELD[key] = (held[0], held[1] - 1)
        elif held is not None:
            fcntl.flock(held[0], fcntl.LOCK_UN)
            held[0].close()
