"""dcign_fast.patch on a Stable-Diffusion-style VAE decoder (diffusers' AutoencoderKL, random weights).

Rows: the whole ``decode`` and its upsample layers alone (each Upsample2D at the input it gets inside
the decoder, summed), for the model as built (``unpatched``), a deep copy after ``dcign_fast.patch``
(``patched``) and ``torch.compile`` of the unpatched model (``compiled``, within the compile budget; skipped
on the CPU in quick mode, where compiling takes longer than the suite). The upsample layers come first: a
compile cut short by a time limit costs no rows of theirs. Forward only, under inference mode. ``speedup`` is the
unpatched time over the row's, measured side by side in the same run.

Sizes: SD's VAE (block_out_channels 128/256/512/512, two ResNet layers per block) decoding to 512x512
in bfloat16 on a GPU, to 256x256 in float32 on the CPU; quick mode uses a small VAE at 64x64.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import dcign_fast as dc
from benchmarks.harness import CompileBudget, compare

SD_VAE: dict[str, Any] = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
SMALL_VAE: dict[str, Any] = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8}


def _vae(config: dict, device: str, dtype: torch.dtype) -> Any:  # a diffusers AutoencoderKL
    from diffusers import AutoencoderKL  # an optional dependency (the test extra): imported on use

    blocks = len(config["block_out_channels"])
    vae: Any = AutoencoderKL(  # (Any: diffusers' config decorator hides that it is an nn.Module)
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks, **config
    )
    return vae.to(device=device, dtype=dtype).eval()


def _upsample_inputs(vae: Any, z: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The name of each Upsample2D of the model with the input it receives during ``decode(z)``."""
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0])))
        for name, m in vae.named_modules()
        if type(m).__name__ == "Upsample2D"
    ]
    vae.decode(z)
    for hook in hooks:
        hook.remove()
    return seen


def _variants(vae: Any, z: torch.Tensor, device: str, quick: bool) -> dict[str, dict[str, Callable[[], object]]]:
    """case -> variant name -> fn. The patched variants run a patched deep copy of the model."""
    layers = _upsample_inputs(vae, z)
    fused = copy.deepcopy(vae)
    dc.patch(fused)

    def decode(model: Callable[[torch.Tensor], Any]) -> Callable[[], object]:
        return lambda: model(z).sample

    def upsample(model: nn.Module) -> Callable[[], object]:
        return lambda: [model.get_submodule(name)(x) for name, x in layers]

    cases = {
        "upsample layers": {"unpatched": upsample(vae), "patched": upsample(fused)},
        "decode": {"unpatched": decode(vae.decode), "patched": decode(fused.decode)},
    }
    if not (quick and device == "cpu"):
        cases["decode"]["compiled"] = decode(torch.compile(vae.decode))
    return cases


def run(device: str, quick: bool) -> Iterator[dict]:
    if importlib.util.find_spec("diffusers") is None:  # e.g. an offline GPU machine: say so, measure the rest
        yield {"case": "SD VAE decode", "backend": "-", "note": "skipped: diffusers is not installed"}
        return
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config, size = (SMALL_VAE, 64) if quick else (SD_VAE, 512 if device == "cuda" else 256)
    repeats, warmup = (2, 1) if quick else (5, 2)
    vae = _vae(config, device, dtype)
    upsamplings = len(config["block_out_channels"]) - 1
    z = torch.randn(1, 4, size >> upsamplings, size >> upsamplings, device=device, dtype=dtype)
    budget = CompileBudget()
    with torch.inference_mode():
        for case, variants in _variants(vae, z, device, quick).items():
            row = {"case": f"{case} {size}x{size}", "pass": "forward", "dtype": str(dtype).split(".")[1]}
            yield from compare(variants, device, row, "unpatched", warmup=warmup, repeats=repeats, budget=budget)
