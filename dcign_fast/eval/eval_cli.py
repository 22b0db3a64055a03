"""``dcign-fast eval --checkpoint C``: disentanglement metrics on held-out renders (JSON + scatter plot)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dcign_fast.cli import add_device_argument, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder or its checkpoints folder (the newest checkpoint), a checkpoint folder or its weights",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for eval.json and scatter.png (default: <run>/eval, or <name>-eval beside a lone weights file);"
        " eval.json names the checkpoint evaluated",
    )
    parser.add_argument(
        "--sweeps",
        type=positive_int,
        default=40,
        help="held-out sweeps per kind: the extrinsic groups' correlations; all pooled for MIG (default %(default)s)",
    )
    parser.add_argument(
        "--identities", type=positive_int, default=100, help="identities for cross-pose retrieval (default %(default)s)"
    )
    add_device_argument(parser)


def default_out(path: Path) -> Path:
    """Where eval writes unless --out says: ``<run>/eval`` for a path into a run
    (<run>/checkpoints/step-N/model.safetensors, whichever of those folders or that file it names), and
    ``<name>-eval`` beside a weights file kept elsewhere."""
    from dcign_fast.train.checkpoint import weights_file

    weights = weights_file(path).resolve()
    if weights.parent.parent.name == "checkpoints":
        return weights.parents[2] / "eval"
    return weights.with_name(f"{weights.stem}-eval")


def run(args: argparse.Namespace) -> int:
    from dcign_fast.devices import resolve_device
    from dcign_fast.eval.evaluate import evaluate
    from dcign_fast.models import DCIGN
    from dcign_fast.train.checkpoint import weights_file

    device = resolve_device(args.device, "--device")  # before the checkpoint loads
    model = DCIGN.from_checkpoint(args.checkpoint).to(device)
    weights = weights_file(Path(args.checkpoint)).resolve()
    out = args.out or default_out(weights)
    out.mkdir(parents=True, exist_ok=True)  # now, not after the evaluation: an unwritable --out is found at once
    results = evaluate(model, out=out, sweeps=args.sweeps, identities=args.identities, checkpoint=weights)
    print(json.dumps(results, indent=2))
    print(f"wrote {out / 'eval.json'} and {out / 'scatter.png'}")
    return 0
