"""Timing, machine description and result files shared by every benchmark suite.

Times are medians of repeats after warm-up. Competing variants of one case are timed side by side,
interleaved repeat by repeat, so drift of the machine (clocks, other load) hits them all alike.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

import dcign_fast
from dcign_fast.kernels.unpool_conv_common import cudnn_allows_tf32

# Every field a suite's rows may have, in the order tables show them.
COLUMNS = [
    "case",
    "pass",
    "dtype",
    "layout",
    "backend",
    "median_ms",
    "host_ms",
    "graph_ms",
    "graph_speedup",
    "images_per_s",
    "speedup",
    "floor_ms",
    "over_floor",
    "peak_mb",
    "kernel",
    "kernel_ms",
    "share",
    "calls",
    "note",
]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Step:
    """A timed call that leaves state behind (gradients), and ``clear``, which drops it: peak_memory_mb clears
    first, since a step that frees the previous step's gradients before making its own would otherwise be
    measured from a base that still holds them, understating its peak by their size."""

    call: Callable[[], object]
    clear: Callable[[], None]

    def __call__(self) -> object:
        return self.call()


def time_side_by_side(
    variants: Mapping[str, Callable[[], object]],
    device: str,
    warmup: int = 2,
    repeats: int = 7,
    host_ms: dict[str, float] | None = None,
) -> dict[str, float]:
    """Median wall time in milliseconds of each variant; variants alternate within every repeat.

    ``host_ms``, when given, receives each variant's median host time: from the call to its return, before
    the device has finished. On CUDA, where kernels run asynchronously, that is what the Python side and the
    launches cost; a wall time near it means the step waits on the host, not on the GPU.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    host_samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            host_samples[name].append((time.perf_counter() - start) * 1e3)
            synchronize(device)
            samples[name].append((time.perf_counter() - start) * 1e3)
    if host_ms is not None:
        host_ms.update({name: statistics.median(times) for name, times in host_samples.items()})
    return {name: statistics.median(times) for name, times in samples.items()}


BUDGET_SPENT = "compile: budget spent"


class CompileBudget:
    """Seconds a suite may spend compiling (torch.compile with max-autotune can take minutes per graph).

    ``DCIGN_BENCH_COMPILE_S`` sets the budget (default 100; 0 skips compiled variants). Suites list their
    cases in order of importance, so the budget goes to the cases that matter most.
    """

    def __init__(self, seconds: float | None = None) -> None:
        self.left = float(os.environ.get("DCIGN_BENCH_COMPILE_S", "100")) if seconds is None else seconds

    @property
    def spent(self) -> bool:
        return self.left <= 0

    def spent_row(self, row: dict, backend: str) -> dict:
        """``row`` for a compiled variant left out because the budget is spent (nothing is timed for it)."""
        return {**row, "backend": backend, "note": BUDGET_SPENT}

    def spend(self, device: str, *warm_ups: Callable[[], object]) -> bool:
        """Runs the ``warm_ups`` (which compile) if budget is left, charging their time, also when one raises;
        False if none was left."""
        if self.spent:
            return False
        start = time.perf_counter()
        try:
            for warm_up in warm_ups:
                warm_up()
            synchronize(device)
        finally:
            self.left -= time.perf_counter() - start
        return True


