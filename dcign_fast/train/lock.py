"""One trainer per run folder: two writing the same ``<out>`` would interleave their checkpoints and logs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``out/.lock`` (POSIX ``flock``) inside the block; a BlockingIOError naming
    the folder when another process (or another trainer here) holds it. The lock goes with the process, so a
    killed run never leaves the folder locked. Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(
                f"out={out}: another trainer is writing this run folder (it holds {out / LOCK_FILE}); wait for it "
                "to finish or choose another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
