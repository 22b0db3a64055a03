"""Checkpoints that never lose work.

A checkpoint is a folder ``<out>/checkpoints/step-<N>/`` with
  model.safetensors  the weights, with the model config as JSON in the metadata (self-contained);
  trainer.pt         optimizer state, step, RNG states and the training config, loaded weights_only.
It is written to a temporary folder, flushed, and renamed into place, so a crash or a kill leaves
either the whole new checkpoint or none of it; the previous ones are untouched. Only after the rename
are checkpoints beyond the newest ``keep`` deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dcign_fast.bounds import described, is_integer
from dcign_fast.models.dcign import DCIGNConfig

WEIGHTS = "model.safetensors"
STATE = "trainer.pt"
STATE_KEYS = ("step", "optimizer", "rng", "config")  # and "world_size", which earlier versions did not store
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or truncated, or could not be written."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(tensors, str(path), metadata={"dcign_config": json.dumps(model_config)})


def write_weights(path: str | Path, state_dict: dict[str, torch.Tensor], model_config: dict[str, Any]) -> Path:
    """Writes one self-contained weights file, ``path`` itself if it ends in ``.safetensors``, else
    ``path/model.safetensors`` (the folder is made), and returns its path. It is written beside its place and
    renamed, so a crash leaves the previous file or the new one, never a torn one."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)  # unique across threads too
    os.close(handle)
    tmp = Path(name)
    try:
        save_weights(tmp, state_dict, model_config)
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def weights_file(path: str | Path) -> Path:
    """The weights file that ``path`` names: a checkpoint folder's, the file itself, or for a run folder or its
    ``checkpoints`` folder the newest checkpoint's. CheckpointError when there is none."""
    path = Path(path)
    if path.is_dir() and not (path / WEIGHTS).exists():
        newest = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        path = newest[-1] if newest else path
    if path.is_dir():
        path = path / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    if path.suffix != ".safetensors":  # trainer.pt, say: "corrupt" would mislead
        raise CheckpointError(f"{path} is not a weights file (*.safetensors); pass its checkpoint folder")
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], DCIGNConfig]:
    """(state_dict, model config) of the checkpoint ``path`` names (see :func:`weights_file`)."""
    path = weights_file(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint weights {path} are corrupt or truncated ({err})") from err
    if "dcign_config" not in metadata:
        raise CheckpointError(f"{path} holds no DC-IGN config: not a dcign-fast checkpoint's weights")
    try:
        config = json.loads(metadata["dcign_config"])
    except ValueError as err:
        raise CheckpointError(f"checkpoint weights {path} are corrupt ({err})") from err
    try:
        return tensors, DCIGNConfig(**config)
    except (TypeError, ValueError) as err:  # another version's options, or an edited file
        raise CheckpointError(
            f"checkpoint weights {path} hold a model config this version cannot build: {err}"
        ) from err


def load_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """``module.load_state_dict(weights)``, the weights read from ``path``; a CheckpointError naming it when they
    are not the module's (layers renamed or missing, other shapes: another version's file, or an edited one) or
    not floating point."""
    not_float = sorted(name for name, tensor in weights.items() if not tensor.is_floating_point())
    if not_float:  # (load_state_dict would cast them without a word)
        raise CheckpointError(f"checkpoint weights {path} must be floating-point, but {not_float} are not")
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        details = " ".join(str(err).split())  # torch's message spans lines, one per kind of mismatch
        raise CheckpointError(
            f"checkpoint weights {path} do not fit the model their config describes: {details}"
        ) from err


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    model_config: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Writes ``step-<step>`` atomically and prunes older checkpoints beyond ``keep``; returns its path. For the
    process holding the run folder's lock.

    A save that fails (a full disk, say) removes what it wrote and raises a CheckpointError naming the newest
    complete checkpoint, which it left as it was."""
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    recover_checkpoints(root)  # crashed saves' leftovers: their space first
    complete = list_checkpoints(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        save_weights(tmp / WEIGHTS, weights, model_config)
        torch.save(state, tmp / STATE)
        for name in (WEIGHTS, STATE):
            _fsync_file(tmp / name)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # a retry would find the space it took still taken
        if not isinstance(err, Exception):  # KeyboardInterrupt and the like go on as they are
            raise
        free = shutil.disk_usage(root).free / 2**20
        kept = f"the newest complete one, {complete[-1]}, is intact" if complete else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {final} ({type(err).__name__}: {err}; {free:.0f} MiB free there); {kept}"
        ) from err
    replaced = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # the same step written again (e.g. after a resume): swap, so the step never goes missing
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(replaced, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed). It only reads: a step that a
    re-save left only as its ``.old-`` folder (a crash between the save's two renames) is listed as that
    folder, which :func:`recover_checkpoints` puts back where the run folder's lock is held."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    steps = {p.name: p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)}
    for old in root.glob(f".old-{PREFIX}*"):
        steps.setdefault(_replaced_step(old), old)
    return [steps[name] for name in sorted(steps)]


def recover_checkpoints(checkpoints_dir: str | Path) -> None:
    """Puts back each step that a crashed re-save left only as its ``.old-`` folder, and deletes what crashed
    saves left besides (their space is needed). Only for the process holding the run folder's lock: a save
    under way has such folders between its two renames."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return
    for old in root.glob(f".old-{PREFIX}*"):
        step = root / _replaced_step(old)
        if not step.exists():
            os.rename(old, step)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _replaced_step(old: Path) -> str:
    """The step folder's name that ``.old-<step>-<pid>`` held."""
    return old.name.removeprefix(".old-").rsplit("-", 1)[0]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], DCIGNConfig, dict[str, Any]]:
    """(weights, model config, trainer state) of one checkpoint folder; CheckpointError if damaged."""
    weights, model_config = load_weights(path)
    return weights, model_config, load_state(path)


def load_state(path: str | Path) -> dict[str, Any]:
    """The trainer state (step, optimizer, RNG, options) of one checkpoint folder, without its weights."""
    path = Path(path)
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {path} has no {STATE}") from err
    except Exception as err:  # torch raises several types for damaged pickles/zips
        raise CheckpointError(f"checkpoint state {path / STATE} is corrupt or truncated ({err})") from err
    missing = sorted(set(STATE_KEYS) - set(state) if isinstance(state, dict) else STATE_KEYS)
    if missing:
        raise CheckpointError(f"checkpoint state {path / STATE} lacks {missing}: not a dcign-fast trainer state")
    if problem := _state_problem(state):
        raise CheckpointError(f"checkpoint state {path / STATE} is damaged: {problem}")
    return state


def _state_problem(state: dict[str, Any]) -> str | None:
    """What in a trainer state is not of the kind a trainer writes (which would fail later, unnamed), or None."""
    step, rng, optimizer = state["step"], state["rng"], state["optimizer"]
    if not is_integer(step) or step < 0:
        return f"its step must be an integer >= 0, got {step!r}"
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return f"its rng must be a CPU generator's state (torch.get_rng_state()), got {described(rng, dtype=True)}"
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        return f"its optimizer must be an optimizer's state_dict, got {described(optimizer)}"
    if not isinstance(state["config"], dict):
        return f"its config must be a mapping of training options, got {described(state['config'])}"
    return None
