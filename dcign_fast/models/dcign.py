"""The DC-IGN network: conv + max-pool encoder, Gaussian latent "graphics code", unpool-conv decoder."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from dcign_fast.bounds import Bounds, is_integer
from dcign_fast.nn import UnpoolConv2d
from dcign_fast.ops._checks import check_on_device
from dcign_fast.ops.backends import check_backend_name
from dcign_fast.ops.latent_sampler import sample_latents


def binary_cross_entropy_sum(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``F.binary_cross_entropy(recon, target, reduction="sum")``, except that NaN in ``recon`` makes the
    loss NaN instead of raising, so the trainer can report or skip the step. (torch's own BCE keeps its
    gradient finite where the sigmoid saturates to exactly 0 or 1; a hand-written log would not.)"""
    # CUDA autocast refuses F.binary_cross_entropy outright; the loss is float32 (or float64) anyway.
    dtype = torch.promote_types(recon.dtype, torch.float32)
    with torch.autocast(recon.device.type, enabled=False):
        bce = F.binary_cross_entropy(torch.nan_to_num(recon.to(dtype), nan=0.5), target.to(dtype), reduction="sum")
    return bce + 0.0 * recon.sum()  # NaN * 0 = NaN: a NaN anywhere in recon reaches the loss


# Accelerator devices whose loss inputs were checked once (see _check_ranges).
_RANGES_CHECKED_ON: set[torch.device] = set()


def _check_ranges(x: torch.Tensor, recon: torch.Tensor) -> None:
    """x, the BCE's targets, and recon, its input, in [0, 1]: a ValueError naming the one outside (0..255 pixels,
    or decode_logits' logits for recon, would give a wrong loss or torch's error naming neither, or stop the
    process with a device-side assert on a GPU). NaN in recon is allowed (the loss is then NaN, for the trainer to
    report). On the CPU at every call; on an accelerator at the first call per device, since the check's host sync
    would keep the host from queueing the backward while the GPU runs the forward at every step (a data pipeline
    that yields 0..255, or a loss fed logits, does so from its first batch). Not while torch.compile traces,
    torch.func transforms or a CUDA graph captures, where nothing can sync."""
    # In this order: dynamo cannot trace the capture query, and functorch's wrappers (vmap, grad) hold no data.
    if torch.compiler.is_compiling() or x.device.type == "meta" or not x.numel() or x.device in _RANGES_CHECKED_ON:
        return
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in (x, recon)) or (
        x.is_cuda and torch.cuda.is_current_stream_capturing()
    ):
        return
    ranges = torch.stack([m.float() for t in (x, recon) for m in torch.aminmax(t.detach())])
    low, high, recon_low, recon_high = ranges.tolist()  # (one sync)
    if error := outside_unit_range("x", "images in [0, 1] (the reconstruction's targets)", low, high):
        raise error
    if math.isnan(recon_low):  # NaN hides the other values' range; the BCE replaces NaN with 0.5 (a failed step)
        recon_low, recon_high = torch.stack(torch.aminmax(torch.nan_to_num(recon.detach().float(), nan=0.5))).tolist()
    if not (recon_low >= 0 and recon_high <= 1):
        raise ValueError(
            f"recon must be in [0, 1] (the decoder's sigmoid output: decode, not decode_logits), "
            f"got [{recon_low}, {recon_high}]"
        )
    if x.device.type != "cpu":
        _RANGES_CHECKED_ON.add(x.device)


def outside_unit_range(name: str, what: str, low: float, high: float) -> ValueError | None:
    """The ValueError for ``name``'s values, spanning [low, high], outside [0, 1] (NaN too), with a hint for
    0..255 pixels; None when they are inside."""
    if low >= 0 and high <= 1:
        return None
    hint = ": 0..255 pixels? divide by 255" if high > 2 else ""
    return ValueError(f"{name} must hold {what}, got [{low}, {high}]{hint}")


def _check_not_empty(x: object) -> None:
    """A batch of no images would average over B = 0 (NaN), or reach kernels that refuse it."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 0:
        raise ValueError(f"x must hold at least one image, got shape {tuple(x.shape)}")


def paper_latent_groups(latent_dim: int) -> dict[str, tuple[int, int]]:
    """The paper's graphics code: z[0] azimuth, z[1] elevation, z[2] light, z[3:] intrinsic."""
    return {"azimuth": (0, 1), "elevation": (1, 2), "light": (2, 3), "intrinsic": (3, latent_dim)}


