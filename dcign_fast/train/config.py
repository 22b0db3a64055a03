"""The trainer's configuration: one dataclass, loadable from YAML and overridable from the command line."""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dcign_fast.bounds import FLOAT32_MAX, Bounds
from dcign_fast.data.sweeps import KINDS
from dcign_fast.devices import check_device
from dcign_fast.models.dcign import PRESETS
from dcign_fast.ops.backends import BACKENDS, check_backend_name
from dcign_fast.ops.latent_sampler import CLAMPS

NONFINITE_POLICIES = ("stop", "skip")
# Options that change how a run executes, not what it computes: a resumed run may change them.
RUN_CONTROLS = (
    "steps", "out", "device", "backend", "compile", "channels_last", "threads", "time_limit_s", "log_every",
    "image_every", "checkpoint_every", "keep_checkpoints", "on_nonfinite", "data_workers",
)  # fmt: skip
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


# Each numeric option's range (each element's, for betas), checked when a TrainConfig is made: before Adam,
# the sampler or torch see a value, and before a run folder is written. 0 stays allowed where it means "off";
# grad_clip and time_limit_s are switched off with None instead.
_ODDS = Bounds(0, below=FLOAT32_MAX)  # a batch kind's odds: as SweepSampler's, and a sum of them never overflows
OPTION_BOUNDS: dict[str, Bounds] = {
    "steps": Bounds(1),
    "pretrain_steps": Bounds(0),
    "batch_size": Bounds(1),
    "accumulation": Bounds(1),
    "lr": Bounds(0),
    "betas": Bounds(0, below=1),  # as Adam requires
    "adam_eps": Bounds(0, strict=True),  # 0 divides 0 by 0 for a parameter whose gradients are all 0
    "grad_clip": Bounds(0, strict=True),  # a max norm of 0 zeroes every gradient, below 0 flips them
    "invariance": Bounds(0, below=FLOAT32_MAX),  # (the sampler's pull is float32)
    "shape_bias": _ODDS,
    "identity_contrast": Bounds(0, below=FLOAT32_MAX),
    "contrast_identities": Bounds(1),
    "contrast_views": Bounds(2),  # (an image at one view is contrasted at the others)
    "contrast_temperature": Bounds(0, strict=True, below=FLOAT32_MAX),
    # (Hashed with the step and shard into each batch's generator: data/seeds.py.)
    "seed": Bounds(-(2**27), below=2**28),
    "data_pool": Bounds(0),
    "data_workers": Bounds(0, below=1025),
    "checkpoint_every": Bounds(1),
    "keep_checkpoints": Bounds(1),
    "log_every": Bounds(1),
    "image_every": Bounds(1),
    "threads": Bounds(0, below=1025),  # thousands of threads crash torch's CPU kernels
    "time_limit_s": Bounds(0),  # 0: stop (with a checkpoint) before the first step
}


def load_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error becomes a one-line ValueError that names ``where`` it came from."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(err)
        raise ValueError(f"{where} is not valid YAML: {' '.join(problem.split())}") from err