def cuda_graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` recorded once into a CUDA graph; the returned callable replays it: the GPU's time for ``fn`` with
    no host work between its kernels (the host-bound layers' wall time says nothing of their kernels). Run
    once on a side stream first, as capture requires; ``fn`` must have been warmed up (autotuned, compiled)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    before = torch.cuda.current_stream()
    before.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:
        # A failed capture leaves its stream current (torch.cuda.graph ends the capture, which raises, before
        # it restores the stream), and that error hides the one that broke the capture.
        torch.cuda.set_stream(before)
        cause = err.__context__ if isinstance(err.__context__, Exception) else err
        raise RuntimeError(f"{type(cause).__name__}: {cause}") from err
    return graph.replay


def _replay_times(
    variants: Mapping[str, Callable[[], object]], device: str, baseline: str, repeats: int
) -> dict[str, dict[str, object]]:
    """Per variant: graph_ms (median time of its CUDA graph's replay, all replays timed side by side) and
    graph_speedup over ``baseline``'s, or a note saying why it could not be recorded."""
    replays: dict[str, Callable[[], None]] = {}
    stats: dict[str, dict[str, object]] = {}
    for name, fn in variants.items():
        try:
            replays[name] = cuda_graph_replay(fn)
        except Exception as err:  # e.g. an op that synchronises: its eager rows still stand
            stats[name] = {"note": f"no CUDA graph: {type(err).__name__}: {str(err).splitlines()[0][:80]}"}
    times = time_side_by_side(replays, device, warmup=1, repeats=repeats)
    for name, ms in times.items():
        stats[name] = {"graph_ms": ms}
        if baseline in times:
            stats[name]["graph_speedup"] = times[baseline] / ms
    return stats


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Peak CUDA memory allocated while running ``fn`` once, above what was allocated before (None on CPU).
    A :class:`Step` is cleared first."""
    if not device.startswith("cuda"):
        return None
    if isinstance(fn, Step):
        fn.clear()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def compare(
    variants: Mapping[str, Callable[[], object]],
    device: str,
    row: dict,
    baseline: str,
    warmup: int = 2,
    repeats: int = 7,
    budget: CompileBudget | None = None,
    graphed: tuple[str, ...] = (),
    replay: bool = False,
) -> list[dict]:
    """One row per variant of a case: ``row``'s fields, then median_ms, host_ms (CUDA; see
    :func:`time_side_by_side`), speedup over ``baseline`` and peak memory, or a note saying why the variant was
    left out.

    ``graphed`` names variants that replay CUDA graphs (torch.compile's "reduce-overhead" and "max-autotune"):
    a replay allocates nothing, its memory was set aside when the graph was recorded, so no peak is reported.
    ``replay`` (CUDA) also records each other variant into a CUDA graph and times the replays side by side:
    graph_ms and graph_speedup (see :func:`cuda_graph_replay`), measured after the eager rows.

    Each variant first runs its ``warmup`` calls (at least one), where an error is caught: a variant whose
    name contains "compile" compiles then (and records its CUDA graphs, for mode="reduce-overhead"), charged
    to ``budget`` (if given); a variant that raises (e.g. torch.compile without a C++ compiler) is noted.
    """
    ready, notes = {}, {}
    for name, fn in variants.items():
        warm_ups = [fn] * max(1, warmup)
        try:
            if budget is not None and "compile" in name:
                if not budget.spend(device, *warm_ups):
                    notes[name] = BUDGET_SPENT
                    continue
            else:
                for warm_up in warm_ups:
                    warm_up()
        except Exception as err:  # a variant that cannot run is reported, never fatal to the suite
            notes[name] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
            continue
        ready[name] = fn
    host: dict[str, float] = {}
    times = time_side_by_side(ready, device, warmup=0, repeats=repeats, host_ms=host)
    replayed: dict[str, dict[str, object]] = {}
    if replay and device.startswith("cuda"):
        eager = {name: fn for name, fn in ready.items() if name not in graphed}
        replayed = _replay_times(eager, device, baseline, repeats)
    rows = []
    for name in [*ready, *notes]:
        if name in times:
            # No speedups when the baseline itself could not run (its row says why).
            stats: dict[str, object] = {"median_ms": times[name]}
            if device.startswith("cuda"):  # on the CPU the host time is the wall time
                stats["host_ms"] = host[name]
            if baseline in times:
                stats["speedup"] = times[baseline] / times[name]
            stats.update(replayed.get(name, {}))
            if name in graphed and device.startswith("cuda"):
                stats["note"] = "peak memory not measurable: CUDA graph replays allocate nothing"
            else:
                stats["peak_mb"] = peak_memory_mb(ready[name], device)
            rows.append({**row, "backend": name, **stats})
        else:
            rows.append({**row, "backend": name, "note": notes[name]})
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PACKAGE_DIR = Path(dcign_fast.__file__).resolve().parent


def _git(folder: Path, *args: str) -> str | None:
    """``git -C folder args``' output, or None where git is missing or fails (not a checkout)."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def source_commit(package_dir: Path = PACKAGE_DIR) -> tuple[str | None, bool | None]:
    """The short git hash of the dcign-fast checkout measured and whether its tracked files had uncommitted
    changes, or (None, None) when the package does not run from its own checkout: results taken with
    different code must say so.

    The checkout must be the package's own (its top level the package's parent): a copy installed into a
    virtual environment inside some other repository would otherwise report that repository's commit.
    Untracked files do not count as changes: the result files a run writes are untracked.
    """
    described = _git(package_dir, "rev-parse", "--show-toplevel", "--short", "HEAD")
    lines = described.splitlines() if described else []
    if len(lines) != 2 or Path(lines[0]).resolve() != package_dir.parent.resolve():
        return None, None
    changes = _git(package_dir.parent, "status", "--porcelain", "--untracked-files=no")
    dirty = None if changes is None else bool(changes.strip())
    return lines[1], dirty


def machine(device: str, quick: bool = False) -> dict[str, object]:
    """What the numbers were measured on, with which code, and whether in a quick (smoke) run: small shapes
    and few repeats, whose times are noise."""
    commit, dirty = source_commit()
    info: dict[str, object] = {
        "device": device,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dcign_fast": dcign_fast.__version__,
        "commit": commit,
        "dirty": dirty,
        "quick": quick,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["card"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        # float32 convolutions (cuDNN's, and the triton and cuda backends') run in TF32 when this is set.
        info["cudnn_allow_tf32"] = cudnn_allows_tf32()
    return info


def machine_label(info: dict[str, object]) -> str:
    return str(info.get("card") or info["cpu"])


def code_label(info: dict[str, object]) -> str:
    """The code a run measured, as far as its machine block recorded it: result files written before
    2026-11-28T21:40Z recorded neither version nor commit."""
    if "dcign_fast" not in info:
        return "dcign-fast version and commit not recorded"
    if not info.get("commit"):
        return f"dcign-fast {info['dcign_fast']} at an unknown commit (not run from its git checkout)"
    changes = " with uncommitted changes" if info.get("dirty") else ""
    return f"dcign-fast {info['dcign_fast']} at {info['commit']}{changes}"


def is_quick(info: dict[str, object]) -> bool:
    """Whether a run was a quick (smoke) run; files written before the flag existed were full runs."""
    return bool(info.get("quick"))


def write_results(suite: str, info: dict[str, object], rows: list[dict], out_dir: Path, finished: bool = False) -> Path:
    """One JSON file per run: ``<suite>-<device>-<date>.json`` holding the machine, every row so far and whether
    the suite finished (a run stopped by a time limit keeps its rows, and the report says they stop short)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = str(info["date"]).replace(":", "").replace("-", "")
    path = out_dir / f"{suite}-{info['device']}-{stamp}.json"
    partial = path.with_suffix(".json.partial")
    record = {"suite": suite, "machine": info, "rows": rows, "finished": finished}
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)  # atomic: a run killed mid-write leaves the previous version
    return path


def format_cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``columns`` (missing values shown as '-')."""
    table = [columns] + [[format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
