"""``dcign-fast info``: what this installation can run."""

from __future__ import annotations

import argparse
import importlib
import json
import platform

import torch


def environment() -> dict[str, object]:
    from dcign_fast import __version__
    from dcign_fast.kernels import cuda, cuda_emulation
    from dcign_fast.ops.backends import cuda_emulating, triton_interpreting, triton_unavailable_reason

    return {
        "dcign_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "triton": triton_unavailable_reason() or importlib.import_module("triton").__version__,
        "cuda_extension_built": cuda.available(),
        # Test modes: kernels on CPU tensors through Triton's interpreter / the CPU emulation of the extension
        # (switched on, but unable to build here: why).
        "triton_interpreter": triton_interpreting(),
        "cuda_emulation": cuda_emulating() and (cuda_emulation.unavailable_reason() or True),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    print(json.dumps(environment(), indent=2))
    return 0
