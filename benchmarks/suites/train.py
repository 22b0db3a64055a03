"""End-to-end training steps (forward, backward, Adam) of DC-IGN's one-factor procedure.

Variants, timed side by side: ``eager reference`` (every op's reference backend: what a plain PyTorch
port does), ``dcign_fast`` (backend="auto"), and compiled variants: ``compiled reference`` (torch.compile
of the reference model), ``dcign_fast compiled`` and, on CUDA, ``dcign_fast compiled (CUDA graphs)``
(mode="reduce-overhead") and ``compiled reference (max-autotune)``. Reports images/s, the speedup over the
eager reference and peak memory (CUDA; not for the variants that replay CUDA graphs, reduce-overhead and
max-autotune, which allocate nothing on replay). Steps train on a fixed random batch; a ``renderer`` row per case
says whether rendering the same sweep on the fly on that device would keep up with the fastest eager step, and
for the first case (the goals' on a GPU) two ``train loop`` rows time dcign_fast's steps on the renderer's sweeps
drawn as the trainer draws them: in the training process, or by ``data_workers`` processes on the CPU.
dcign_fast's models are channels_last, as the trainer's are; the reference's too on CUDA, but NCHW on the
CPU (a plain port's default there), where ``eager reference (channels_last)`` shows what the layout alone
gives.

The suite runs in two passes over the cases in order of importance, so that a suite cut short by a time
limit keeps the rows that matter most: ``eager`` (no compilation) for every case, then ``compiled`` (each
compiled variant timed beside both eager ones). On CUDA the goals' case, paper150 at batch 128 in bf16,
comes first, and its first compiled variant is ``max-autotune``, the goal's baseline: the compile budget
(``DCIGN_BENCH_COMPILE_S``) is checked before each compile, and a max-autotune compile, once begun, can take
minutes, so anything after it may fall to the suite's time limit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import cast

import torch
from torch._dynamo.utils import counters

from benchmarks.harness import CompileBudget, Step, compare, time_side_by_side
from dcign_fast.data import SweepSampler
from dcign_fast.models import DCIGN, PRESETS
from dcign_fast.train.config import TrainConfig
from dcign_fast.train.data import BatchStream, default_source
from dcign_fast.train.prefetch import Prefetcher
from dcign_fast.train.procedure import unwrap

INVARIANCE = 0.01
EAGER = ("eager reference", "dcign_fast")
IN_PROCESS = "train loop, rendered in process"  # the data rows' baseline (benchmarks/report.py: BASELINES)
EAGER_PASS = "eager"  # the eager pass's label in its rows (and the pytest-benchmark front door's groups)


def cases(device: str, quick: bool) -> list[tuple[str, int, bool]]:
    """(preset, batch, bf16 autocast) in order of importance."""
    if quick:
        return [("demo64", 8, False)]
    if device == "cpu":
        return [("demo64", 64, False), ("paper150", 20, False)]
    by_batch = [("paper150", 128), ("paper150", 20), ("demo64", 64)]
    return [(preset, batch, bf16) for bf16 in (True, False) for preset, batch in by_batch]


def _train_step(model: torch.nn.Module, bf16: bool) -> tuple[Callable[[torch.Tensor], None], torch.optim.Optimizer]:
    """(one training step of ``model`` on the images it is given, its optimizer)."""
    core = unwrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.99))
    active = core.active_mask("azimuth").to(next(model.parameters()).device)

    def run(images: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            # One seed for every step: a step's work does not depend on it.
            recon, mu, logvar, _, kl = model(images, active, invariance=INVARIANCE, seed=0, return_kl=True)
        core.loss(images, recon, mu, logvar, kl=kl)["total"].backward()
        optimizer.step()

    return run, optimizer


def _step(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> Step:
    run, optimizer = _train_step(model, bf16)
    return Step(lambda: run(images), lambda: optimizer.zero_grad(set_to_none=True))


def _model(name: str, preset: str, device: str) -> torch.nn.Module:
    """Variant ``name``'s model, with the same initial weights for every variant. dcign_fast's are in
    channels_last, as the trainer's are; the reference's too on CUDA, but on the CPU only where the name
    says so: a plain PyTorch port there keeps the default NCHW."""
    torch.manual_seed(0)
    reference = "reference" in name
    model = DCIGN.from_preset(preset, backend="reference" if reference else "auto").to(device)
    if device == "cuda" or not reference or "(channels_last)" in name:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # not in the stubs
    if "compiled" not in name:
        return model
    modes = {"(max-autotune)": "max-autotune", "(CUDA graphs)": "reduce-overhead"}
    mode = next((mode for suffix, mode in modes.items() if name.endswith(suffix)), None)
    return cast(torch.nn.Module, torch.compile(model, mode=mode))  # an OptimizedModule


def eager_variants(device: str) -> tuple[str, ...]:
    """The ``eager`` pass's variants, the baseline first; on the CPU also the reference in channels_last."""
    return EAGER if device == "cuda" else (*EAGER, "eager reference (channels_last)")


