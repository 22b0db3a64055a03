"""Runs benchmark suites and writes their results.

    python -m benchmarks.run --suite ops --device cpu [--quick] [--out FOLDER]

Each suite (benchmarks/suites/<name>.py) yields rows; this writes one JSON file per suite naming the
machine, versions, commit and date (rewritten after every row, so a suite cut short keeps its rows) and
prints the rows as a table.

Measurements go to benchmarks/results/, which benchmarks.report reads. A --quick run (small shapes, two
repeats: a smoke test that the suites run, its times are noise) goes to benchmarks/results-quick/ instead,
a folder git ignores, and says it is quick in its JSON and its table, so it is never taken for a
measurement.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from benchmarks.harness import COLUMNS, code_label, format_table, machine, machine_label, write_results

SUITES = {
    "ops": "benchmarks.suites.ops",
    "latent": "benchmarks.suites.latent_sampler",
    "render": "benchmarks.suites.render",
    "train": "benchmarks.suites.train",
    "patch": "benchmarks.suites.patch",
    "kernels": "benchmarks.suites.kernels",
}
RESULTS = Path("benchmarks/results")
QUICK_RESULTS = Path("benchmarks/results-quick")


def output_folder(out: Path | None, quick: bool) -> Path:
    """--out if given, else the measurements' folder, or for a quick run a folder of its own: smoke runs in
    benchmarks/results would be committed and reported beside the measurements."""
    if out is not None:
        return out
    if not quick:
        return RESULTS
    QUICK_RESULTS.mkdir(parents=True, exist_ok=True)
    # As a virtual environment does: the folder ignores itself, with no entry in the project's .gitignore.
    (QUICK_RESULTS / ".gitignore").write_text("# written by benchmarks.run: quick runs are not measurements\n*\n")
    return QUICK_RESULTS


def header(suite: str, info: dict[str, object]) -> str:
    """The printed table's title: suite, machine, code and date, and a warning for a quick run."""
    measured = f"torch {info['torch']}, {code_label(info)}, {info['cpu_threads']} threads, {info['date']}"
    title = f"## suite {suite} on {machine_label(info)} ({measured})"
    if info.get("quick"):
        title += "\n## QUICK SMOKE RUN (--quick: small shapes, few repeats): the times are noise, not measurements"
    return title


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="ops")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI smoke run)")
    parser.add_argument(
        "--out", type=Path, help=f"folder for the JSON files (default {RESULTS}; with --quick {QUICK_RESULTS})"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is available")
    out = output_folder(args.out, args.quick)
    names = list(SUITES) if args.suite == "all" else [args.suite]
    for name in names:
        info = machine(args.device, quick=args.quick)  # per suite: its own date
        rows: list[dict] = []
        path = write_results(name, info, rows, out)
        # Rewritten after every row: a suite stopped by a time limit keeps what it measured.
        for row in importlib.import_module(SUITES[name]).run(args.device, args.quick):
            rows.append(row)
            write_results(name, info, rows, out)
        write_results(name, info, rows, out, finished=True)
        columns = [c for c in COLUMNS if any(c in row for row in rows)]
        print(f"\n{header(name, info)}")
        print(format_table(rows, columns))
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
