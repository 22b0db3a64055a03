"""``dcign-fast rerender --checkpoint C --image face.png --out sweeps.png``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcign_fast.cli import add_device_argument, image_file, positive_int

MAX_STEPS = 64  # a grid column per image, decoded in one batch: wider is unreadable and can exhaust memory


def sweep_steps(text: str) -> int:
    """argparse type: images per sweep, 1 to MAX_STEPS."""
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_STEPS}, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder or its checkpoints folder (the newest checkpoint), a checkpoint folder or its weights",
    )
    parser.add_argument("--image", required=True, type=Path, help="a face photo or render (any size, RGB or grey)")
    parser.add_argument("--out", type=image_file, default=Path("sweeps.png"), help="the grid picture (.png)")
    parser.add_argument("--steps", type=sweep_steps, default=9, help=f"images per sweep (at most {MAX_STEPS})")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from dcign_fast.data.folders import read_grey
    from dcign_fast.eval.rerender import sweep_grid
    from dcign_fast.models import DCIGN
    from dcign_fast.train.config import resolve_device

    device = resolve_device(args.device, "--device")  # before the checkpoint loads
    model = DCIGN.from_checkpoint(args.checkpoint).to(device)  # sweep_grid moves the image to it
    image = torch.from_numpy(read_grey(args.image, model.config.image_size))[None, None]
    print(f"wrote {sweep_grid(model, image, args.out, count=args.steps)}")
    return 0