def compiled_variants(device: str, goal: bool) -> list[str]:
    """The compiled variants of a case, in order; on CUDA the goal's case starts with the goal's baseline,
    max-autotune of the reference (after the others, it would find the compile budget spent)."""
    names = ["compiled reference", "dcign_fast compiled"]
    if device != "cuda":
        return names
    return (["compiled reference (max-autotune)"] if goal else []) + [*names, "dcign_fast compiled (CUDA graphs)"]


def _time_case(
    preset: str, batch: int, bf16: bool, names: tuple[str, ...], label: str, device: str, quick: bool,
    budget: CompileBudget,
) -> list[dict]:  # fmt: skip
    repeats, warmup = (2, 1) if quick else (7, 3)
    graphed = tuple(n for n in names if n.endswith(("(max-autotune)", "(CUDA graphs)")))
    timed, fields = steps(names, preset, batch, bf16, device), row(preset, batch, bf16, label)
    measured = compare(timed, device, fields, "eager reference", warmup, repeats, budget, graphed=graphed)
    for r in measured:
        if "median_ms" in r:
            r["images_per_s"] = batch / r["median_ms"] * 1e3
    return measured


def steps(names: tuple[str, ...], preset: str, batch: int, bf16: bool, device: str) -> dict[str, Step]:
    """Each named variant's training step on one fixed random batch, shared so that side by side they do the
    same work (the suite's cases and the pytest-benchmark front door's build them here alike)."""
    size = PRESETS[preset].image_size
    images = torch.rand(batch, 1, size, size, device=device)
    return {name: _step(_model(name, preset, device), images, bf16) for name in names}


def row(preset: str, batch: int, bf16: bool, label: str) -> dict:
    """The fields that name a case's rows in pass ``label`` (and its pytest-benchmark group)."""
    return {"case": f"{preset} b{batch} train step", "pass": label, "dtype": "bf16 autocast" if bf16 else "float32"}


def run(device: str, quick: bool) -> Iterator[dict]:
    todo = cases(device, quick)
    yield from _eager_pass(todo, device, quick)
    if not quick:
        yield from _compiled_pass(todo, device, CompileBudget(), goal_case=todo[0])


def _eager_pass(todo: list[tuple[str, int, bool]], device: str, quick: bool) -> Iterator[dict]:
    """The eager variants of every case, and a renderer row for each (preset, batch)."""
    rendered: set[tuple[str, int]] = set()
    for preset, batch, bf16 in todo:
        measured = _time_case(
            preset, batch, bf16, eager_variants(device), EAGER_PASS, device, quick, CompileBudget(0.0)
        )
        yield from measured
        if (preset, batch) not in rendered:
            yield _data_row(
                preset, batch, device, min((r["median_ms"] for r in measured if "median_ms" in r), default=None)
            )
            if not rendered:  # (the first case only: the goals' on a GPU)
                yield from _loop_rows(preset, batch, bf16, device, quick)
            rendered.add((preset, batch))