def _as_float(value: Any) -> Any:
    """A number (numpy's too) or a numeric string as a Python float (YAML reads 1e-3, without a dot, as a
    string; a checkpoint's weights_only load refuses numpy scalars); anything else, and an int too large for
    a float, unchanged, for the type check to name."""
    if isinstance(value, (numbers.Real, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):
            return float(value)
    return value


def _option(default: Any, help: str) -> Any:
    """A TrainConfig field; ``help`` is what the command line's list of options says of it."""
    if isinstance(default, dict):
        return field(default_factory=dict, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything that determines a training run (with the seed, a run is reproducible)."""

    preset: str = _option("demo64", "model size: " + ", ".join(sorted(PRESETS)))
    out: str | None = _option(None, "the run folder; null: runs/<preset> (see run_folder), so presets do not share one")
    steps: int = _option(3000, "total optimizer steps")
    pretrain_steps: int = _option(0, "plain-VAE steps (nothing clamped) before the one-factor procedure")
    batch_size: int = _option(20, "images per sweep")
    accumulation: int = _option(1, "sweeps per optimizer step and process (each clamped on its own)")
    lr: float = _option(5e-4, "Adam's learning rate")
    betas: tuple[float, float] = _option((0.9, 0.99), "Adam's betas, e.g. [0.9, 0.99]")
    adam_eps: float = _option(1e-8, "Adam's eps")
    grad_clip: float | None = _option(100.0, "max global gradient norm; null disables clipping")
    disentangle: bool = _option(True, "false: a plain VAE on the same batches (the comparison baseline)")
    clamp: str = _option("mean", 'clamp to the batch "mean" (the paper) or the "first" image\'s (the original code)')
    invariance: float = _option(0.01, "pull of clamped latents toward the batch mean, relative to the summed loss")
    shape_bias: float = _option(10.0, "odds of azimuth:elevation:light:intrinsic batches = 1:1:1:shape_bias")
    kind_weights: dict[str, float] = _option({}, "overrides the 1:1:1:shape_bias odds per kind, e.g. {light: 2}")
    identity_contrast: float = _option(
        0.0, "weight of an InfoNCE term between identities at one pose on z[3:] (beyond the paper; 0: off)"
    )
    contrast_identities: int = _option(7, "with identity_contrast: other identities rendered with each extrinsic sweep")
    contrast_views: int = _option(5, "with identity_contrast: views of each extrinsic sweep they are rendered at")
    contrast_temperature: float = _option(0.1, "with identity_contrast: cosine similarities are divided by it")
    contrast_mixed_views: bool = _option(
        False, "with identity_contrast: render the sweep's identity too, all at views drawn with every factor changed"
    )
    seed: int = _option(0, "seeds the weights, the batches and the latent noise")
    backend: str = _option("auto", "the fused ops' backend: " + ", ".join(BACKENDS))
    device: str = _option("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    bf16: bool | None = _option(None, "bf16 autocast; null: on for CUDA, off for CPU (on resume: as the run began)")
    channels_last: bool | None = _option(None, "channels_last memory format; null: on (faster on GPUs and x86 CPUs)")
    compile: bool = _option(False, "torch.compile the model")
    data: str = _option("render", "render (the built-in renderer), a folder in the DC-IGN layout, or a cache")
    data_pool: int = _option(0, "> 0: pre-render this many batches per kind and draw from them (CPU speed)")
    data_workers: int = _option(
        0, "> 0: draw the next steps' batches in this many processes, on the CPU, while the device trains"
    )
    checkpoint_every: int = _option(500, "steps between checkpoints")
    keep_checkpoints: int = _option(3, "how many of the newest checkpoints are kept")
    log_every: int = _option(25, "steps between lines of metrics.jsonl")
    image_every: int = _option(500, "steps between images/recon-*.png and images/sweeps-*.png")
    on_nonfinite: str = _option("stop", "a NaN/inf loss: stop the run (exit status 1), or skip the step")
    threads: int = _option(0, "torch CPU threads; 0 leaves torch's default")
    time_limit_s: float | None = _option(None, "stop with a checkpoint at the first step past it (exit 75, torchrun 0)")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Each option's type and range, and how they fit together; a TypeError or ValueError naming the option.
        Made at construction, and again by the Trainer: a dataclass's fields can be edited after."""
        self._check_types()
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.clamp not in CLAMPS:
            raise ValueError(f"clamp must be one of {CLAMPS}, got {self.clamp!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        self._check_bounds()
        if self.disentangle and self.batch_size < 2:
            raise ValueError(
                "batch_size must be >= 2 with disentangle=true (a one-image sweep has no batch mean to clamp "
                f"to: the run would train a plain VAE); got {self.batch_size}"
            )
        for name in ("out", "data"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} must not be empty, got {value!r}")
        if self.data_workers and self.data_pool:
            raise ValueError(
                f"data_workers must be 0 with data_pool > 0 (a pool's batches cost nothing to draw), got "
                f"data_workers={self.data_workers} and data_pool={self.data_pool}"
            )
        if self.identity_contrast and self.data != "render":
            raise ValueError(
                "identity_contrast needs data='render': it renders other identities at an extrinsic sweep's views, "
                f"which stored sweeps cannot give; got data={self.data!r}"
            )
        weights = self.kind_weights_in_full()
        if self.identity_contrast and not any(weights[kind] for kind in KINDS if kind != "intrinsic"):
            raise ValueError(
                "identity_contrast acts on extrinsic sweeps (azimuth, elevation, light), but their odds are all 0 "
                f"(shape_bias and kind_weights: {weights}); set identity_contrast=0 or give one of them odds"
            )
        if self.identity_contrast and not self.contrast_mixed_views and self.contrast_views > self.batch_size:
            raise ValueError(
                f"contrast_views must be at most batch_size ({self.batch_size}): they are views of a sweep; got "
                f"{self.contrast_views}"
            )
        check_device(self.device)
        check_backend_name(self.backend)  # (whether it runs on the device: the Trainer checks, knowing the device)
        unknown_kinds = [kind for kind in self.kind_weights if kind not in KINDS]
        if unknown_kinds:
            raise ValueError(f"kind_weights names unknown batch kinds {unknown_kinds}; kinds are {list(KINDS)}")
        if not sum(weights.values()) > 0:
            raise ValueError(f"the batch kinds' odds must not all be 0 (shape_bias and kind_weights), got {weights}")

    @property
    def run_folder(self) -> Path:
        """Where the run writes: ``out``, or ``runs/<preset>`` when it is None (a default that follows the
        preset: a run of another preset does not find this one's checkpoints and refuse to start)."""
        return Path("runs", self.preset) if self.out is None else Path(self.out)

    def kind_weights_in_full(self) -> dict[str, float]:
        """Each batch kind's weight: 1:1:1:shape_bias, unless ``kind_weights`` overrides."""
        defaults = {"azimuth": 1.0, "elevation": 1.0, "light": 1.0, "intrinsic": float(self.shape_bias)}
        return {**defaults, **self.kind_weights}

    def _check_bounds(self) -> None:
        """Each numeric option lies in its OPTION_BOUNDS (types are checked first)."""
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for name, bounds in OPTION_BOUNDS.items():
            value = getattr(self, name)
            numbers = value if isinstance(value, tuple) else (value,)
            if not all(bounds.admits(number) for number in numbers if number is not None):
                finite = " and finite" if "float" in types[name] else ""
                or_none = ", or null" if "None" in types[name] else ""
                raise ValueError(f"{name} must be {bounds}{finite}{or_none}, got {value!r}")

    def _check_types(self) -> None:
        """Each option has its annotated type (ints are accepted for floats and become floats)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = f.type.split(" | ")
            if value is None and "None" in kinds:
                continue
            expected = _SCALARS.get(kinds[0])
            if expected is float:
                value = _as_float(value)
                setattr(self, f.name, value)
            if expected is not None and (type(value) is not expected):
                # YAML reads a folder named 2024 as a number (and 2024-01-05 as a date): quoted, it stays text.
                hint = " (quote it in a YAML file: '...')" if expected is str else ""
                raise TypeError(f"{f.name} must be {f.type}, got {value!r}{hint}")
        betas = tuple(map(_as_float, self.betas)) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(type(b) is float for b in betas):
            raise TypeError(f"betas must be two numbers, got {self.betas!r}")
        self.betas = betas
        if not isinstance(self.kind_weights, dict):
            raise TypeError(f"kind_weights must map batch kinds to numbers, got {self.kind_weights!r}")
        self.kind_weights = {kind: _as_float(weight) for kind, weight in self.kind_weights.items()}
        for kind, weight in self.kind_weights.items():
            _ODDS.check(f"kind_weights[{kind!r}]", weight)

    def differences(self, other: TrainConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
        """{option: (this value, other's value)} for the options that differ, except those in ``ignore``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if k not in ignore and mine[k] != theirs[k]}

    def to_dict(self) -> dict[str, Any]:
        """{option: value} for every option (what a checkpoint stores)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The defaults with ``values`` replacing options; an unknown option is a ValueError."""
        known = cls.option_names()
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def option_names(cls) -> set[str]:
        """The names of every option."""
        return {f.name for f in dataclasses.fields(cls)}

    @staticmethod
    def read_yaml(path: str | Path) -> dict[str, Any]:
        """The options in a YAML file (a mapping)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:  # (its message named neither the file nor what it should hold)
            raise ValueError(f"{path} must be a YAML text file (UTF-8): {err.reason} at byte {err.start}") from err
        values = load_yaml(text, str(path)) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of training options")
        return values

    @classmethod
    def from_stored(cls, values: dict[str, Any]) -> TrainConfig:
        """The options a checkpoint stored, less any this version no longer knows (with a warning)."""
        known = cls.option_names()
        dropped = sorted(set(values) - known)
        if dropped:
            warnings.warn(f"the checkpoint's options {dropped} are unknown to this version: ignored", stacklevel=2)
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """The options of a YAML file (a mapping of option: value), the defaults for the rest."""
        return cls.from_dict(cls.read_yaml(path))

    @staticmethod
    def parse_assignments(assignments: list[str]) -> dict[str, Any]:
        """``key=value`` strings as options (values parsed as YAML: 3, 1e-3, true, [1, 2])."""
        values = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects key=value, got {item!r}")
            key = key.strip()
            # Text options take the text as typed: YAML would read out=007 as the number 7, 12:30 as 750. But null,
            # where an option allows None, is None (out=null: the default run folder, as --help says).
            as_typed = key in _TEXT_OPTIONS and not (key in _NULLABLE_TEXT_OPTIONS and raw.strip() == "null")
            values[key] = raw if as_typed else load_yaml(raw, f"--set {item}")
        return values

    def updated(self, values: dict[str, Any]) -> TrainConfig:
        """A copy with ``values`` replacing options."""
        return TrainConfig.from_dict({**self.to_dict(), **values})

    def override(self, assignments: list[str]) -> TrainConfig:
        """A copy with ``key=value`` assignments applied (see :meth:`parse_assignments`)."""
        return self.updated(self.parse_assignments(assignments))


# The options whose values are text: --set passes what was typed (see parse_assignments).
_TEXT_OPTIONS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.type.split(" | ")[0] == "str")
_NULLABLE_TEXT_OPTIONS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.type == "str | None")
