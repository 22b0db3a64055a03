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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import dcign_fast as dc
from benchmarks.harness import CompileBudget, compare

SD_VAE: dict[str, Any] = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
SMALL_VAE: dict[str, Any] = {"block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8}
CASES = ("upsample layers", "decode")  # in the order timed (see above)
EAGER = ("unpatched", "patched")  # the variants every case has, the baseline first
MISSING = "diffusers is not installed"


def available() -> bool:
    """Whether diffusers (an optional dependency: the test extra) is installed; without it there is no VAE."""
    return importlib.util.find_spec("diffusers") is not None


@dataclass(frozen=True)
class Setup:
    """What a device and mode time: the VAE's config, the size it decodes to and the dtype (see above)."""

    config: dict[str, Any]
    size: int
    dtype: torch.dtype

    def row(self, case: str) -> dict:
        """The fields that name ``case``'s rows (and its pytest-benchmark group)."""
        return {"case": f"{case} {self.size}x{self.size}", "pass": "forward", "dtype": str(self.dtype).split(".")[1]}

    def build(self, device: str) -> tuple[Any, torch.Tensor]:
        """(the VAE, the latent it decodes): random weights and input."""
        vae = _vae(self.config, device, self.dtype)
        latent = self.size >> (len(self.config["block_out_channels"]) - 1)  # one upsampling between blocks
        return vae, torch.randn(1, 4, latent, latent, device=device, dtype=self.dtype)


def setup(device: str, quick: bool) -> Setup:
    """The module docstring's sizes: cheap, so that the pytest-benchmark front door names its cases at collection."""
    if quick:
        return Setup(SMALL_VAE, 64, torch.float32)
    return Setup(SD_VAE, 512, torch.bfloat16) if device == "cuda" else Setup(SD_VAE, 256, torch.float32)


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


def eager_variants(vae: Any, z: torch.Tensor) -> dict[str, dict[str, Callable[[], object]]]:
    """case -> variant name -> fn, for ``CASES`` and ``EAGER``: the patched variants run a patched deep copy
    of the model. Run under inference mode (the upsample layers' inputs are captured from a decode)."""
    layers = _upsample_inputs(vae, z)
    fused = copy.deepcopy(vae)
    dc.patch(fused)

    def upsample(model: nn.Module) -> Callable[[], object]:
        return lambda: [model.get_submodule(name)(x) for name, x in layers]

    def decode(model: Any) -> Callable[[], object]:  # an AutoencoderKL (see _vae)
        return _decode(model.decode, z)

    models = dict(zip(EAGER, (vae, fused)))
    return {case: {name: timed(m) for name, m in models.items()} for case, timed in zip(CASES, (upsample, decode))}


def _decode(decode: Callable[[torch.Tensor], Any], z: torch.Tensor) -> Callable[[], object]:
    return lambda: decode(z).sample


def _variants(vae: Any, z: torch.Tensor, device: str, quick: bool) -> dict[str, dict[str, Callable[[], object]]]:
    """The eager variants, and ``compiled`` (torch.compile of the unpatched decode) beside them."""
    cases = eager_variants(vae, z)
    if not (quick and device == "cpu"):
        cases["decode"]["compiled"] = _decode(torch.compile(vae.decode), z)
    return cases


def run(device: str, quick: bool) -> Iterator[dict]:
    if not available():  # e.g. an offline GPU machine: say so, measure the rest
        yield {"case": "SD VAE decode", "backend": "-", "note": f"skipped: {MISSING}"}
        return
    repeats, warmup = (2, 1) if quick else (5, 2)
    chosen = setup(device, quick)
    vae, z = chosen.build(device)
    budget = CompileBudget()
    with torch.inference_mode():
        for case, variants in _variants(vae, z, device, quick).items():
            yield from compare(
                variants, device, chosen.row(case), "unpatched", warmup=warmup, repeats=repeats, budget=budget
            )
