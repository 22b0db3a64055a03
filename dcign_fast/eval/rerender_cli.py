"""``dcign-fast rerender --checkpoint C --image face.png --out sweeps.png``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcign_fast.cli import image_file, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder or its checkpoints folder (the newest checkpoint), a checkpoint folder or its weights",
    )
    parser.add_argument("--image", required=True, type=Path, help="a face photo or render (any size, RGB or grey)")
    parser.add_argument("--out", type=image_file, default=Path("sweeps.png"), help="the grid picture (.png)")
    parser.add_argument("--steps", type=positive_int, default=9, help="images per sweep")


def run(args: argparse.Namespace) -> int:
    import torch

    from dcign_fast.data.folders import read_grey
    from dcign_fast.eval.rerender import sweep_grid
    from dcign_fast.models import DCIGN

    model = DCIGN.from_checkpoint(args.checkpoint)
    image = torch.from_numpy(read_grey(args.image, model.config.image_size))[None, None]
    print(f"wrote {sweep_grid(model, image, args.out, count=args.steps)}")
    return 0
