"""Runs benchmark suites and writes their results.

    python -m benchmarks.run --suite ops --device cpu [--quick] [--out benchmarks/results]

Each suite (benchmarks/suites/<name>.py) yields rows; this writes one JSON file per suite naming the
machine, versions, commit and date (rewritten after every row, so a suite cut short keeps its rows) and prints
the rows as a table.
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


def header(suite: str, info: dict[str, object]) -> str:
    """The printed table's title: suite, machine, code and date."""
    measured = f"torch {info['torch']}, {code_label(info)}, {info['cpu_threads']} threads, {info['date']}"
    return f"## suite {suite} on {machine_label(info)} ({measured})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="ops")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder for the JSON files")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is available")
    names = list(SUITES) if args.suite == "all" else [args.suite]
    for name in names:
        info = machine(args.device)  # per suite: its own date
        rows: list[dict] = []
        path = write_results(name, info, rows, args.out)
        # Rewritten after every row: a suite stopped by a time limit keeps what it measured.
        for row in importlib.import_module(SUITES[name]).run(args.device, args.quick):
            rows.append(row)
            write_results(name, info, rows, args.out)
        columns = [c for c in COLUMNS if any(c in row for row in rows)]
        print(f"\n{header(name, info)}")
        print(format_table(rows, columns))
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
