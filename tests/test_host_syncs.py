"""Host syncs of a training step: a device -> host read stalls the launch queue on a GPU, so the steps that neither
log, checkpoint nor draw pictures must not read anything back, and those that do read once."""

from __future__ import annotations

import traceback
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dcign_fast.models.dcign
import dcign_fast.train.trainer
from dcign_fast.train import TrainConfig, Trainer
from tests.test_train import blobs, config

aten = torch.ops.aten
# The ops that wait for a tensor's values: scalar reads (.item(), float(t), bool(t)), comparisons answered on the
# host, and those whose output size depends on the values.
READS = {
    aten._local_scalar_dense.default,
    aten.item.default,  # (seen as such below autograd, in a custom op)
    aten.is_nonzero.default,
    aten.equal.default,
    aten.allclose.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}


# Functions that read a tensor on the host on the CPU alone (the test below checks that they do not elsewhere).
CPU_ONLY = ("_sparse_columns",)


class HostSyncs(TorchDispatchMode):
    """Records, per step being taken, where each device -> host read happened (dcign_fast's frames), inside the
    library's custom ops too.

    On the CPU every tensor is on the host, so the reads of what an accelerator run keeps there are left out:
    Adam's step counters (``trainer.optimizer``'s, host tensors unless capturable or fused), whatever
    ``host_work`` runs (the data draw and the latent seeds, from CPU generators on every device) and CPU_ONLY."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.step = 0  # the step being taken, the first one 1
        self.on_host = 0  # > 0 inside host_work
        self.reads: dict[int, list[str]] = defaultdict(list)

    def host_work(self, function):
        def on_host(*args, **kwargs):
            self.on_host += 1
            try:
                return function(*args, **kwargs)
            finally:
                self.on_host -= 1

        return on_host

    def record(self, what: str, tensor: object) -> None:
        counters = (state.get("step") for state in self.trainer.optimizer.state.values())
        if self.on_host or any(tensor is counter for counter in counters):
            return
        ours = [f for f in traceback.extract_stack() if "/dcign_fast/" in f.filename]
        if any(f.name in CPU_ONLY for f in ours):
            return
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(ours[-3:]))
        self.reads[self.step].append(f"{what} at {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS or (func is aten.index.Tensor and any(_is_mask(i) for i in args[1])):
            self.record(str(func), args[0])
        if func.namespace == "dcign_fast":  # a custom op, whose own ops would run unseen: with this mode on
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _is_mask(index: object) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype == torch.bool  # (its True count sets the output size)


STEPS, LOG_EVERY = 8, 3
STEADY = range(2, STEPS)  # the steps (counted from 1) after a warm-up step, before the last one (which checkpoints)


def _run(tmp_path: Path, contrast: bool, **changes: object) -> tuple[TrainConfig, Callable | None]:
    """(options, render=) of the runs below: STEPS steps logging every LOG_EVERY, with or without the identity
    contrast (with the built-in renderer, which it needs: a draw's reads are the host's, as blobs')."""
    options = {"steps": STEPS, "log_every": LOG_EVERY, "checkpoint_every": 1000, **changes}
    if contrast:
        options |= {"identity_contrast": 10.0, "contrast_identities": 2, "contrast_views": 2, "shape_bias": 1.0}
    return config(tmp_path, **options), None if contrast else blobs


@pytest.mark.parametrize("contrast", [False, True])
def test_steps_that_do_not_log_read_nothing_back_and_those_that_do_read_once(tmp_path, monkeypatch, contrast):
    options, render = _run(tmp_path, contrast)
    trainer = Trainer(options, render=render)
    syncs = HostSyncs(trainer)
    draw = trainer._draw

    def drawing(step: int):
        syncs.step = step + 1
        return draw(step)

    monkeypatch.setattr(trainer, "_draw", syncs.host_work(drawing))
    monkeypatch.setattr(dcign_fast.train.trainer, "latent_seed", syncs.host_work(dcign_fast.train.trainer.latent_seed))
    # The loss's range check reads its inputs once per accelerator (at every call on the CPU): as after a GPU's
    # first step.
    monkeypatch.setattr(dcign_fast.models.dcign, "_RANGES_CHECKED_ON", {trainer.device})
    # .tolist() reads without dispatching an op.
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor: torch.Tensor):
        syncs.record("Tensor.tolist", tensor)
        return tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    with syncs:
        trainer.train()

    logging = [step for step in STEADY if step % LOG_EVERY == 0]
    report = "\n".join(f"step {step}: {where}" for step in STEADY for where in syncs.reads[step])
    assert all(len(syncs.reads[step]) == 0 for step in STEADY if step not in logging), report
    assert all(len(syncs.reads[step]) == 1 for step in logging), report


@pytest.mark.cuda
@pytest.mark.parametrize("contrast", [False, True])
def test_gpu_steps_that_do_not_log_make_no_synchronizing_call(tmp_path, monkeypatch, contrast):
    """The test above sees reads of values on the CPU; on a GPU other calls wait for the device too (a blocking
    copy, a pageable transfer). CUDA's sync debug mode raises on them, armed for each quiet step's work after its
    draw (the built-in renderer reads its checks back by design). A first run of the same steps fills the
    autotuners' and cuDNN's per-shape caches, whose timing synchronizes once per shape."""
    options, render = _run(tmp_path, contrast, device="cuda")
    Trainer(options.updated({"out": str(tmp_path / "warm-up")}), render=render).train()
    trainer = Trainer(options, render=render)
    draw = trainer._draw

    def drawing(step: int):
        torch.cuda.set_sync_debug_mode("default")
        batches = draw(step)
        quiet = step + 1 in STEADY and (step + 1) % LOG_EVERY != 0  # (steps counted from 1)
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        return batches

    monkeypatch.setattr(trainer, "_draw", drawing)
    try:
        trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_the_counter_sees_the_reads_it_must_catch(tmp_path):
    """Each way of reading a device tensor on the host is recorded, inside a custom op too, and the host's own
    tensors are not."""
    trainer = Trainer(config(tmp_path, steps=1), render=blobs)
    syncs = HostSyncs(trainer)
    x = torch.tensor([1.0, float("nan")])
    with syncs, torch.library._scoped_library("dcign_fast", "FRAGMENT") as library:
        library.define("reads(Tensor x) -> Tensor")
        library.impl("reads", lambda x: x * x.sum().item(), "CPU")
        x[0].item()
        bool(x[0] > 0)
        torch.isfinite(x).all().item()
        x.nonzero()
        x[x > 0]
        torch.ops.dcign_fast.reads(x)
        syncs.host_work(lambda: x.sum().item())()
    assert [r.split(" at ")[0] for r in syncs.reads[0]] == [
        "aten._local_scalar_dense.default",
        "aten._local_scalar_dense.default",
        "aten._local_scalar_dense.default",
        "aten.nonzero.default",
        "aten.index.Tensor",
        "aten.item.default",
    ]


def test_what_reads_on_the_cpu_alone_does_not_elsewhere():
    from dcign_fast.ops.latent_sampler import _sparse_columns

    mu = torch.empty(4, 16, device="meta")  # (a meta tensor holds no values: any read would fail)
    assert _sparse_columns(torch.zeros(16, dtype=torch.bool, device="meta"), mu) is None
