"""Promises of dcign_fast/train that no other test pinned (a mutation audit of the trainer, its checkpoints,
options, contrast, data, logs and workers): each test names what would go wrong unseen without it."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from tqdm import tqdm

from dcign_fast.train import TrainConfig, Trainer
from dcign_fast.train.checkpoint import list_checkpoints
from tests.test_contrast import contrast_config
from tests.test_train import blobs, config


def metrics(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_the_logged_losses_of_an_accumulating_step_are_the_mean_of_its_micro_batches(tmp_path: Path) -> None:
    """StepLosses.values are "each the mean over the step's micro-batches" (as two DDP ranks log their mean): a
    sum would log accumulation=2 runs at twice the scale of the same run on two ranks."""
    from dcign_fast.train.data import latent_seed
    from dcign_fast.train.procedure import batch_loss

    options = config(tmp_path, steps=1, accumulation=2)
    trainer = Trainer(options, render=blobs)
    expected, kinds = [], []
    with torch.no_grad():
        for shard in range(2):
            images, _, kind = trainer.stream.batch(0, shard)
            images = images.contiguous(memory_format=torch.channels_last)
            losses = batch_loss(trainer.model, images, kind, options, latent_seed(options.seed, 0, shard), False)
            expected.append({name: float(value) for name, value in losses.items()})
            kinds.append(kind)
    trainer.train()
    (line,) = metrics(tmp_path)
    assert line["kind"] == "+".join(kinds)
    for name in expected[0]:
        assert line[name] == pytest.approx((expected[0][name] + expected[1][name]) / 2, rel=1e-4), name


def test_under_skip_the_steps_between_reads_are_trained(tmp_path: Path) -> None:
    """on_nonfinite=skip reads every step back to decide: a finite step that neither logs nor saves is still
    taken (reading only the logged ones would leave every step between them untrained, "skipped")."""
    trainer = Trainer(config(tmp_path, steps=4, log_every=4, checkpoint_every=100, on_nonfinite="skip"), render=blobs)
    taken: list[int] = []
    trainer.optimizer.register_step_pre_hook(lambda *_: taken.append(trainer.step + 1))
    assert trainer.train().step == 4
    assert taken == [1, 2, 3, 4]


class _Clock:
    """perf_counter for the trainer: each call moves on by the next of ``spans`` (each step calls it twice, at
    its start and after its bar update, so every other span is a step's own time)."""

    def __init__(self, spans: list[float]) -> None:
        self.now, self.spans = 0.0, iter(spans)

    def __call__(self) -> float:
        self.now += next(self.spans)
        return self.now


def _timed_by(monkeypatch: pytest.MonkeyPatch, step_seconds: list[float]) -> None:
    """The trainer's steps take ``step_seconds`` each (and nothing between them), by its own clock."""
    import time

    import dcign_fast.train.trainer as trainer_module

    spans = [s for seconds in step_seconds for s in (1.0, seconds)]
    fake = types.SimpleNamespace(monotonic=time.monotonic, perf_counter=_Clock(spans))
    monkeypatch.setattr(trainer_module, "time", fake)


def test_images_per_s_is_each_log_lines_own_steps_images_over_their_time(tmp_path: Path, monkeypatch) -> None:
    """images_per_s counts the images and time since the previous line only (4 images in 1 s, then 4 in 3 s):
    not the run's average so far, and not 0 (the images trained not counted)."""
    _timed_by(monkeypatch, [1.0, 3.0])
    Trainer(config(tmp_path, steps=2, log_every=1), render=blobs).train()
    assert [line["images_per_s"] for line in metrics(tmp_path)] == [4.0, 4 / 3]


def test_images_per_s_counts_every_ranks_images(tmp_path: Path, monkeypatch) -> None:
    """Each rank trains its own sweep, and the line is rank 0's: its images/s is the whole job's, ranks x its
    own (a rank's alone would show 2 GPUs as fast as 1)."""
    import dcign_fast.train.trainer as trainer_module
    from dcign_fast.train.distributed import World

    _timed_by(monkeypatch, [2.0])
    trainer = Trainer(config(tmp_path, steps=1), render=blobs)
    for name in ("all_agree", "earliest_over_ranks"):  # no process group here: this rank's values stand
        monkeypatch.setattr(trainer_module, name, lambda value, world: value)
    monkeypatch.setattr(trainer_module, "mean_over_ranks", lambda values, world: dict(values))
    monkeypatch.setattr(trainer_module, "run_together", lambda action, world: action())
    trainer.world = World(rank=0, size=2)
    trainer.train()
    assert metrics(tmp_path)[0]["images_per_s"] == 2 * 4 / 2.0


def test_a_data_error_right_after_a_checkpoint_saves_nothing_again(tmp_path: Path, capsys) -> None:
    """A checkpoint written during train() is the one the steps since are counted from: a data error at the
    next step has nothing new to keep (and says so), rather than writing the same step again."""

    def breaks_at_step_3(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        drawn.append(kind)
        if len(drawn) == 3:
            raise OSError("cannot read sweep 3")
        return blobs(kind, generator)

    drawn: list[str] = []
    with pytest.raises(OSError, match="sweep 3"):
        Trainer(config(tmp_path, steps=4, checkpoint_every=2), render=breaks_at_step_3).train()
    said = capsys.readouterr().out
    assert "the data failed at step 3; no step was trained since its checkpoint of step 2: nothing was saved" in said
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000002"]


def test_data_workers_are_handed_the_runs_remaining_steps_and_no_more(tmp_path: Path, monkeypatch) -> None:
    """The workers render ahead "up to last_step": the run's last step, not one past it (a sweep no step
    trains on, rendered at each train() call)."""
    import dcign_fast.train.prefetch as prefetch_module

    samplers = []
    loader = prefetch_module.DataLoader

    def recording(*args: object, **kwargs: object) -> object:
        samplers.append(kwargs["sampler"])
        return loader(*args, **kwargs)

    monkeypatch.setattr(prefetch_module, "DataLoader", recording)
    trainer = Trainer(config(tmp_path, steps=3, data_workers=1, log_every=3), render=blobs)
    trainer.train()
    trainer.close()
    assert samplers == [range(0, 3)]


def test_the_seed_seeds_the_initial_weights(tmp_path: Path) -> None:
    """The seed "seeds the weights, the batches and the latent noise": two seeds start from two models, and one
    seed from the same one whatever torch's global generator held before."""
    first = Trainer(config(tmp_path / "a", seed=1), render=blobs).model.state_dict()
    torch.manual_seed(123)
    again = Trainer(config(tmp_path / "b", seed=1), render=blobs).model.state_dict()
    other = Trainer(config(tmp_path / "c", seed=2), render=blobs).model.state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["to_mu.weight"], other["to_mu.weight"])


_UNPICKLED: list[str] = []


def _record_unpickling(what: str) -> str:
    _UNPICKLED.append(what)
    return what


class _RunsCodeWhenLoaded:
    """A pickled object whose loading calls a function: what a crafted trainer.pt could do to its reader."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return _record_unpickling, ("ran",)


def test_a_trainer_state_that_would_run_code_when_loaded_is_refused_unrun(tmp_path: Path) -> None:
    """trainer.pt is "loaded weights_only": a checkpoint from elsewhere cannot run code in the process that
    resumes or evaluates from it; the file is refused as a CheckpointError instead."""
    from dcign_fast.train.checkpoint import STATE, CheckpointError, load_state

    Trainer(config(tmp_path, steps=1), render=blobs).train()
    (checkpoint,) = list_checkpoints(tmp_path / "run" / "checkpoints")
    state = torch.load(checkpoint / STATE, weights_only=True)
    torch.save({**state, "extra": _RunsCodeWhenLoaded()}, checkpoint / STATE)
    _UNPICKLED.clear()
    with pytest.raises(CheckpointError, match="trainer.pt"):
        load_state(checkpoint)
    assert _UNPICKLED == []


def test_a_weights_file_whose_write_fails_leaves_the_previous_one_whole(tmp_path: Path, monkeypatch) -> None:
    """DCIGN.save (write_weights) writes beside the file and renames: a write that fails half-way (a full disk,
    a kill) leaves the previous weights readable, never a torn file in their place."""
    import dcign_fast.train.checkpoint as checkpoint_module
    from dcign_fast.models import DCIGN

    model = DCIGN.from_preset("demo64")
    path = model.save(tmp_path / "model.safetensors")
    before = path.read_bytes()

    def torn(file: Path, state_dict: dict, model_config: dict) -> None:
        Path(file).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_weights", torn)
    with pytest.raises(OSError, match="No space left"):
        model.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_contrast_term_enters_the_loss_times_its_weight() -> None:
    """identity_contrast is "the weight of an InfoNCE term": the total is the paper's loss of the sweep alone
    plus that weight times the logged term (unweighted, a weight of 300 would train as one of 1)."""
    from dcign_fast.models import DCIGN
    from dcign_fast.train.data import default_source
    from dcign_fast.train.procedure import batch_loss

    options = contrast_config()
    render, _ = default_source(options, 64, torch.device("cpu"))
    images, _, kind = render("azimuth", torch.Generator().manual_seed(0))
    model = DCIGN.from_preset("demo64")
    with torch.no_grad():
        losses = batch_loss(model, images, kind, options, seed=7, plain=False)
        paper = batch_loss(model, images[:6], kind, options.updated({"identity_contrast": 0.0}), seed=7, plain=False)
    assert float(losses["contrast"]) > 0
    expected = float(paper["total"]) + 300.0 * float(losses["contrast"])
    assert float(losses["total"]) == pytest.approx(expected, rel=1e-5)


def test_as_many_contrast_views_as_the_sweep_has_images_are_allowed() -> None:
    """contrast_views "must be at most batch_size": every view of the sweep may be contrasted."""
    assert contrast_config(contrast_views=6).contrast_views == 6


# One change of each option that alters what a run computes (all but RUN_CONTROLS; identity_contrast and data
# cannot go with a render= callable, which the trainer refuses before it reads a checkpoint).
_RESULT_CHANGES = {
    "preset": "face128", "pretrain_steps": 5, "batch_size": 5, "accumulation": 2, "lr": 1e-3, "betas": (0.5, 0.9),
    "adam_eps": 1e-6, "grad_clip": 1.0, "disentangle": False, "clamp": "first", "invariance": 0.5,
    "shape_bias": 2.0, "kind_weights": {"light": 2.0}, "contrast_identities": 2, "contrast_views": 4,
    "contrast_temperature": 0.5, "contrast_mixed_views": True, "seed": 1, "bf16": True, "data_pool": 1,
}  # fmt: skip


def test_a_resume_refuses_a_change_of_any_option_that_alters_the_results(tmp_path: Path) -> None:
    """A resume "continues the run exactly": of the options outside RUN_CONTROLS, every one changed is refused
    by name (a resume taking another lr, say, would continue as another run under this one's name)."""
    from dcign_fast.train.config import RUN_CONTROLS

    untested = TrainConfig.option_names() - set(RUN_CONTROLS) - set(_RESULT_CHANGES)
    assert untested == {"identity_contrast", "data"}
    Trainer(config(tmp_path, steps=1), render=blobs).train()
    for option, value in _RESULT_CHANGES.items():
        with pytest.raises(ValueError, match=f"differ from its newest checkpoint: {option}="):
            Trainer(config(tmp_path, steps=2, **{option: value}), resume=True, render=blobs)


def test_a_resume_may_take_other_data_workers(tmp_path: Path) -> None:
    """data_workers changes where batches are drawn, not which (they are a pure function of seed, step, shard):
    a run may continue with more or fewer workers."""
    Trainer(config(tmp_path, steps=1), render=blobs).train()
    trainer = Trainer(config(tmp_path, steps=2, data_workers=1), resume=True, render=blobs)
    assert trainer.train().step == 2
    trainer.close()


def test_the_other_identities_are_never_the_sweeps_own() -> None:
    """with_contrast_images draws identities "distinct from the sweep's": with 3 others out of 4 identities
    they must be exactly the three the sweep does not show (its own among them would be a positive scored as a
    negative). Among 10,000 identities a slip shows once in thousands of sweeps; here at once."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.train.contrast import with_contrast_images

    sampler = SweepSampler(size=16, batch_size=4, num_identities=4)
    shown: list[dict[str, torch.Tensor]] = []
    render = sampler.render
    sampler.render = lambda factors: shown.append(factors) or render(factors)
    batch = with_contrast_images(sampler, identities=3, views=2)
    owners = set()
    for seed in range(12):
        shown.clear()
        _, factors, _ = batch("azimuth", torch.Generator().manual_seed(seed))
        own = int(factors["identity"][0])
        owners.add(own)
        assert sorted(set(shown[-1]["identity"].tolist())) == sorted({0, 1, 2, 3} - {own}), seed
    assert len(owners) > 1  # (more than one sweep identity was tried)


def test_the_contrast_term_trains_the_sweeps_own_codes_too() -> None:
    """Each image of the sweep is an anchor and a candidate of the InfoNCE term: its gradient reaches the
    sweep's images' encodings, not only the other identities' (detached, the sweep would learn nothing from
    it)."""
    from dcign_fast.models import DCIGN
    from dcign_fast.train.data import default_source
    from dcign_fast.train.procedure import batch_loss

    options = contrast_config()
    render, _ = default_source(options, 64, torch.device("cpu"))
    images, _, kind = render("light", torch.Generator().manual_seed(0))
    images.requires_grad_()
    losses = batch_loss(DCIGN.from_preset("demo64"), images, kind, options, seed=7, plain=False)
    (grad,) = torch.autograd.grad(losses["contrast"], images)
    assert grad[:6].abs().sum() > 0 and grad[6:].abs().sum() > 0


def test_the_latent_noise_is_not_drawn_from_the_batchs_own_stream() -> None:
    """latent_seed is "independent of the data draw": its stream is LATENT_NOISE, not the shard's batch
    stream, whose first draw picks the batch's kind (the noise would follow the kind drawn)."""
    from dcign_fast.train.data import latent_seed, shard_generator

    for step, shard in [(0, 0), (5, 1), (123, 3)]:
        from_batches = int(torch.randint(0, 2**62, (1,), generator=shard_generator(0, step, shard)))
        assert latent_seed(0, step, shard) != from_batches


def test_kind_odds_are_probabilities_in_the_options_ratios(tmp_path: Path) -> None:
    """kind_odds is each kind's "probability": 1:1:1:shape_bias, kind_weights overriding, summing to 1."""
    from dcign_fast.train.procedure import kind_odds

    odds = kind_odds(config(tmp_path, shape_bias=5.0, kind_weights={"light": 2.0}))
    assert odds == pytest.approx({"azimuth": 1 / 9, "elevation": 1 / 9, "light": 2 / 9, "intrinsic": 5 / 9})


def test_a_pool_is_drawn_from_whole(tmp_path: Path) -> None:
    """data_pool > 0 pre-renders that many sweeps per kind "and draws from them": steps draw every one of a
    kind's pooled sweeps, not always the same one."""
    from dcign_fast.train.data import BatchStream

    options = config(tmp_path, data_pool=3, kind_weights={"elevation": 0.0, "light": 0.0}, shape_bias=0.0)
    stream = BatchStream(blobs, options, show_progress=False)
    pooled = stream.pool["azimuth"]
    drawn = {next(i for i, pool in enumerate(pooled) if stream.batch(step, 0)[0] is pool[0]) for step in range(30)}
    assert drawn == {0, 1, 2}


def test_progress_pictures_show_the_same_batches_at_every_step(tmp_path: Path) -> None:
    """save_progress_images shows "one fixed batch per kind": the pictures of successive steps compare the
    model's progress on the same images."""
    from dcign_fast.train.data import BatchStream
    from dcign_fast.train.logs import _fixed_batch

    stream = BatchStream(blobs, config(tmp_path), show_progress=False)
    for kind in stream.kinds:
        assert torch.equal(_fixed_batch(stream, kind), _fixed_batch(stream, kind)), kind


def test_data_workers_share_the_cache_read_before_they_start(tmp_path: Path) -> None:
    """With data_workers a cache is read whole in the trainer, before the workers fork and share it: none of
    them reads (and keeps its own copy of) a shard afterwards. Moved away once the trainer is built, the cache
    still trains."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.cache import write_cache

    write_cache(list(SweepSampler(size=64, batch_size=4, num_batches=4, seed=3)), tmp_path / "cache")
    trainer = Trainer(config(tmp_path, steps=2, data=str(tmp_path / "cache"), data_workers=1))
    (tmp_path / "cache").rename(tmp_path / "moved")
    assert trainer.train().step == 2
    trainer.close()


def test_a_rank_on_another_node_takes_its_local_gpu() -> None:
    """Under torchrun on several nodes a rank's GPU is LOCAL_RANK's (rank 5 is the second GPU of its node)."""
    from dcign_fast.train.distributed import World, training_device

    world = World(rank=5, size=8, local_rank=1)
    assert training_device(torch.device("cuda"), world) == torch.device("cuda", 1)


def _closing_worker(rank: int, store: str, out: str) -> None:
    import time

    import torch.distributed as dist

    from dcign_fast.train.distributed import World, close_world

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(1.0)  # (still writing the last checkpoint, say)
    start = time.monotonic()
    close_world(World(rank=rank, size=2), together=True)
    Path(out, f"{rank}.json").write_text(json.dumps({"waited": time.monotonic() - start}))


def test_ranks_closing_together_wait_for_each_other(tmp_path: Path) -> None:
    """close_world(together=True) "first waits for the others": a rank that tore its group down while another
    still wrote the last checkpoint could abort gloo. (2 gloo processes)"""
    from tests.test_distributed import _run_two_ranks

    waited = [result["waited"] for result in _run_two_ranks(_closing_worker, tmp_path)]
    assert waited[1] > 0.5


def _drawn_images(drawn: list[tuple[int, torch.Tensor, str]]) -> list[torch.Tensor]:
    return [images for _, images, _ in drawn]


def test_workers_start_over_where_the_steps_asked_for_jump(tmp_path: Path) -> None:
    """The workers hand out steps "in order (and started over where a run jumps)": drawing step 5 after step 0
    gives step 5's batches, without a close() between (as train() does)."""
    from dcign_fast.train.data import BatchStream
    from dcign_fast.train.prefetch import Prefetcher

    stream = BatchStream(blobs, config(tmp_path), show_progress=False)
    prefetcher = Prefetcher(stream, range(1), workers=1, pin_memory=False)
    in_process = Prefetcher(stream, range(1), workers=0, pin_memory=False)
    try:
        for step in (0, 5, 6):
            got, expected = _drawn_images(prefetcher.draw(step, 9)), _drawn_images(in_process.draw(step, 9))
            assert all(torch.equal(a, b) for a, b in zip(got, expected)), step
    finally:
        prefetcher.close()


def test_a_data_worker_ignores_a_signal_meant_for_the_trainer(tmp_path: Path) -> None:
    """A worker "ignores Ctrl-C and SIGTERM" (they reach the whole process group, and the trainer answers them
    with a checkpoint): one that died of them would fail the draws after those it had rendered ahead."""
    import multiprocessing
    import os
    import signal
    import time

    from dcign_fast.train.data import BatchStream
    from dcign_fast.train.prefetch import Prefetcher

    stream = BatchStream(blobs, config(tmp_path), show_progress=False)
    prefetcher = Prefetcher(stream, range(1), workers=1, pin_memory=False)
    before = set(multiprocessing.active_children())
    try:
        prefetcher.draw(0, 9)
        workers = [child for child in multiprocessing.active_children() if child not in before]
        assert len(workers) == 1
        for signum in (signal.SIGINT, signal.SIGTERM):
            os.kill(workers[0].pid, signum)
        time.sleep(0.3)
        assert workers[0].is_alive()
        for step in range(1, 10):  # (past the steps rendered ahead before the signals)
            assert len(prefetcher.draw(step, 9)) == 1, step
    finally:
        prefetcher.close()


def test_progress_pictures_show_up_to_8_images_of_each_kind(tmp_path: Path, monkeypatch) -> None:
    """The reconstruction picture shows the first 8 images of each kind's fixed batch (of 10 here) over their
    reconstructions: a picture of a few would say little of the model's progress."""
    import dcign_fast.train.logs as logs_module

    def ten_blobs(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        images, factors = zip(*(blobs(kind, generator) for _ in range(3)))
        return torch.cat(images)[:10], {kind: torch.cat([f[kind] for f in factors])[:10]}

    grids = []
    save_grid = logs_module.save_grid
    monkeypatch.setattr(
        logs_module, "save_grid", lambda path, rows, *a, **k: grids.append(rows) or save_grid(path, rows, *a, **k)
    )
    Trainer(config(tmp_path, steps=1, batch_size=10, image_every=1), render=ten_blobs).train()
    assert [len(row) for row in grids[0]] == [8] * 8  # 4 kinds, each its images and their reconstructions


def test_an_interrupted_run_exits_130(tmp_path: Path, monkeypatch) -> None:
    """The command line's "130 interrupted (a checkpoint was saved: relaunch with --resume)": a job loop tells
    a run stopped by Ctrl-C or SIGTERM from one that finished (0)."""
    import signal

    from dcign_fast.train.cli import run_training
    from tests.test_train import signal_at_batch

    train = Trainer.train

    def interrupted_at_its_first_batch(self: Trainer) -> object:
        signal_at_batch(self, 1, signal.SIGINT)
        return train(self)

    monkeypatch.setattr(Trainer, "train", interrupted_at_its_first_batch)
    code, trainer, result = run_training(config(tmp_path, steps=3, threads=1), resume=False)
    assert result.interrupted and result.step == 1 and code == 130


def test_a_resume_on_other_threads_warns_that_the_bits_will_differ(tmp_path: Path, recwarn) -> None:
    """On the CPU the threads split the kernels' sums, so a checkpoint records them: a resume on another
    number warns that its weights will not be bit-identical to an uninterrupted run's (whatever this machine's
    default number of threads)."""
    threads = torch.get_num_threads()
    try:
        Trainer(config(tmp_path, steps=1, threads=1), render=blobs).train()
        Trainer(config(tmp_path, steps=2, threads=2), resume=True, render=blobs)
    finally:
        torch.set_num_threads(threads)
    said = [str(w.message) for w in recwarn if "other floating-point rounding" in str(w.message)]
    assert len(said) == 1 and "threads 2 (before: 1)" in said[0]


def test_the_stored_options_are_the_newest_checkpoints(tmp_path: Path) -> None:
    """A command-line resume takes the newest checkpoint's options (stored_config): a run continued with more
    steps keeps its new length at its next resume, not the first checkpoint's."""
    from dcign_fast.train.trainer import stored_config

    Trainer(config(tmp_path, steps=2, checkpoint_every=1, keep_checkpoints=5), render=blobs).train()
    options = config(tmp_path, steps=3, checkpoint_every=1, keep_checkpoints=5)
    Trainer(options, resume=True, render=blobs).train()
    assert len(list_checkpoints(tmp_path / "run" / "checkpoints")) == 3
    stored = stored_config(tmp_path / "run")
    assert stored is not None and stored.steps == 3


def test_a_resume_puts_back_a_step_a_crashed_re_save_left_half_renamed(tmp_path: Path) -> None:
    """The trainer that takes the run folder's lock repairs what a killed save left (recover_checkpoints): the
    step a re-save had renamed to .old-... is put back under its own name, and the .tmp-... of a save cut short
    is deleted. Without it the step stays hidden (a later prune or save of that step would not see it) and
    every crash's leftovers would pile up, a checkpoint's size each."""
    Trainer(config(tmp_path, steps=2), render=blobs).train()
    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000002").rename(root / ".old-step-00000002-999999")
    (root / ".tmp-step-00000003-999999").mkdir()
    trainer = Trainer(config(tmp_path, steps=3), resume=True, render=blobs)
    assert trainer.step == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002"]


class _Bar(tqdm):
    """The trainer's progress bar, keeping where each bar stood when it was closed."""

    closed_at: ClassVar[list[int]] = []

    def close(self) -> None:
        if not self.disable:
            _Bar.closed_at.append(self.n)
        super().close()


def test_a_resumed_runs_bar_counts_on_from_the_resumed_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar's total is the run's steps, so it must start at the step resumed from: starting at 0, a resumed
    run's bar ends short of its total (2/4 after finishing) and its time estimate is off by the steps before."""
    import dcign_fast.train.trainer as trainer_module

    Trainer(config(tmp_path, steps=2), render=blobs).train()
    monkeypatch.setattr(trainer_module, "tqdm", _Bar)
    _Bar.closed_at.clear()
    assert Trainer(config(tmp_path, steps=4), resume=True, render=blobs).train().step == 4
    assert _Bar.closed_at[0] == 4


@pytest.mark.parametrize("option", ["out", "data"])
def test_an_out_or_data_of_blanks_is_refused_as_empty(option: str) -> None:
    """out and data name folders: one of spaces only is a slip (an unset shell variable in "$OUT "), and taken
    as given the run would write into, or read from, a folder named by blanks, hard to see in a listing."""
    with pytest.raises(ValueError, match=f"{option} must not be empty"):
        TrainConfig(**{option: "  "})
