"""``dcign-fast render``: write rendered sweeps to disk (PNG folders or a uint8 cache), or a preview grid."""

from __future__ import annotations

import argparse
import itertools

from tqdm import tqdm

from dcign_fast.cli import image_file, positive_int, run_folder
from dcign_fast.data.cache import write_cache
from dcign_fast.data.folders import export_sweeps
from dcign_fast.data.preview import preview_grid
from dcign_fast.data.sweeps import SweepSampler

BATCHES = 100  # written with --out unless --batches says otherwise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=run_folder, help="dataset folder to write")
    target.add_argument("--preview", type=image_file, help="write a labelled grid PNG of all four sweep kinds")
    parser.add_argument(
        "--batches", type=positive_int, help=f"number of batches to write (with --out; default {BATCHES})"
    )
    parser.add_argument(
        "--size", type=positive_int, default=64, help="image side in pixels, e.g. 64 (the default), 128, 150"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=20,
        help="images per batch (a preview row holds as many; default %(default)s)",
    )
    parser.add_argument(
        "--shape-bias", type=float, default=10, help="odds of intrinsic batches: 1:1:1:k (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the dataset's seed (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="where to render: cpu (the default), cuda, cuda:N or auto")
    parser.add_argument(
        "--antialias", type=positive_int, default=1, help="supersampling factor (default %(default)s: none)"
    )
    parser.add_argument(
        "--format",
        choices=["png", "cache"],
        help="with --out: PNG folders (DC-IGN layout; the default) or uint8 .npz shards",
    )


def run(args: argparse.Namespace) -> int:
    from dcign_fast.devices import resolve_device

    sampler = SweepSampler(
        size=args.size,
        batch_size=args.batch_size,
        shape_bias=args.shape_bias,
        seed=args.seed,
        device=resolve_device(args.device, "--device"),
        antialias=args.antialias,
    )
    if args.preview is not None:
        if args.batches is not None or args.format is not None:  # (they would be ignored)
            given = "--batches" if args.batches is not None else "--format"
            raise ValueError(f"{given} is for --out: a --preview grid shows one batch of each kind")
        print(f"wrote {preview_grid(sampler, args.preview, seed=args.seed)}")
        return 0
    out = args.out
    if out.is_dir() and any(out.iterdir()):  # writing over it would mix two datasets' batches in one folder
        raise ValueError(f"--out {out} is not empty: choose a new folder (or delete this one)")
    if out.exists() and not out.is_dir():  # found now, not after the first batch is rendered
        raise ValueError(f"--out {out} is a file: choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # (its message named the path but not the option)
        raise ValueError(f"--out {out} cannot be created: {err.strerror}") from err
    total, layout = args.batches or BATCHES, args.format or "png"
    batches = tqdm(itertools.islice(sampler, total), total=total, unit="batch", desc="render")
    count = export_sweeps(batches, out) if layout == "png" else write_cache(batches, out)
    print(f"wrote {count} batches of {args.batch_size} images ({args.size}px, {layout}) to {out}")
    return 0
