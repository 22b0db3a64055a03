"""``dcign-fast train`` and ``python -m dcign_fast.train`` (also under torchrun for many GPUs)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dcign_fast.cli import add_device_argument, positive_int
from dcign_fast.train.config import TrainConfig

if TYPE_CHECKING:
    from dcign_fast.train.trainer import Trainer, TrainResult

TIMED_OUT = 75  # sysexits' EX_TEMPFAIL: not finished, try again (--resume); a job loop can tell it from done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="demo64, face128 or paper150 (default demo64)")
    parser.add_argument(
        "--out", help="run folder: checkpoints, metrics.jsonl, images/ (default runs/<preset>, e.g. runs/demo64)"
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        help=f"total optimizer steps (default {TrainConfig.steps}; a resumed run: its own)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in the run folder (--out, or runs/<preset> of the --preset given)",
    )
    add_device_argument(parser, "train", default=None)
    parser.add_argument("--config", type=Path, help="a YAML file of training options")
    add_set_argument(parser, TrainConfig())


def add_set_argument(parser: argparse.ArgumentParser, defaults: TrainConfig, omit: tuple[str, ...] = ()) -> None:
    """``--set KEY=VALUE`` (repeatable), with every option but those in ``omit``, its value in ``defaults`` and
    its help listed under the help."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any option (repeatable)"
    )
    values = defaults.to_dict()
    lines = [
        f"  {f.name} = {_yaml_text(values[f.name])}: {f.metadata['help']}"
        for f in dataclasses.fields(defaults)
        if f.name not in omit
    ]
    parser.epilog = "options for --set, as key = default: meaning (also the keys of train's --config files):\n" + (
        "\n".join(lines)
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # one option a line, as listed


def _yaml_text(value: object) -> str:
    """``value`` as --set and YAML files write it: null, true, [0.9, 0.99], {}."""
    text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True)
    return text.removesuffix("...\n").strip()  # (a scalar's document ends with "...")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's options: --config's, then --preset/--out/--steps, then each --set; when none of them gives an
    out, the run folder is runs/<preset> (the preset they end with). With --resume they apply on top of the
    newest checkpoint's options in that folder (the trainer refuses changes that alter the results)."""
    values = TrainConfig.read_yaml(args.config) if args.config else {}
    given = ("preset", "out", "steps", "device")
    values.update({key: getattr(args, key) for key in given if getattr(args, key) is not None})
    values.update(TrainConfig.parse_assignments(args.set))
    return resolve_options(TrainConfig(), values, args.resume)


def resolve_options(defaults: TrainConfig, values: dict[str, object], resume: bool) -> TrainConfig:
    """``defaults`` with the options a user gave (``values``); with ``resume``, the newest checkpoint's options
    in the resulting run folder (``out``, or runs/<preset>) take the defaults' place (the trainer refuses changes
    that alter results), but for time_limit_s, which each launch gives for itself."""
    from dcign_fast.train.trainer import stored_config

    config = defaults.updated(values)
    stored = stored_config(config.run_folder) if resume else None
    if stored is None:
        return config
    # The folder read, named outright: the checkpoint's out (or its preset's default) may name another. A time
    # limit is the launch's own (its job's length), not the run's: a stored 0 had every resume stop at once.
    return stored.updated({"time_limit_s": None, **values, "out": str(config.run_folder)})


def run_training(config: TrainConfig, resume: bool) -> tuple[int, Trainer, TrainResult]:
    """Trains with the command line's exit codes: 0 done, 75 (EX_TEMPFAIL) stopped at time_limit_s (0 under
    torchrun) and 130 interrupted (a checkpoint was saved: relaunch with --resume). Returns (exit code, trainer,
    result). A non-finite loss raises NonFiniteLossError once the trainer has let go of the run folder (the
    command line reports it with status 1)."""
    from dcign_fast.train.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(config, resume=resume)
    if trainer.step >= config.steps and trainer.world.is_main:  # a finished run resumed: say so, not just "step N"
        print(
            f"the run in {config.run_folder} is already at step {trainer.step} >= steps {config.steps}: nothing was "
            "trained (raise --steps to continue it)",
            file=sys.stderr,
        )
    try:
        result = trainer.train()
    except NonFiniteLossError:  # every rank stops at the same step
        trainer.close()
        raise
    except BaseException:
        trainer.close(together=False)
        raise
    trainer.close()
    # Not under torchrun: it counts any other status as a failure (and may restart the workers at once).
    timed_out = result.timed_out and not trainer.world.distributed
    return (130 if result.interrupted else TIMED_OUT if timed_out else 0), trainer, result


def run(args: argparse.Namespace) -> int:
    code, trainer, result = run_training(config_from_args(args), args.resume)
    if trainer.world.is_main:
        print(f"step {result.step}; last checkpoint: {result.checkpoint}")
    return code


def build_parser() -> argparse.ArgumentParser:
    """``python -m dcign_fast.train``'s parser (the command torchrun starts on each rank)."""
    parser = argparse.ArgumentParser(prog="python -m dcign_fast.train", description="Train a DC-IGN.")
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dcign_fast.cli import run_reporting_errors

    parser = build_parser()
    return run_reporting_errors(parser.prog, run, parser.parse_args(argv))
