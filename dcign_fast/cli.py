"""The ``dcign-fast`` command line.

Each subcommand lives beside what it drives, in a module with ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them. ``--help`` takes the seconds torch takes to import: any
``dcign_fast`` module first imports the package, whose ``__init__`` imports torch (for models, nn and ops), and
building the parser imports each subcommand's module for its arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("dcign_fast.info", "what this installation can run (versions, devices, Triton, the CUDA extension)"),
    "render": ("dcign_fast.data.cli", "render one-factor face sweeps to PNG folders or a cache, or a preview grid"),
    "demo": (
        "dcign_fast.demo",
        "train demo64 on the built-in renderer, then re-render and evaluate (3.5-10 min on 2 CPU cores)",
    ),
    "train": ("dcign_fast.train.cli", "train a DC-IGN (one GPU, torchrun for many, or the CPU)"),
    "eval": ("dcign_fast.eval.eval_cli", "disentanglement metrics of a checkpoint on held-out renders"),
    "rerender": ("dcign_fast.eval.rerender_cli", "re-render an image along azimuth, elevation and light sweeps"),
}


DEBUG_ENV = "DCIGN_FAST_DEBUG"


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the command was given something it cannot use": reported in one line, not a
    traceback. Not RuntimeError at large: out-of-memory, compiler and internal errors keep theirs."""
    from dcign_fast.train.checkpoint import CheckpointError
    from dcign_fast.train.distributed import OtherRankError  # the failed rank reports the cause

    return ValueError, TypeError, OSError, CheckpointError, OtherRankError


def run_failures() -> tuple[type[BaseException], ...]:
    """Errors of a run that started and could not go on (exit status 1, in one line): its message says what
    to change, a traceback would not."""
    from dcign_fast.train.prefetch import DataWorkerError
    from dcign_fast.train.trainer import NonFiniteLossError

    return NonFiniteLossError, DataWorkerError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def run_folder(text: str) -> Path:
    """argparse type: a folder to write into, not empty text (Path("") would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a folder, got {text!r}")
    return Path(text)


def image_file(text: str) -> Path:
    """argparse type: a path to write a picture to, whose extension names a format PIL writes (.png, .jpg...)."""
    from dcign_fast.eval.grid import image_file_problem

    if problem := image_file_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


def add_device_argument(
    parser: argparse.ArgumentParser, what: str = "run the model", default: str | None = "auto"
) -> None:
    """``--device``, "auto" by default (None: the option is left to a config file or a resumed run, whose own
    default is "auto" too). Commands resolve it by train's rules (dcign_fast.devices.resolve_device)."""
    parser.add_argument(
        "--device",
        default=default,
        help=f"where to {what}: auto (a CUDA GPU when there is one, else the CPU; the default), cpu, cuda or cuda:N",
    )


def debugging() -> bool:
    """Whether $DCIGN_FAST_DEBUG asks for tracebacks: set, and not "", 0, false, no or off."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def run_reporting_errors(prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)``; a user error is printed as ``prog: error: ...`` with exit status 2, a training run's
    non-finite loss or dead data worker so with status 1, and Ctrl-C or SIGTERM outside training (which saves a
    checkpoint and returns 130 itself) as ``prog: interrupted`` with status 130 (tracebacks too when
    :func:`debugging`). Warnings print as ``prog: warning: ...``, without a source line."""
    formatwarning = warnings.formatwarning
    if not debugging():  # a warning as one line under the command's name, not with the library's source line
        warnings.formatwarning = lambda message, *_, **__: f"{prog}: warning: {message}\n"
    # SIGTERM's default action ends the process without a word (a scheduler's stop while the demo renders).
    on_sigterm = signal.getsignal(signal.SIGTERM)
    in_main_thread = threading.current_thread() is threading.main_thread()  # (signal.signal's condition)
    if in_main_thread and on_sigterm == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(args)
    except user_errors() as err:
        if debugging():
            raise
        print(f"{prog}: error: {err} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
    except run_failures() as err:
        if debugging():
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        if debugging():
            raise
        print(f"{prog}: interrupted" + (f" ({err})" if str(err) else ""), file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
        if in_main_thread and on_sigterm == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, on_sigterm)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name} received")


def build_parser() -> argparse.ArgumentParser:
    from dcign_fast import __version__

    parser = argparse.ArgumentParser(prog="dcign-fast", description="Fast DC-IGN: train, render, evaluate.")
    parser.add_argument("--version", action="version", version=f"dcign-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(f"dcign-fast {args.command}", args.run, args)


if __name__ == "__main__":
    sys.exit(main())