def _compiled_pass(
    todo: list[tuple[str, int, bool]], device: str, budget: CompileBudget, goal_case: tuple[str, int, bool]
) -> Iterator[dict]:
    """Each compiled variant of every case beside both eager ones; max-autotune only for ``goal_case``."""
    for preset, batch, bf16 in todo:
        for name in compiled_variants(device, goal=(preset, batch, bf16) == goal_case):
            label = "max-autotune" if name.endswith("(max-autotune)") else "compiled"
            if budget.spent:  # said without timing the eager variants again for nothing
                yield budget.spent_row(row(preset, batch, bf16, label), name)
                continue
            # Fresh compiled models would share dynamo's cache entries for DCIGN.forward: another case's shapes
            # would be traced as dynamic, and past dynamo's recompile limit a "compiled" row would run eagerly.
            torch._dynamo.reset()
            counters["inductor"]["cudagraph_skips"] = 0
            measured = _time_case(preset, batch, bf16, (*EAGER, name), label, device, False, budget)
            if name.endswith("(CUDA graphs)") and counters["inductor"]["cudagraph_skips"]:
                for r in measured:
                    if r["backend"] == name:  # named so in RESULTS.md and the summary; Inductor's log says why
                        r["backend"] = name.replace("(CUDA graphs)", "(CUDA graphs skipped by Inductor)")
                        r["note"] = "Inductor skipped CUDA graphs: this timed a plain compiled step"
            yield from measured


def _loop_rows(preset: str, batch: int, bf16: bool, device: str, quick: bool) -> list[dict]:
    """dcign_fast's training loop on the built-in renderer's sweeps, drawn as the trainer draws them: in the
    training process on ``device`` (data_workers=0, the default), or by CPU worker processes a few steps ahead
    (data_workers=N: half the CPU cores, at most 8; 1 in a quick run). Each timed call trains ``steps`` steps,
    the workers going on across calls, as they do within a run. The two are timed one after the other, not
    alternating: the workers would fill their queue while the other loop was timed, and then seem faster."""
    workers = 1 if quick else max(1, min(8, (os.cpu_count() or 2) // 2))
    steps = 2 if quick else 5 if device == "cpu" else 10
    config = TrainConfig(batch_size=batch)
    size, where = PRESETS[preset].image_size, torch.device(device)
    drawers = {
        IN_PROCESS: Prefetcher(_stream(config, size, where), range(1), 0, False),
        f"train loop, {workers} data worker{'s' if workers > 1 else ''}": Prefetcher(
            _stream(config, size, torch.device("cpu")), range(1), workers, pin_memory=device == "cuda"
        ),
    }
    run = _train_step(_model("dcign_fast", preset, device), bf16)[0]
    last_step = 10**9
    next_steps = {name: iter(range(last_step)) for name in drawers}

    def loop(name: str) -> None:
        for _ in range(steps):
            ((_, images, _),) = drawers[name].draw(next(next_steps[name]), last_step)
            run(images.to(device, non_blocking=True))

    try:
        repeats = 1 if quick else 3
        times = {name: time_side_by_side({name: partial(loop, name)}, device, 1, repeats)[name] for name in drawers}
    finally:
        for drawer in drawers.values():
            drawer.close()
    baseline = times[IN_PROCESS]
    return [
        {
            "case": f"{preset} b{batch} data",
            "dtype": "bf16 autocast" if bf16 else "float32",
            "backend": name,
            "median_ms": ms / steps,
            "images_per_s": batch * steps / ms * 1e3,
            "speedup": baseline / ms,
            "note": f"{steps} steps per timing, from a step's draw to its optimizer step",
        }
        for name, ms in times.items()
    ]


def _stream(config: TrainConfig, size: int, device: torch.device) -> BatchStream:
    """The trainer's sweeps of the built-in renderer, rendered on ``device``."""
    render, kinds = default_source(config, size, device)
    return BatchStream(render, config, kinds=kinds, show_progress=False)


def _data_row(preset: str, batch: int, device: str, step_ms: float | None) -> dict:
    """Does the built-in renderer keep up? One sweep batch rendered on the training device vs the fastest
    eager step of the case's first precision (None: no step ran)."""
    size = PRESETS[preset].image_size
    sampler = SweepSampler(size=size, batch_size=batch, device=device)
    counter = iter(range(10**9))
    ms = time_side_by_side({"r": lambda: sampler.batch_at(next(counter))}, device, warmup=1, repeats=3)["r"]
    if step_ms is None:
        note = "no training step ran to compare with"
    else:
        verdict = "keeps up with" if ms <= step_ms else "would stall"
        note = f"rendering on the fly {verdict} the fastest step ({step_ms:.3g} ms)"
    return {
        "case": f"{preset} b{batch} data",
        "backend": "renderer",
        "median_ms": ms,
        "images_per_s": batch / ms * 1e3,
        "note": note,
    }
