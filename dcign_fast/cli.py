"""The ``dcign-fast`` command line."""

from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _info(_: argparse.Namespace) -> int:
    from dcign_fast.kernels import cuda
    from dcign_fast.ops.backends import triton_installed

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "triton_installed": triton_installed(),
        "cuda_extension_built": cuda.available(),
    }
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcign-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what this installation can run").set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