class _PaperGroups(dict):
    """The paper's grouping as the config filled it in for ``latent_dim`` (none was given, or the very same): it
    follows later edits of latent_dim, told from edits of the groups themselves by the latent_dim it remembers.
    Groups given otherwise are kept as given, even with the paper's names."""

    latent_dim: int | None = None  # (None: made by a copy that did not carry it, as asdict's)

    @classmethod
    def filled_in(cls, latent_dim: int) -> _PaperGroups:
        groups = cls(paper_latent_groups(latent_dim))
        groups.latent_dim = latent_dim
        return groups


def _spans(latent_groups: object) -> dict[str, tuple[int, int]]:
    """latent_groups as {name: (start, stop)} with int bounds; a TypeError naming the entry that is not."""
    if not isinstance(latent_groups, Mapping):
        raise TypeError(f"latent_groups must be a dict name -> (start, stop), got {type(latent_groups).__name__}")
    spans = {}
    for name, span in latent_groups.items():
        if not isinstance(name, str):
            raise TypeError(f"latent_groups' names must be strings, got {name!r}")
        pair = isinstance(span, (tuple, list)) and len(span) == 2
        if not pair or not all(is_integer(v) for v in span):
            raise TypeError(f"latent_groups[{name!r}] must be a (start, stop) pair of ints, got {span!r}")
        spans[name] = (int(span[0]), int(span[1]))
    return spans


def _checked_int(name: str, value: object, low: int) -> int:
    """``value`` as an int: an integer (numpy's too, not a bool) >= ``low``, else an error naming ``name``."""
    Bounds(low).check(name, value, integer=True)
    return int(cast(int, value))


