"""``dcign-fast rerender --checkpoint C --image face.png --out sweeps.png``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcign_fast.cli import add_device_argument, image_file, positive_int

MAX_FRAMES = 64  # a grid column per image, decoded in one batch: wider is unreadable and can exhaust memory


def sweep_frames(text: str) -> int:
    """argparse type: images per sweep, 2 (its two ends) to MAX_FRAMES."""
    value = positive_int(text)
    if not 2 <= value <= MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"must be 2 to {MAX_FRAMES} (a sweep's two ends at least), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder or its checkpoints folder (the newest checkpoint), a checkpoint folder or its weights",
    )
    parser.add_argument(
        "--image",
        required=True,
        type=Path,
        help="a face render or photo, RGB or grey (read as grey), any size (a non-square one is centre-cropped; "
        "transparency is black, the renders' background); a model trained on renders has not seen real photos",
    )
    parser.add_argument(
        "--out", type=image_file, default=Path("sweeps.png"), help="the grid picture (.png; default sweeps.png)"
    )
    # Not --steps, which train uses for optimizer steps; that spelling stays accepted for the scripts that used it.
    parser.add_argument(
        "--frames",
        "--steps",
        dest="frames",
        type=sweep_frames,
        default=9,
        help=f"images per sweep: the grid's columns (2 to {MAX_FRAMES}, default %(default)s; formerly --steps)",
    )
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from dcign_fast.data.folders import read_grey
    from dcign_fast.devices import resolve_device
    from dcign_fast.eval.rerender import sweep_grid
    from dcign_fast.models import DCIGN

    device = resolve_device(args.device, "--device")  # before the checkpoint loads
    model = DCIGN.from_checkpoint(args.checkpoint).to(device)  # sweep_grid moves the image to it
    if model.config.in_channels != 1:  # (the renderer and the trainer's image folders are grey too)
        raise ValueError(
            f"--checkpoint {args.checkpoint} takes {model.config.in_channels}-channel images; rerender reads "
            "the image as grey, for 1-channel models (call dcign_fast.eval.rerender.sweep_grid with your tensor)"
        )
    image = torch.from_numpy(read_grey(args.image, model.config.image_size))[None, None]
    print(f"wrote {sweep_grid(model, image, args.out, count=args.frames)}")
    return 0
