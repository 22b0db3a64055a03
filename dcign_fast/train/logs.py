"""What a run leaves to look at: metrics as JSONL (+ TensorBoard when installed) and PNGs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dcign_fast.eval.grid import save_grid
from dcign_fast.eval.inference import eval_mode
from dcign_fast.eval.rerender import sweep_grid

if TYPE_CHECKING:
    from dcign_fast.models import DCIGN
    from dcign_fast.train.data import BatchStream


METRICS_FILE = "metrics.jsonl"
IMAGES_FOLDER = "images"  # the pictures of save_progress_images


class MetricsLog:
    """Appends one JSON object per line to ``<out>/metrics.jsonl``; on resume drops lines past the
    checkpoint's step (they belong to the lost part of the run)."""

    def __init__(self, out: Path, enabled: bool, resume_step: int = 0) -> None:
        self.enabled = enabled
        self.closed = False  # on every rank alike, so that all of them reopen it (together) after close()
        self.write_failed = False  # then closing flushes the failed line again, and fails again
        self.path = out / METRICS_FILE
        self.tensorboard = None
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            # Beside it, then renamed: a kill while writing in place would leave the run's history cut short.
            trimmed = self.path.with_name(f".tmp-{self.path.name}")
            trimmed.write_text("".join(line + "\n" for line in kept))
            os.replace(trimmed, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # (TensorBoard hides the events from purge_step on: the resumed step's own stays)
            self.tensorboard = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is optional
            self.tensorboard = None
        self.file = self.path.open("a")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:  # (a full disk's "[Errno 28] No space left on device" named no file)
            self.write_failed = True
            raise OSError(err.errno, f"cannot write {self.path} ({err.strerror})") from err
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.closed = True
        if self.enabled:
            try:
                self.file.close()
            except OSError:
                if not self.write_failed:  # (its line is lost either way; the write's error says why)
                    raise
            if self.tensorboard is not None:
                self.tensorboard.close()


def _step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable line is dropped


@torch.no_grad()
def save_progress_images(model: DCIGN, stream: BatchStream, folder: Path, step: int, device: torch.device) -> None:
    """Reconstructions of one fixed batch per kind, and the sweeps of one fixed image."""
    with eval_mode(model):
        batches = {kind: _fixed_batch(stream, kind) for kind in stream.kinds}
        rows, labels = [], []
        for kind, batch in batches.items():
            images = batch.to(device)[:8]
            mu, _ = model.encode(images)
            rows += [images.cpu(), model.decode(mu).cpu()]
            labels += [f"{kind}", "recon"]
        save_grid(folder / f"recon-{step:08d}.png", rows, labels, scale=2)
        references = {kind: batch for kind, batch in batches.items() if kind != "intrinsic"}
        # A folder dataset may hold intrinsic sweeps only: the sweeps then span the face's own code +- a spread.
        face = next(iter(references.values()), batches[stream.kinds[0]])
        sweep_grid(model, face[len(face) // 2], folder / f"sweeps-{step:08d}.png", references=references)


def _fixed_batch(stream: BatchStream, kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(12345)
    return stream.sweep_of(stream.render(kind, generator)[0], kind)