@dataclass
class DCIGNConfig:
    """Architecture of a DC-IGN.

    Encoder: for each of ``encoder_channels``: conv (``encoder_kernel``, ``encoder_padding``) ->
    max-pool 2 -> ReLU. Two linear heads give mu and logvar of ``latent_dim`` latents.
    Decoder: Linear -> ReLU -> [C0, S0, S0] (the encoder's final shape), then for each of
    ``decoder_channels`` and finally ``in_channels``: nearest unpool x2 -> conv (``decoder_kernel``,
    ``decoder_padding``), ReLU between blocks, sigmoid at the end. The decoder must end at ``image_size``.
    """

    image_size: int = 150
    in_channels: int = 1
    encoder_channels: tuple[int, ...] = (96, 48, 24)
    encoder_kernel: int = 5
    encoder_padding: int = 0
    latent_dim: int = 200
    decoder_channels: tuple[int, ...] = (48, 96, 96)
    decoder_kernel: int = 7
    decoder_padding: int = 0
    latent_groups: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Normalise and check every field; a ValueError or TypeError names the one at fault. Runs when the
        config is made and again when a DCIGN is built from it, so edits made in between are checked too.

        The paper's grouping (z[0], z[1], z[2], z[3:]) follows ``latent_dim``: change a preset's latent_dim
        and its intrinsic group still reaches the last latent. Latents in no group are allowed, with a
        warning: the trainer clamps them to their batch mean in every batch.
        """
        for name in ("encoder_channels", "decoder_channels"):
            channels = getattr(self, name)
            if not isinstance(channels, (tuple, list)):  # an int: "'int' object is not iterable" named nothing
                raise TypeError(f"{name} must be a tuple (or list) of channel counts, got {channels!r}")
            setattr(self, name, tuple(channels))
        self._check_sizes()
        self.latent_groups = self._checked_groups()
        decoded = self.decoder_sizes()[-1]
        if decoded != self.image_size:
            raise ValueError(
                f"the decoder produces {decoded}x{decoded} images but image_size is {self.image_size}; "
                "adjust decoder_kernel, decoder_padding or the number of decoder_channels"
            )

    def _check_sizes(self) -> None:
        """Sizes, channel counts and kernels are integers >= 1, paddings integers >= 0; each stored as an int
        (numpy's integers pass the check, but torch's layers and save()'s JSON refuse them)."""
        for name, low in (("image_size", 1), ("in_channels", 1), ("latent_dim", 1)):
            setattr(self, name, _checked_int(name, getattr(self, name), low))
        for name in ("encoder_channels", "decoder_channels"):
            channels = getattr(self, name)
            setattr(self, name, tuple(_checked_int(f"{name}[{i}]", c, 1) for i, c in enumerate(channels)))
        for name, low in (("encoder_kernel", 1), ("decoder_kernel", 1), ("encoder_padding", 0), ("decoder_padding", 0)):
            setattr(self, name, _checked_int(name, getattr(self, name), low))

    def _checked_groups(self) -> dict[str, tuple[int, int]]:
        """latent_groups as (int, int) spans inside [0, latent_dim); empty, or the paper's grouping this config
        filled in for another latent_dim (a preset's, left from before an edit), becomes the paper's for this one.
        The same spans given by hand are kept (a ValueError if they do not fit): they were asked for."""
        given = self.latent_groups
        groups = _spans(given)
        filled_for = given.latent_dim if isinstance(given, _PaperGroups) else None
        left_from_before_an_edit = filled_for is not None and groups == paper_latent_groups(filled_for)
        if not groups or left_from_before_an_edit or groups == paper_latent_groups(self.latent_dim):
            if self.latent_dim < 4:
                raise ValueError(
                    f"latent_dim must be >= 4 for the paper's latent_groups (z[0] azimuth, z[1] elevation, z[2] "
                    f"light, z[3:] intrinsic), got {self.latent_dim}; or give latent_groups of your own"
                )
            return _PaperGroups.filled_in(self.latent_dim)
        for name, (start, stop) in groups.items():
            if not 0 <= start < stop <= self.latent_dim:
                raise ValueError(
                    f"latent_groups[{name!r}] = ({start}, {stop}) must satisfy 0 <= start < stop <= "
                    f"latent_dim ({self.latent_dim})"
                )
        spans = sorted((span, name) for name, span in groups.items())
        for (first, first_name), (second, second_name) in zip(spans, spans[1:]):
            if second[0] < first[1]:
                warnings.warn(
                    f"latent_groups {first_name!r} {first} and {second_name!r} {second} overlap: batches of either "
                    "factor leave the latents they share unclamped, so those cannot come to code one factor alone",
                    stacklevel=4,
                )
        ungrouped = set(range(self.latent_dim)).difference(*(range(*span) for span in groups.values()))
        if ungrouped:
            warnings.warn(
                f"{len(ungrouped)} latents, from z[{min(ungrouped)}] to z[{max(ungrouped)}], belong to no group of "
                f"latent_groups {groups} (latent_dim {self.latent_dim}): training clamps them in every batch",
                stacklevel=4,
            )
        return groups

    def encoder_sizes(self) -> list[int]:
        """Spatial size after each encoder block, starting with the input."""
        sizes = [self.image_size]
        for _ in self.encoder_channels:
            conv = sizes[-1] + 2 * self.encoder_padding - self.encoder_kernel + 1
            if conv < 2:
                raise ValueError(f"image_size {self.image_size} is too small for the encoder")
            sizes.append(conv // 2)
        return sizes

    def decoder_sizes(self) -> list[int]:
        """Spatial size before the first decoder block and after each one."""
        sizes = [self.encoder_sizes()[-1]]
        for _ in range(len(self.decoder_channels) + 1):
            sizes.append(2 * sizes[-1] + 2 * self.decoder_padding - self.decoder_kernel + 1)
        return sizes

    def to_dict(self) -> dict[str, Any]:
        """{field: value}: what a checkpoint stores beside the weights (plain types: torch.load's weights_only
        refuses classes of ours)."""
        return {**asdict(self), "latent_groups": dict(self.latent_groups)}


PRESETS: dict[str, DCIGNConfig] = {
    # The original network (Kulkarni et al. 2015; willwhitney/dc-ign config.lua).
    "paper150": DCIGNConfig(),
    # Trains on a 2-core CPU in minutes: same-padded 5x5 convolutions, 64 -> 8 -> 64.
    "demo64": DCIGNConfig(
        image_size=64,
        encoder_channels=(16, 32, 32),
        encoder_padding=2,
        latent_dim=32,
        decoder_channels=(32, 16),
        decoder_kernel=5,
        decoder_padding=2,
    ),
    "face128": DCIGNConfig(
        image_size=128,
        encoder_channels=(32, 64, 64),
        encoder_padding=2,
        latent_dim=200,
        decoder_channels=(64, 32),
        decoder_kernel=5,
        decoder_padding=2,
    ),
}


def preset(name: str) -> DCIGNConfig:
    """A fresh copy of a preset config."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    config = PRESETS[name]
    return replace(config, latent_groups=copy.copy(config.latent_groups))  # (a _PaperGroups stays one)


def check_shape(name: str, t: object, per_item: tuple[int, ...], what: str) -> None:
    """``t`` must be a batch of ``per_item``-shaped tensors: ValueError naming the expected shape otherwise."""
    if not isinstance(t, torch.Tensor) or tuple(t.shape[1:]) != per_item or t.dim() != len(per_item) + 1:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        expected = ", ".join(map(str, ("B", *per_item)))
        raise ValueError(f"{name} must be [{expected}] {what} for this model, got {got}")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


class DCIGN(nn.Module):
    """Deep Convolutional Inverse Graphics Network.

    ``backend`` routes every fused op (unpool-conv, latent sampler); it is not part of the
    state_dict, so a model saved with one backend loads and runs with any other.
    """

    def __init__(self, config: DCIGNConfig, backend: str = "auto") -> None:
        super().__init__()
        check_backend_name(backend)
        if not isinstance(config, DCIGNConfig):
            raise TypeError(
                f"config must be a DCIGNConfig (DCIGN.from_preset(name) builds a preset's), got {type(config).__name__}"
            )
        # The model's own copy, checked again (edits since it was made): editing or reusing the caller's config,
        # e.g. to build the next model of a sweep, cannot change this model's description of itself.
        self.config = c = copy.deepcopy(config)
        c.check()
        layers: list[nn.Module] = []
        channels = c.in_channels
        for out in c.encoder_channels:
            layers += [
                nn.Conv2d(channels, out, c.encoder_kernel, padding=c.encoder_padding),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            channels = out
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        start = c.decoder_sizes()[0]
        flat = channels * start * start
        self.to_mu = nn.Linear(flat, c.latent_dim)
        self.to_logvar = nn.Linear(flat, c.latent_dim)
        # The original's N(0, 0.01) head weights. (Its heads' biases and the decoder's first Linear are N(0, 0.01)
        # too; here they start at 0 and at torch's default.)
        for head in (self.to_mu, self.to_logvar):
            nn.init.normal_(head.weight, std=0.01)
            nn.init.zeros_(head.bias)
        self.from_latent = nn.Sequential(
            nn.Linear(c.latent_dim, flat), nn.ReLU(), nn.Unflatten(1, (channels, start, start))
        )
        blocks: list[nn.Module] = []
        outs = (*c.decoder_channels, c.in_channels)
        for i, out in enumerate(outs):
            # The ReLU between blocks is fused into the unpool-conv's epilogue (no extra pass on GPUs).
            activation = "relu" if i < len(outs) - 1 else None
            blocks.append(
                UnpoolConv2d(
                    channels, out, c.decoder_kernel, padding=c.decoder_padding, activation=activation, backend=backend
                )
            )
            channels = out
        self.decoder = nn.Sequential(*blocks)
        self._backend = backend

    @property
    def backend(self) -> str:
        """The backend its fused ops run on (see :meth:`set_backend`)."""
        return self._backend

    def set_backend(self, backend: str) -> DCIGN:
        """Routes every fused op through ``backend``; returns self."""
        check_backend_name(backend)
        self._backend = backend
        for module in self.modules():
            if isinstance(module, UnpoolConv2d):
                module.backend = backend
        return self

    @classmethod
    def from_preset(cls, name: str, backend: str = "auto") -> DCIGN:
        """``"paper150"``, ``"demo64"`` or ``"face128"``."""
        return cls(preset(name), backend=backend)

    @classmethod
    def from_checkpoint(cls, path: str | Path, backend: str = "auto") -> DCIGN:
        """Loads any checkpoint the trainer writes: a checkpoint folder, its ``model.safetensors``, or a run
        folder or its ``checkpoints`` folder (the newest checkpoint).

        The architecture comes from the file's metadata; nothing is unpickled. The model is in the dtype its
        weights were saved in (a float64 or bfloat16 model's come back so; the trainer's are float32).
        """
        from dcign_fast.train.checkpoint import load_into, load_weights, weights_file

        path = weights_file(path)
        weights, config = load_weights(path)
        model = cls(config, backend=backend)
        dtypes = {tensor.dtype for tensor in weights.values()}
        if len(dtypes) == 1 and next(iter(dtypes)).is_floating_point:  # (load_into names weights that are not)
            model.to(next(iter(dtypes)))  # load_state_dict would cast them to the new model's float32
        load_into(model, weights, path)
        return model

    def save(self, path: str | Path) -> Path:
        """Writes the weights, with the config in the file's metadata, as one safetensors file that
        :meth:`from_checkpoint` reads: ``path`` if it ends in ``.safetensors``, else ``path/model.safetensors``.
        The file is written beside its place and renamed, so a crash never leaves a torn one. Returns its path."""
        from dcign_fast.train.checkpoint import write_weights

        return write_weights(path, self.state_dict(), self.config.to_dict())

    def active_mask(self, group: str) -> torch.Tensor:
        """bool [latent_dim] on the model's device: True for the latents of ``group`` (a key of
        ``config.latent_groups``), the ``active`` argument of :meth:`forward` for a batch in which only that
        group's factor varies."""
        groups = self.config.latent_groups
        if not isinstance(group, str) or group not in groups:
            raise ValueError(f"group must be one of the model's latent groups {sorted(groups)}, got {group!r}")
        mask = torch.zeros(self.config.latent_dim, dtype=torch.bool, device=self.to_mu.weight.device)
        start, stop = groups[group]
        mask[start:stop] = True
        return mask

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, S, S] in [0, 1] -> (mu, logvar), each [B, latent_dim]."""
        c = self.config
        check_shape("x", x, (c.in_channels, c.image_size, c.image_size), "images")
        self._check_input("x", x, "images in [0, 1] (uint8 pixels: divide by 255)", self._first_layer(self.encoder))
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] -> [B, C, S, S] logits (before the sigmoid)."""
        check_shape("z", z, (self.config.latent_dim,), "codes")
        self._check_input("z", z, "codes", self._first_layer(self.from_latent))
        # The unflattened code is NCHW and every unpool-conv keeps its input's layout: without this a model
        # moved to channels_last (the trainer's default) would run its whole decoder in NCHW, and the fused
        # kernels would copy to and from their NHWC layout at every layer.
        h = self.from_latent(z).contiguous(memory_format=self._decoder_memory_format())
        return self.decoder(h)

    @staticmethod
    def _first_layer(layers: nn.Module) -> nn.Module:
        """The first module of ``layers`` that holds parameters of its own: the one an input meets first."""
        return next(m for m in layers.modules() if next(m.parameters(recurse=False), None) is not None)

    def _check_input(self, name: str, t: torch.Tensor, what: str, layer: nn.Module) -> None:
        """ValueError unless ``t`` is on the device of ``layer``'s weight, the layer it meets first (a model may
        be split across devices); TypeError unless it is floating point with the weights' dtype, or one autocast
        casts: torch's own messages name neither the argument nor the fix. The device is not checked under
        accelerate's hooks (cpu_offload, dispatch_model: a ``_hf_hook``), which move the weights (from the meta
        device) or the inputs in the layer's own pre-forward, after this check."""
        first = next(layer.parameters(recurse=False))
        dtype, device = first.dtype, first.device
        if t.device != device and not hasattr(layer, "_hf_hook"):
            raise ValueError(
                f"{name} must be on the model's device ({device}), got {t.device}: move it with .to('{device}'), "
                f"or the model with .to('{t.device}')"
            )
        if t.dtype == dtype:
            return
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating-point {what}, got {t.dtype}")
        if not (_autocast_enabled(t.device.type) and t.dtype != torch.float64):  # autocast skips float64
            raise TypeError(
                f"{name} must have the model's dtype ({dtype}), got {t.dtype}: convert it with .to({dtype}), "
                f"or the model with .to({t.dtype}) (under autocast, 16- and 32-bit floats are cast)"
            )

    def _decoder_memory_format(self) -> torch.memory_format:
        """channels_last if the decoder's weights were made so. Their exact strides tell, not is_contiguous,
        which holds in both formats for a 1x1 kernel."""
        weight = cast(torch.Tensor, self.decoder[0].weight)  # an UnpoolConv2d's or a Conv2d's
        _, c, kh, kw = weight.shape
        return torch.channels_last if weight.stride() == (kh * kw * c, 1, kw * c, c) else torch.contiguous_format

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent_dim] -> [B, C, S, S] images in [0, 1]: float32 where the logits are 16-bit (under autocast,
        or for a model cast to 16 bits), else in the model's dtype."""
        logits = self.decode_logits(z)
        # A bfloat16 (or float16) sigmoid rounds to exactly 1 from logit ~6 on: the BCE of a pixel below 1 there is
        # log(0) (clamped to -100), with no gradient. So in float32, as autocast runs its other saturating functions
        # (softmax, BCE with logits); casting back to 16 bits would round it to 1 again.
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()
        return torch.sigmoid(logits)

    def forward(
        self,
        x: torch.Tensor,
        active: torch.Tensor | None = None,
        *,
        clamp: str = "mean",
        invariance: float = 0.0,
        seed: int | None = None,
        return_kl: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """[B, C, S, S] -> (recon [B, C, S, S], mu [B, D], logvar [B, D], z [B, D]), plus kl [B] if ``return_kl``.

        z and kl come from :func:`dcign_fast.sample_latents` (``active``, ``clamp``, ``invariance``,
        ``seed`` as there) through the model's backend. mu and logvar are the encoder's, before clamping;
        kl is each image's KL of the clamped posterior, the term to pass to :meth:`loss` when training
        with clamping (its gradient follows the sampler's rules). Both return shapes are plain tuples.
        """
        _check_not_empty(x)
        mu, logvar = self.encode(x)
        z, kl = sample_latents(mu, logvar, active, clamp=clamp, invariance=invariance, seed=seed, backend=self.backend)
        recon = self.decode(z)
        return (recon, mu, logvar, z, kl) if return_kl else (recon, mu, logvar, z)

    @staticmethod
    def loss(
        x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, kl: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """BCE summed per image + KL to N(0, I), each averaged over the batch.

        ``x``: the images [B, C, S, S] in [0, 1]; ``recon``: the decoder's output, same shape, in [0, 1].
        ``kl``: [B] per-image KL from ``forward(..., return_kl=True)`` (clamped latents, the sampler's
        gradients); None: the analytic KL of the unclamped (mu, logvar) [B, D].
        """
        for name, t in (("x", x), ("recon", recon), ("mu", mu), ("logvar", logvar), ("kl", kl)):
            if not (isinstance(t, torch.Tensor) and t.is_floating_point()) and not (name == "kl" and t is None):
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name} must be a floating-point tensor, got {got}")
        for name, t in (("recon", recon), ("mu", mu), ("logvar", logvar), ("kl", kl)):
            check_on_device(name, t, x.device, "x's device")
        if x.dim() != 4:  # (x[0] would be blamed on mu, as of another batch size)
            raise ValueError(f"x must be [B, C, S, S] images, got shape {tuple(x.shape)}")
        _check_not_empty(x)
        if recon.shape != x.shape:
            raise ValueError(f"recon must have x's shape {tuple(x.shape)}, got {tuple(recon.shape)}")
        batch = x.shape[0]
        # A kl or latents of another batch (or a logvar that broadcasts) would give a finite loss on the wrong scale.
        if mu.dim() != 2 or mu.shape[0] != batch:
            raise ValueError(f"mu must be [B, D] with x's batch size B={batch}, got shape {tuple(mu.shape)}")
        if logvar.shape != mu.shape:
            raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
        if kl is not None and tuple(kl.shape) != (batch,):
            raise ValueError(f"kl must be [B] with x's batch size B={batch}, got shape {tuple(kl.shape)}")
        _check_ranges(x, recon)
        # float32 at least (a float64 model's loss stays float64, for gradcheck and finite differences).
        dtype = torch.promote_types(recon.dtype, torch.float32)
        recon_loss = binary_cross_entropy_sum(recon, x) / batch  # (in that dtype too)
        if kl is None:
            mu, logvar = mu.to(dtype), logvar.to(dtype)
            kl_loss = -0.5 * torch.sum(1 + logvar - mu**2 - logvar.exp()) / batch
        else:
            kl_loss = kl.to(dtype).sum() / batch
        return {"total": recon_loss + kl_loss, "recon": recon_loss, "kl": kl_loss}
