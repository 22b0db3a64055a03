"""``dcign-fast demo``: the whole story on a laptop CPU in 3.5-10 minutes (2 cores).

Trains ``demo64`` on the built-in face renderer with DC-IGN's procedure, then writes the checkpoint,
a grid of a held-out render re-rendered along each extrinsic group, and the evaluation JSON + scatter plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dcign_fast.cli import add_device_argument, positive_int, run_folder
from dcign_fast.train.cli import add_set_argument
from dcign_fast.train.config import TrainConfig

DEMO_OPTIONS = {
    "preset": "demo64",
    "steps": 6000,
    "data_pool": 150,
    "checkpoint_every": 1000,
    "image_every": 1000,
    "log_every": 50,
    # 20x the paper's pull: measured on one seed, it separates the groups a little better in a short CPU run
    # (docs/results.md).
    "invariance": 0.2,
    # A step beyond the paper (train/contrast.py): without it the intrinsic latents recognise a face across a
    # 1.5 rad turn no better than its raw pixels do (4 of 100); with it 18 of 100 (docs/results.md).
    "identity_contrast": 300.0,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=run_folder, default=Path("runs/demo"), help="run folder (default runs/demo)")
    parser.add_argument(
        "--steps",
        type=positive_int,
        help=f"training steps (default {DEMO_OPTIONS['steps']}; a resumed demo: its own). Before the first, the demo "
        f"renders a pool of min(steps, {DEMO_OPTIONS['data_pool']}) batches of each kind (--set data_pool=N)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo in --out")
    add_device_argument(parser, "train", default=None)
    add_set_argument(parser, TrainConfig.from_dict(DEMO_OPTIONS), omit=("out",))  # (--out gives it)


def run(args: argparse.Namespace) -> int:
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.seeds import GRID_REFERENCES, stream_generator
    from dcign_fast.eval.evaluate import EVAL_SEED, evaluate
    from dcign_fast.eval.rerender import sweep_grid
    from dcign_fast.train.cli import resolve_options, run_training

    assignments = TrainConfig.parse_assignments(args.set)
    if "out" in assignments:  # the checkpoints would go there, the pictures and evaluation to --out
        raise ValueError("give the demo's run folder with --out, not --set out=")
    given = {"out": str(args.out), **{k: v for k in ("steps", "device") if (v := getattr(args, k)) is not None}}
    if args.steps is not None and not args.resume:  # a short run renders no more of the pool than it can use
        given["data_pool"] = min(args.steps, DEMO_OPTIONS["data_pool"])
    given.update(assignments)
    config = resolve_options(TrainConfig.from_dict(DEMO_OPTIONS), given, args.resume)
    code, trainer, result = run_training(config, args.resume)
    if code:
        return code
    model = trainer.model.eval()
    sampler = SweepSampler(size=model.config.image_size, device=trainer.device)
    results = evaluate(model, sampler.batch, out=args.out / "eval", checkpoint=result.checkpoint)
    generator = stream_generator(GRID_REFERENCES, EVAL_SEED, held_out=True)
    references = {kind: sampler.batch(kind, generator)[0] for kind in ("azimuth", "elevation", "light")}
    face = references["azimuth"][len(references["azimuth"]) // 2]
    grid = sweep_grid(model, face, args.out / "sweeps.png", references=references)
    print(json.dumps(results["correlation"], indent=2))
    print(f"checkpoint: {result.checkpoint}")
    print(f"sweep grid: {grid}")
    print(f"evaluation: {args.out / 'eval' / 'eval.json'} and {args.out / 'eval' / 'scatter.png'}")
    return 0
