"""The trainer: exact resume after a real kill, atomic and validated checkpoints, NaN handling,
Ctrl-C, distributed == accumulated, logs and pictures."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dcign_fast.models import DCIGN
from dcign_fast.train import TrainConfig, Trainer
from dcign_fast.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, recover_checkpoints
from dcign_fast.train.data import default_source
from tests.helpers import assert_trained_alike

FAST = ["batch_size=4", "log_every=1", "image_every=1000", "threads=1", "device=cpu"]


def blobs(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """A cheap stand-in renderer: a bright square whose position follows the swept factor."""
    images = torch.rand(4, 1, 64, 64, generator=generator) * 0.1
    shift = torch.randint(0, 40, (4,), generator=generator)
    for i, s in enumerate(shift.tolist()):
        images[i, 0, 10:30, s : s + 20] += 0.8
    return images.clamp(0, 1), {kind: shift.float()}


def config(tmp_path: Path, **changes) -> TrainConfig:
    values = {
        "out": str(tmp_path / "run"),
        "steps": 4,
        "batch_size": 4,
        "checkpoint_every": 2,
        "log_every": 1,
        "image_every": 1000,
        "device": "cpu",
    }
    return TrainConfig.from_dict({**values, **changes})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


def run_cli(out: Path, steps: int, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "dcign_fast.train", "--out", str(out), "--steps", str(steps)]
    args += [a for s in FAST + ["checkpoint_every=10"] for a in ("--set", s)] + list(extra)
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


@pytest.mark.slow
def test_resume_after_a_real_kill_is_exact(tmp_path):
    straight = run_cli(tmp_path / "straight", 20)
    assert straight.wait(timeout=300) == 0, straight.stdout.read().decode()

    killed = run_cli(tmp_path / "killed", 20, "--set", "checkpoint_every=10")
    first = tmp_path / "killed" / "checkpoints" / "step-00000010"
    deadline = time.time() + 300
    while not first.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert list_checkpoints(tmp_path / "killed" / "checkpoints")[0].name == "step-00000010"

    resumed = run_cli(tmp_path / "killed", 20, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read().decode()
    a = weights(tmp_path / "straight" / "checkpoints" / "step-00000020")
    b = weights(tmp_path / "killed" / "checkpoints" / "step-00000020")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_data_error_mid_run_saves_the_steps_trained_and_a_resume_continues_exactly(tmp_path, capsys):
    """A corrupt file first drawn at step 6 (checkpoints every 4) lost step 5: the error stopped the run without
    a checkpoint. The batch is drawn before any of the step's work, so the state is step 5's and is saved."""
    from dcign_fast.data.folders import DatasetError

    def breaks_at_step_6(kind, generator):
        if len(drawn) == 5:
            raise DatasetError("cannot read image sweep/007.png: truncated")
        drawn.append(kind)
        return blobs(kind, generator)

    drawn: list[str] = []
    with pytest.raises(DatasetError, match="007.png"):
        Trainer(config(tmp_path / "a", steps=8, checkpoint_every=4), render=breaks_at_step_6).train()
    assert "the data failed at step 6; checkpoint: " in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "run" / "checkpoints")][-1] == "step-00000005"
    resumed = Trainer(config(tmp_path / "a", steps=8, checkpoint_every=4), resume=True, render=blobs).train()
    straight = Trainer(config(tmp_path / "b", steps=8, checkpoint_every=4), render=blobs).train()
    a, b = weights(resumed.checkpoint), weights(straight.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("failing", ["progress pictures", "metrics log"])
def test_a_picture_or_log_that_cannot_be_written_saves_the_steps_trained_and_a_resume_continues_exactly(
    tmp_path, capsys, monkeypatch, failing
):
    """A picture or metrics line that failed to be written (a read-only images folder) stopped the run without
    the steps since the last checkpoint (4), which a data error saves: step 6's work was lost."""
    from dcign_fast.train import trainer as trainer_module
    from dcign_fast.train.logs import MetricsLog

    def fails_at_step_6(original):
        def write(*args, **kwargs):
            if trainer.step == 6:
                raise PermissionError("images/step-00000006.png: read-only")
            return original(*args, **kwargs)

        return write

    if failing == "progress pictures":
        monkeypatch.setattr(
            trainer_module, "save_progress_images", fails_at_step_6(trainer_module.save_progress_images)
        )
    else:
        monkeypatch.setattr(MetricsLog, "write", fails_at_step_6(MetricsLog.write))
    trainer = Trainer(config(tmp_path / "a", steps=8, checkpoint_every=4, image_every=3), render=blobs)
    with pytest.raises(PermissionError, match="read-only"):
        trainer.train()
    said = capsys.readouterr().out
    assert f"the {failing} failed at step 6 (" in said and " again); checkpoint: " in said
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "run" / "checkpoints")][-1] == "step-00000006"
    monkeypatch.undo()
    resumed = Trainer(config(tmp_path / "a", steps=8, checkpoint_every=4, image_every=3), resume=True, render=blobs)
    straight = Trainer(config(tmp_path / "b", steps=8, checkpoint_every=4, image_every=3), render=blobs)
    a, b = weights(resumed.train().checkpoint), weights(straight.train().checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_when_the_checkpoint_of_the_steps_trained_fails_too_the_first_error_is_raised(tmp_path, capsys, monkeypatch):
    """On a full disk the pictures fail and so does the checkpoint after them: the error is the pictures' (what
    went wrong first), and what happened to the steps is said."""
    from dcign_fast.train import trainer as trainer_module

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_progress_images", no_space)
    monkeypatch.setattr(trainer_module, "save_checkpoint", no_space)
    with pytest.raises(OSError, match="No space left") as raised:
        Trainer(config(tmp_path, steps=4, image_every=3, checkpoint_every=10), render=blobs).train()
    assert [entry.name for entry in raised.traceback[-2:]] == ["_save_progress_images", "no_space"]
    said = capsys.readouterr().out
    assert (
        "the progress pictures failed at step 3 (they will not be drawn again); saving the steps since the last "
        in said
    )
    assert "(OSError: [Errno 28] No space left on device)" in said


def test_a_rank_that_cannot_be_reached_is_not_blamed_on_the_data_and_no_save_is_tried(tmp_path, capsys, monkeypatch):
    """A rank killed under torchrun was reported as "the data failed at step N; saving the steps since the last
    checkpoint failed too (...)", its long message twice: the draw was the first exchange to miss it."""
    from dcign_fast.train.distributed import LostRankError

    trainer = Trainer(config(tmp_path, steps=4, checkpoint_every=10), render=blobs)
    draw = trainer._draw

    def rank_lost_at_step_3(step):
        if step == 2:
            raise LostRankError("the ranks could not exchange their state (Connection closed by peer)")
        return draw(step)

    monkeypatch.setattr(trainer, "_draw", rank_lost_at_step_3)
    with pytest.raises(LostRankError, match="Connection closed by peer"):
        trainer.train()
    assert "failed" not in capsys.readouterr().out
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_a_resume_restores_torchs_global_rng_for_a_render_that_draws_from_it(tmp_path):
    """The library draws nothing from the global RNG after the initial weights, but a render= callable may
    ignore its generator: the checkpoint's rng state makes the resumed run draw what the straight run drew.
    (No test failed when the resume skipped restoring it: a checkpoint field nothing checked.)"""

    def global_blobs(kind, generator):
        return blobs(kind, None)  # (torch.rand without a generator: the global one)

    straight = Trainer(config(tmp_path / "b", steps=8, checkpoint_every=4), render=global_blobs).train()
    Trainer(config(tmp_path / "a", steps=4, checkpoint_every=4), render=global_blobs).train()
    torch.rand(1000)  # (what the process drew in between must not matter either)
    resumed = Trainer(config(tmp_path / "a", steps=8, checkpoint_every=4), resume=True, render=global_blobs).train()
    a, b = weights(resumed.checkpoint), weights(straight.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_data_error_before_any_step_saves_nothing_so_the_run_can_start_afresh(tmp_path, capsys):
    """A checkpoint of step 0 (nothing trained) kept the folder from a rerun once the data was mended: without
    --resume it held checkpoints, with it the data option differed."""

    def wrong_layout(kind, generator):
        images, factors = blobs(kind, generator)
        return images[:, 0], factors

    with pytest.raises(ValueError, match=r"images as a tensor \[B, 1, S, S\], got shape \(4, 64, 64\)"):
        Trainer(config(tmp_path, steps=2), render=wrong_layout).train()
    assert (
        "the data failed at step 1; no step was trained since the start: nothing was saved" in capsys.readouterr().out
    )
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []
    assert Trainer(config(tmp_path, steps=2), render=blobs).train().step == 2
    failing = Trainer(config(tmp_path, steps=4), resume=True, render=wrong_layout)  # resumed at step 2
    with pytest.raises(ValueError, match="images as a tensor"):
        failing.train()
    assert "no step was trained since its checkpoint of step 2: nothing was saved" in capsys.readouterr().out


def test_checkpoints_are_complete_pruned_and_loadable(tmp_path):
    trainer = Trainer(config(tmp_path, steps=6, keep_checkpoints=2), render=blobs)
    result = trainer.train()
    names = [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-00000004", "step-00000006"] and result.checkpoint.name == "step-00000006"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "run" / "checkpoints").iterdir())
    run = tmp_path / "run"  # a run folder and its checkpoints folder mean their newest checkpoint
    for path in (result.checkpoint, result.checkpoint / "model.safetensors", run, run / "checkpoints"):
        model = DCIGN.from_checkpoint(path)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trainer.model.state_dict().items())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"images_per_s"' in lines[0]


def test_saving_a_step_again_replaces_it_and_crash_leftovers_go(tmp_path):
    from dcign_fast.train.checkpoint import save_checkpoint

    root = tmp_path / "checkpoints"
    (root / ".tmp-step-00000003-999999").mkdir(parents=True)  # a save that crashed in another process
    model = DCIGN.from_preset("demo64")
    state = {"step": 3, "optimizer": {"state": {}, "param_groups": []}, "rng": torch.get_rng_state(), "config": {}}
    for value in (1.0, 2.0):
        weights = {k: torch.full_like(v, value) for k, v in model.state_dict().items()}
        path = save_checkpoint(root, 3, weights, model.config.to_dict(), state, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003"]
    assert all((t == 2.0).all() for t in load_checkpoint(path)[0].values())
    # A crash between a re-save's two renames leaves the step only as .old-...: listing names that folder
    # without touching it (a save may be under way), the lock's holder puts it back.
    old = root / ".old-step-00000003-999999"
    path.rename(old)
    assert list_checkpoints(root) == [old] and load_checkpoint(old)[2]["step"] == 3 and old.exists()
    recover_checkpoints(root)
    assert list_checkpoints(root) == [path] and load_checkpoint(path)[2]["step"] == 3


def test_a_save_that_fails_cleans_up_and_names_the_intact_checkpoint(tmp_path, monkeypatch):
    """A full disk: the failed save removes what it wrote (a retry finds that space free again), leftovers of
    crashed saves go before a save writes, and the error names the newest complete checkpoint."""
    import dcign_fast.train.checkpoint as checkpoint_module
    from dcign_fast.train.checkpoint import save_checkpoint

    model = DCIGN.from_preset("demo64")
    state = {"step": 1, "optimizer": {"state": {}, "param_groups": []}, "rng": torch.get_rng_state(), "config": {}}
    first = save_checkpoint(tmp_path, 1, model.state_dict(), model.config.to_dict(), state, keep=2)
    (tmp_path / ".tmp-step-00000002-999999").mkdir()  # a save that crashed in another process

    def full_disk(obj, f):
        Path(f).write_bytes(b"part of a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    words = r"could not write checkpoint .*step-00000002 \(OSError: .*No space left on device; \d+ MiB free there\)"
    with pytest.raises(CheckpointError, match=rf"{words}; the newest complete one, {re.escape(str(first))}, is intact"):
        save_checkpoint(tmp_path, 2, model.state_dict(), model.config.to_dict(), state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_weights_that_do_not_fit_their_config_are_a_checkpoint_error(tmp_path):
    """A layer renamed, or a model option this version lacks (another version's file, or an edited one): a
    CheckpointError naming the file, which the command line reports in one line, from loading and resuming."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    Trainer(config(tmp_path), render=blobs).train()
    path = list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["renamed.bias"] = tensors.pop("decoder.0.bias")
    save_file(tensors, str(path), metadata=metadata)
    words = r"model.safetensors do not fit the model their config describes: .*Missing key\(s\).*decoder\.0\.bias"
    with pytest.raises(CheckpointError, match=words):
        DCIGN.from_checkpoint(tmp_path / "run")
    with pytest.raises(CheckpointError, match=words):
        Trainer(config(tmp_path, steps=6), resume=True, render=blobs)
    model_config = {**json.loads(metadata["dcign_config"]), "attention_heads": 4}
    save_file(tensors, str(path), metadata={**metadata, "dcign_config": json.dumps(model_config)})
    words = r"model.safetensors hold a model config this version cannot build: .*attention_heads"
    with pytest.raises(CheckpointError, match=words):
        DCIGN.from_checkpoint(tmp_path / "run")


def test_the_wrong_file_is_named_as_such_not_as_corrupt(tmp_path):
    from safetensors.torch import save_file

    Trainer(config(tmp_path), render=blobs).train()
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    with pytest.raises(CheckpointError, match="trainer.pt is not a weights file"):
        DCIGN.from_checkpoint(newest / "trainer.pt")
    save_file({"w": torch.ones(2)}, str(tmp_path / "someone-elses.safetensors"))
    with pytest.raises(CheckpointError, match="holds no DC-IGN config"):
        DCIGN.from_checkpoint(tmp_path / "someone-elses.safetensors")


def test_corrupt_checkpoint_is_a_clear_error_and_the_previous_one_survives(tmp_path):
    Trainer(config(tmp_path), render=blobs).train()
    older, newest = list_checkpoints(tmp_path / "run" / "checkpoints")
    data = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(newest)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        DCIGN.from_checkpoint(newest)
    assert load_checkpoint(older)[2]["step"] == 2
    (newest / "trainer.pt").write_bytes(b"not a checkpoint")
    (newest / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match="trainer.pt is corrupt"):
        load_checkpoint(newest)


def test_a_checkpoint_whose_parts_disagree_or_lack_keys_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file

    from dcign_fast.models import PRESETS
    from dcign_fast.train.checkpoint import save_weights

    checkpoint = Trainer(config(tmp_path, steps=2), render=blobs).train().checkpoint
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    no_optimizer = {k: v for k, v in state.items() if k != "optimizer"}
    for broken, missing in ((no_optimizer, "'optimizer'"), ([1], "'config', 'optimizer', 'rng', 'step'")):
        torch.save(broken, checkpoint / "trainer.pt")  # a KeyError (or "list indices") deep in the trainer before
        with pytest.raises(CheckpointError, match=rf"trainer.pt lacks \[{missing}\]: not a dcign-fast"):
            Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    # Parts of the wrong kind (an edited or foreign file): a KeyError, torch's "Expected a CPUGeneratorImplState of
    # size 5056", an AttributeError, int('x'), or the step taken as it was (-5), before.
    damaged = [
        ({"optimizer": {}}, r"its optimizer must be an optimizer's state_dict, got a dict with keys \[\]"),
        ({"rng": torch.zeros(3, dtype=torch.uint8)}, r"its rng must be .* got shape \(3,\) torch.uint8"),
        ({"config": [1]}, "its config must be a mapping of training options, got a list"),
        ({"step": "x"}, "its step must be an integer >= 0, got 'x'"),
        ({"step": -5}, "its step must be an integer >= 0, got -5"),
    ]
    for change, words in damaged:
        torch.save({**state, **change}, checkpoint / "trainer.pt")
        with pytest.raises(CheckpointError, match=f"{checkpoint / 'trainer.pt'}.* {words}"):
            Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    # Options this version refuses: every checkpoint of the run holds them, so not a damaged one (no hint).
    torch.save({**state, "config": {**state["config"], "steps": -1}}, checkpoint / "trainer.pt")
    with pytest.raises(ValueError, match="trainer.pt holds options this version refuses: steps must be >= 1, got -1$"):
        Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    torch.save(state, checkpoint / "trainer.pt")
    # Weights of another model beside this run's state: a size-mismatch traceback from load_state_dict before.
    weights = load_file(str(checkpoint / "model.safetensors"))
    save_weights(checkpoint / "model.safetensors", weights, PRESETS["face128"].to_dict())
    with pytest.raises(CheckpointError, match="its weights are not of the model its trainer.pt describes"):
        Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    # Asking for another preset is a changed option, named as such (the options are compared first).
    with pytest.raises(ValueError, match="options differ .*preset='face128'"):
        Trainer(config(tmp_path, steps=4, preset="face128"), resume=True, render=blobs)


def test_a_damaged_newest_checkpoint_names_the_one_a_resume_could_start_from(tmp_path, capsys):
    from dcign_fast.cli import main

    Trainer(config(tmp_path), render=blobs).train()
    older, newest = list_checkpoints(tmp_path / "run" / "checkpoints")
    (newest / "trainer.pt").write_bytes(b"not a checkpoint")
    words = f"to resume from the checkpoint before it, {older.name}, move {newest} away"
    with pytest.raises(CheckpointError, match=re.escape(words)):
        Trainer(config(tmp_path, steps=6), resume=True, render=blobs)
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "6", "--resume"]) == 2  # (reads it first)
    assert words in capsys.readouterr().err
    shutil.move(newest, tmp_path / "damaged")
    assert Trainer(config(tmp_path, steps=6), resume=True, render=blobs).step == 2


def test_weights_that_are_not_floating_point_are_refused(tmp_path):
    """load_state_dict casts int or bool weights to float32 without a word."""
    from safetensors.torch import load_file

    from dcign_fast.train.checkpoint import save_weights

    checkpoint = Trainer(config(tmp_path, steps=2), render=blobs).train().checkpoint
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights["decoder.0.bias"] = weights["decoder.0.bias"].int()
    save_weights(checkpoint / "model.safetensors", weights, DCIGN.from_preset("demo64").config.to_dict())
    with pytest.raises(CheckpointError, match=r"must be floating-point, but \['decoder.0.bias'\] are not"):
        DCIGN.from_checkpoint(checkpoint)


def test_resume_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="resume must be True or False, got 'no'"):  # ("no" resumed)
        Trainer(config(tmp_path, steps=4), resume="no", render=blobs)


def test_resume_under_another_number_of_processes_is_refused(tmp_path):
    # Each step's sweeps are shards rank x accumulation + micro-batch: another world size changes the run.
    checkpoint = Trainer(config(tmp_path, steps=2), render=blobs).train().checkpoint
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    assert state["world_size"] == 1
    torch.save({**state, "world_size": 2}, checkpoint / "trainer.pt")
    with pytest.raises(ValueError, match=r"trained on 2 process\(es\) and this resume has 1"):
        Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    del state["world_size"]  # as earlier versions wrote it: nothing to compare
    torch.save(state, checkpoint / "trainer.pt")
    assert Trainer(config(tmp_path, steps=4), resume=True, render=blobs).step == 2


def test_a_file_where_the_run_keeps_a_folder_is_refused_before_training(tmp_path):
    # The checkpoints folder as a file failed at the first save, losing the steps before it.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(NotADirectoryError, match="checkpoints is a file, where the run keeps a folder"):
        Trainer(config(tmp_path), render=blobs)
    (tmp_path / "out").write_text("x")
    with pytest.raises(NotADirectoryError, match="out=.*out is a file"):
        Trainer(config(tmp_path, out=str(tmp_path / "out")), render=blobs)
    # The pictures' folder failed at the first picture ("[Errno 17] File exists"), the log and lock unnamed.
    (tmp_path / "run" / "checkpoints").unlink()
    (tmp_path / "run" / "images").write_text("x")
    with pytest.raises(NotADirectoryError, match="out=.*images is a file, where the run keeps a folder"):
        Trainer(config(tmp_path), render=blobs)
    (tmp_path / "run" / "images").unlink()
    for name in ("metrics.jsonl", ".lock"):
        (tmp_path / "run" / name).mkdir()
        with pytest.raises(IsADirectoryError, match=f"out=.*{re.escape(name)} is a folder, where the run keeps a file"):
            Trainer(config(tmp_path), render=blobs)
        (tmp_path / "run" / name).rmdir()


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    Trainer(config(tmp_path, steps=2), render=blobs).train()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(config(tmp_path, steps=2), render=blobs)


def test_nan_loss_stops_without_touching_the_last_checkpoint(tmp_path):
    Trainer(config(tmp_path, steps=2), render=blobs).train()
    before = (tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors").read_bytes()
    trainer = Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    with torch.no_grad():
        trainer.model.to_mu.weight.fill_(float("nan"))
    from dcign_fast.train.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="at step 3;"):  # the step after checkpoint step-00000002
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000002"]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors").read_bytes() == before


def test_nan_loss_can_skip_the_step(tmp_path):
    trainer = Trainer(config(tmp_path, steps=2, on_nonfinite="skip"), render=blobs)
    with torch.no_grad():
        trainer.model.to_mu.bias.fill_(float("inf"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.train().step == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("found_by", ["log", "interrupt"])
def test_a_nan_step_between_reads_is_named_when_the_losses_are_read_back(tmp_path, found_by):
    """Steps that neither log nor save read nothing back (tests/test_host_syncs.py): a NaN at step 2 is found at
    the next read (step 3's log line, or the checkpoint of an interrupt at step 2's end), which names step 2
    and writes nothing."""
    from dcign_fast.train.trainer import NonFiniteLossError

    trainer = Trainer(config(tmp_path, steps=6, log_every=3, checkpoint_every=100), render=blobs)
    original, taking = trainer.stream.batch, [0]

    def noting_the_step(step, shard):
        taking[0] = step + 1
        return original(step, shard)

    trainer.stream.batch = noting_the_step
    if found_by == "interrupt":
        signal_at_batch(trainer, 2, signal.SIGINT)
    trainer.model.to_mu.register_forward_hook(lambda module, inputs, mu: mu * float("nan") if taking[0] == 2 else mu)
    with pytest.raises(NonFiniteLossError, match="at step 2;"):
        trainer.train()
    # The model in memory may hold step 2's weights: neither saved nor trained on (save() wrote NaN weights).
    for again in (trainer.save, trainer.train):
        with pytest.raises(NonFiniteLossError, match="at step 2;"):
            again()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


def signal_at_batch(trainer: Trainer, call: int, *signals: int) -> None:
    """Makes the trainer's ``call``-th batch fetch send this process ``signals``."""
    calls, original = [0], trainer.stream.batch

    def batch_then_signal(step, shard):
        calls[0] += 1
        if calls[0] == call:
            for s in signals:
                os.kill(os.getpid(), s)
        return original(step, shard)

    trainer.stream.batch = batch_then_signal


def test_interrupt_saves_a_checkpoint_and_returns(tmp_path):
    trainer = Trainer(config(tmp_path, steps=50, checkpoint_every=100), render=blobs)
    signal_at_batch(trainer, 3, signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)
    result = trainer.train()
    assert result.interrupted and result.step == 3 and result.checkpoint.name == "step-00000003"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_a_later_second_interrupt_quits_at_once(tmp_path, monkeypatch):
    """A second signal after the grace period quits without saving; signals within it are one request
    delivered twice (under torchrun a worker gets the terminal's Ctrl-C, or a scheduler's SIGTERM, and then
    the same signal forwarded by torchrun) and still save."""
    import dcign_fast.train.trainer as trainer_module

    trainer = Trainer(config(tmp_path, steps=50, checkpoint_every=2), render=blobs)
    signal_at_batch(trainer, 3, signal.SIGTERM, signal.SIGTERM)
    result = trainer.train()
    assert result.interrupted and result.checkpoint.name == "step-00000003"

    monkeypatch.setattr(trainer_module, "REPEATED_SIGNAL_GRACE_S", 0.0)  # as if the second came a while later
    trainer = Trainer(config(tmp_path, steps=50, checkpoint_every=2), resume=True, render=blobs)
    signal_at_batch(trainer, 3, signal.SIGINT, signal.SIGINT)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="received again"):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is before
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-00000004"


def test_progress_images_are_written(tmp_path):
    Trainer(config(tmp_path, steps=2, image_every=2), render=blobs).train()
    images = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
    assert images == ["recon-00000002.png", "sweeps-00000002.png"]


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: demo64\nsteps: 7\nlr: 0.001\n")
    c = TrainConfig.from_yaml(path).override(["steps=9", "clamp=first", "kind_weights={elevation: 3}"])
    assert (c.steps, c.lr, c.clamp, c.kind_weights) == (9, 0.001, "first", {"elevation": 3})
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="clamp must be one of"):
        TrainConfig(clamp="median")
    with pytest.raises(TypeError, match="config must be a TrainConfig .*got dict"):
        Trainer({"steps": 1})


@pytest.mark.parametrize(
    "assignment, error, words",
    [
        ("steps=2.5", TypeError, "steps must be int, got 2.5"),
        ("batch_size=abc", TypeError, "batch_size must be int"),
        ("compile=1", TypeError, "compile must be bool"),
        ("betas=0.9", TypeError, "betas must be two numbers"),
        ("kind_weights={azmuth: 5}", ValueError, r"unknown batch kinds \['azmuth'\]"),
        ("kind_weights={light: two}", TypeError, r"kind_weights\['light'\] must be a number, got 'two'"),
        ("kind_weights=[1, 2]", TypeError, "kind_weights must map batch kinds to numbers"),
        ("lr", ValueError, "expects key=value"),
        (f"lr={10**400}", TypeError, "lr must be float"),  # too large for a float
    ],
)
def test_option_types_are_checked(assignment, error, words):
    with pytest.raises(error, match=words):
        TrainConfig().override([assignment])
    assert TrainConfig().override(["lr=1", "grad_clip=null"]).lr == 1.0  # ints become floats; None allowed
    assert TrainConfig().override(["time_limit_s=3e3"]).time_limit_s == 3000.0  # YAML's "3e3" is a string
    read = TrainConfig().override(["kind_weights={azimuth: 1e-3}", "betas=[0.9, 1e-3]"])  # so are these
    assert read.kind_weights == {"azimuth": 0.001} and read.betas == (0.9, 0.001)


def test_numpy_numbers_become_python_floats(tmp_path):
    """A numpy scalar stored in the options would make the checkpoint unreadable (weights_only load)."""
    import numpy as np

    config = TrainConfig(kind_weights={"light": np.float32(2.5)}, betas=(np.float64(0.9), 0.99), lr=np.float32(1))
    assert all(type(v) is float for v in (config.kind_weights["light"], *config.betas, config.lr))
    torch.save(config.to_dict(), tmp_path / "options.pt")
    assert TrainConfig.from_stored(torch.load(tmp_path / "options.pt", weights_only=True)) == config


@pytest.mark.parametrize(
    "assignment, words",
    [
        ("grad_clip=-100", r"grad_clip must be > 0 and finite, or null, got -100.0"),  # would ascend the loss
        ("pretrain_steps=-4", "pretrain_steps must be >= 0, got -4"),
        ("data_pool=-4", "data_pool must be >= 0"),
        ("shape_bias=-1", r"shape_bias must be in \[0, 3.4\d*e\+38\) and finite, got -1"),
        ("kind_weights={light: .inf}", r"kind_weights\['light'\] must be in \[0, .*\) and finite, got inf"),
        ("kind_weights={light: -1}", r"kind_weights\['light'\] must be in \[0, .*\) and finite, got -1"),
        (f"kind_weights={{light: {10**400}}}", r"kind_weights\['light'\] must be .* got an int too large"),
        ("time_limit_s=-1", "time_limit_s must be >= 0 and finite, or null"),
        ("lr=-1", "lr must be >= 0 and finite"),
        ("lr=.inf", "lr must be >= 0 and finite"),
        ("adam_eps=0", "adam_eps must be > 0"),
        ("invariance=.nan", r"invariance must be in \[0, 3.4\d*e\+38\) and finite, got nan"),
        ("invariance=1e39", r"invariance must be in \[0, 3.4\d*e\+38\) and finite, got 1e\+39"),  # (refused at step 1)
        ("betas=[0.9, 1.5]", r"betas must be in \[0, 1\) and finite"),
        ("threads=-1", r"threads must be in \[0, 1025\)"),
        ("seed=268435456", "seed must be in"),
        ("steps=0", "steps must be >= 1"),
        (f"steps=-{10**400}", "steps must be >= 1"),
        ("device=foo", "device must be 'auto', cpu, cuda or cuda:N, got 'foo'"),
        ("device=meta", "device must be 'auto', cpu, cuda or cuda:N, got 'meta'"),  # bincount failed in torch
        ("device=mps", "device must be 'auto', cpu, cuda or cuda:N, got 'mps'"),
        ("on_nonfinite=skpi", "on_nonfinite must be one of"),  # a typo must not mean one policy or the other
        ("clamp=median", "clamp must be one of"),
        ("lr=[1", "--set lr=\\[1 is not valid YAML"),
        ("backend=gpu", r"backend must be one of .*got 'gpu'"),  # (was refused only by the Trainer)
    ],
)
def test_option_ranges_are_checked_up_front(assignment, words):
    """Out-of-range values fail when the options are read, naming the option and its range, not later in
    Adam or the sampler (after the run folder exists), nor silently (a negative grad_clip flips gradients)."""
    with pytest.raises(ValueError, match=words):
        TrainConfig().override([assignment])


def test_zero_stays_allowed_where_it_means_off():
    c = TrainConfig().override(["threads=0", "data_pool=0", "pretrain_steps=0", "time_limit_s=0", "shape_bias=0"])
    assert (c.threads, c.data_pool, c.time_limit_s, c.shape_bias) == (0, 0, 0.0, 0)
    assert TrainConfig().override(["lr=0", "seed=-5"]).seed == -5  # runs begun so still resume


@pytest.mark.parametrize("seed", [-(2**27), 2**28 - 1])
def test_the_extreme_seeds_draw_batches(seed):
    """The batch and noise generators are drawn at the extremes of the run's seed range."""
    from dcign_fast.train.config import OPTION_BOUNDS
    from dcign_fast.train.data import latent_seed, shard_generator

    assert OPTION_BOUNDS["seed"].admits(seed) and not OPTION_BOUNDS["seed"].admits(seed - 1 if seed < 0 else seed + 1)
    shard_generator(seed, 10**6, 7)
    latent_seed(seed, 10**6, 7)
    assert TrainConfig().override(["grad_clip=null", "time_limit_s=null"]).grad_clip is None
    render, _ = default_source(TrainConfig(seed=seed, batch_size=2), 16, torch.device("cpu"))  # the built-in renderer
    images = render("azimuth", shard_generator(seed, 0, 0))[0]
    assert images.shape == (2, 1, 16, 16)


def test_no_two_shards_or_steps_share_a_stream_and_evaluation_never_draws_trainings():
    """torch's CPU generator keeps 32 bits of its seed: (seed * 1_000_003 + step) * 65_537 + shard wrapped,
    and step t + 65_535 of shard 1 drew step t of shard 0's batch. Training seeds are even, held-out odd."""
    from dcign_fast.data.seeds import BATCHES, EVAL_SWEEPS, stream_generator
    from dcign_fast.train.data import latent_seed, shard_generator

    def draws(generator: torch.Generator) -> torch.Tensor:
        return torch.rand(4, generator=generator)

    for step in (3, 10**6):
        assert not torch.equal(draws(shard_generator(0, step + 65_535, 1)), draws(shard_generator(0, step, 0)))
    seeds = [shard_generator(s, t, r).initial_seed() for s in (-5, 0, 7) for t in range(50) for r in range(3)]
    assert len(set(seeds)) == len(seeds) and all(seed % 2 == 0 for seed in seeds)
    held_out = [stream_generator(EVAL_SWEEPS, 0, i, held_out=True).initial_seed() for i in range(50)]
    assert all(seed % 2 == 1 for seed in held_out)
    assert stream_generator(BATCHES, 0, 3, 1).initial_seed() == shard_generator(0, 3, 1).initial_seed()
    assert latent_seed(0, 3, 1) != latent_seed(0, 3, 2)


def test_every_numeric_option_has_bounds():
    """A new numeric option must get its range in OPTION_BOUNDS, or it would go unchecked."""
    from dcign_fast.train.config import OPTION_BOUNDS

    numeric = {f.name for f in dataclasses.fields(TrainConfig) if re.match(r"(int|float|tuple\[float)", f.type)}
    assert numeric == set(OPTION_BOUNDS)


def test_malformed_yaml_file_is_a_value_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("a: [")
    with pytest.raises(ValueError, match=re.escape(f"{path} is not valid YAML: ") + ".*line 1"):
        TrainConfig.read_yaml(path)
    path.write_bytes(b"\xff\xfe steps: 3")  # (Python's message named neither the file nor what it must be)
    with pytest.raises(ValueError, match=re.escape(f"{path} must be a YAML text file (UTF-8): invalid start byte")):
        TrainConfig.read_yaml(path)


def test_resuming_a_finished_run_says_nothing_was_trained(tmp_path, capsys):
    from dcign_fast.cli import main

    Trainer(config(tmp_path, steps=2), render=blobs).train()
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--resume"]) == 0
    assert "already at step 2 >= steps 1: nothing was trained" in capsys.readouterr().err


def test_resume_keeps_the_checkpoint_options_and_refuses_changes(tmp_path):
    from dcign_fast.train.cli import build_parser, config_from_args

    Trainer(config(tmp_path, steps=2, seed=5, lr=1e-3), render=blobs).train()
    parser = build_parser()
    out = str(tmp_path / "run")
    resumed = config_from_args(parser.parse_args(["--out", out, "--steps", "4", "--resume", "--set", "threads=1"]))
    assert (resumed.seed, resumed.lr, resumed.batch_size, resumed.steps, resumed.threads) == (5, 1e-3, 4, 4, 1)
    fresh = config_from_args(parser.parse_args(["--out", out, "--steps", "4"]))
    assert (fresh.seed, fresh.lr) == (0, 5e-4)  # without --resume the defaults apply (and the trainer refuses)
    assert Trainer(resumed, resume=True, render=blobs).train().step == 4
    with pytest.raises(ValueError, match=r"seed=6 \(checkpoint: 5\)"):
        Trainer(config(tmp_path, steps=6, seed=6, lr=1e-3), resume=True, render=blobs)
    # A moved run resumes where it was found, not in the folder its checkpoint names.
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    moved = config_from_args(parser.parse_args(["--out", str(tmp_path / "moved"), "--steps", "6", "--resume"]))
    assert (moved.out, moved.seed) == (str(tmp_path / "moved"), 5)


def test_device_flag_sets_the_option_and_leaves_a_resumed_runs_own_alone(tmp_path):
    from dcign_fast.train.cli import build_parser, config_from_args

    parser = build_parser()
    out = str(tmp_path / "run")
    assert config_from_args(parser.parse_args(["--out", out, "--device", "cpu"])).device == "cpu"
    assert config_from_args(parser.parse_args(["--out", out])).device == "auto"
    Trainer(config(tmp_path, steps=1, device="cpu"), render=blobs).train()
    assert config_from_args(parser.parse_args(["--out", out, "--resume"])).device == "cpu"
    assert "data_pool" in parser.format_help()  # the options --set takes are listed


def test_resume_without_a_checkpoint_warns(tmp_path):
    with pytest.warns(UserWarning, match="holds no checkpoint"):
        Trainer(config(tmp_path, steps=1), resume=True, render=blobs)


def test_infinite_gradient_is_caught_like_a_nan_loss(tmp_path):
    from dcign_fast.train.trainer import NonFiniteLossError

    trainer = Trainer(config(tmp_path, steps=2), render=blobs)
    trainer.model.to_logvar.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(NonFiniteLossError, match="gradient became NaN or infinite at step 1;"):
        trainer.train()
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_time_limit_stops_with_a_checkpoint(tmp_path):
    result = Trainer(config(tmp_path, steps=10_000, checkpoint_every=10_000, time_limit_s=0.0), render=blobs).train()
    assert not result.interrupted and result.timed_out and result.step == 0
    assert result.checkpoint.name == "step-00000000"


def test_only_the_main_rank_says_where_a_run_stopped(tmp_path, capsys):
    """Under torchrun every rank runs train(): the others said it once more each, naming no checkpoint."""
    from dcign_fast.train.distributed import World

    for rank, said in ((1, 0), (0, 1)):
        trainer = Trainer(config(tmp_path / str(rank), time_limit_s=0.0), render=blobs)
        trainer.world = World(rank=rank)
        trainer.train()
        printed = capsys.readouterr()
        assert (printed.out + printed.err).count("time limit of 0 s reached at step 0; continue with --resume") == said


def test_a_timed_out_run_exits_75_so_a_job_loop_can_tell_it_from_a_finished_one(tmp_path):
    from dcign_fast.cli import main

    options = ["--set", "time_limit_s=0", "--set", "device=cpu", "--set", "batch_size=4"]
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "5", *options]) == 75
    # The limit is each launch's own: a resume that gives none finishes (the stored 0 stopped every resume at once).
    more = ["--set", "log_every=1", "--set", "image_every=1000", "--set", "threads=1"]
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--resume", *more]) == 0
    assert load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])[2]["step"] == 2


@pytest.mark.parametrize("bf16", [True, False])
def test_bf16_autocast_runs_the_convolutions_in_bf16(tmp_path, bf16):
    """bf16=True must reach the layers: a trainer that ignored it (autocast disabled) trained in float32 and
    passed every other test. Every encoder convolution and decoder unpool-conv runs in the chosen precision,
    and the weights stay float32."""
    from dcign_fast.nn import UnpoolConv2d

    trainer = Trainer(config(tmp_path, steps=2, bf16=bf16), render=blobs)
    seen: set[torch.dtype] = set()
    layers = [m for m in trainer.model.modules() if isinstance(m, (torch.nn.Conv2d, UnpoolConv2d))]
    assert any(isinstance(m, UnpoolConv2d) for m in layers) and any(isinstance(m, torch.nn.Conv2d) for m in layers)
    for layer in layers:
        layer.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    result = trainer.train()
    assert result.step == 2 and result.checkpoint.name == "step-00000002"
    assert seen == {torch.bfloat16 if bf16 else torch.float32}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


@pytest.mark.slow
def test_a_compiled_run_trains_as_the_eager_one_and_saves_plain_checkpoints(tmp_path):
    # Adam with a huge epsilon is SGD: plain Adam would turn compile's rounding differences in near-zero
    # gradients into full-size steps.
    sgd = {"steps": 2, "adam_eps": 1e6, "lr": 1000.0, "accumulation": 2}
    eager = weights(Trainer(config(tmp_path / "eager", **sgd), render=blobs).train().checkpoint)
    compiled_run = Trainer(config(tmp_path / "compiled", compile=True, **sgd), render=blobs)
    # (under the model's own names, not the compiled wrapper's)
    assert_trained_alike(weights(compiled_run.train().checkpoint), eager)
    resumed = Trainer(config(tmp_path / "compiled", **{**sgd, "steps": 3}), resume=True, render=blobs)
    assert resumed.train().step == 3  # an eager run continues a compiled one


@pytest.mark.parametrize("precision", [True, False])
def test_resume_keeps_the_precision_in_effect(tmp_path, precision):
    # bf16=None means "bf16 on a GPU": the checkpoint records what ran, so a run moved between devices
    # continues in its own precision.
    default = Trainer(config(tmp_path / "default", steps=1), render=blobs).train()
    assert load_checkpoint(default.checkpoint)[2]["config"]["bf16"] is False  # resolved on the CPU, not None
    Trainer(config(tmp_path, steps=1, bf16=precision), render=blobs).train()
    resumed = Trainer(config(tmp_path, steps=2), resume=True, render=blobs)
    assert resumed.bf16 is precision
    with pytest.raises(ValueError, match=f"bf16={not precision} \\(checkpoint: {precision}\\)"):
        Trainer(config(tmp_path, steps=2, bf16=not precision), resume=True, render=blobs)


def test_channels_last_unless_switched_off(tmp_path):
    # On the CPU too: oneDNN's convolutions and pooling run faster in channels_last (see the trainer).
    assert Trainer(config(tmp_path / "default", steps=1), render=blobs).memory_format == torch.channels_last
    assert Trainer(config(tmp_path / "off", steps=1, channels_last=False), render=blobs).memory_format is None


def test_resume_from_a_checkpoint_that_did_not_record_its_precision(tmp_path):
    checkpoint = Trainer(config(tmp_path, steps=1), render=blobs).train().checkpoint
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    state["config"]["bf16"] = None  # as checkpoints of earlier versions stored it
    torch.save(state, checkpoint / "trainer.pt")
    assert Trainer(config(tmp_path, steps=2, bf16=False), resume=True, render=blobs).bf16 is False


def test_progress_images_of_a_dataset_with_intrinsic_sweeps_only(tmp_path):
    """The sweeps grid's face came from an extrinsic sweep: a dataset without any raised StopIteration at the
    first image step, before that step's checkpoint was written."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.folders import export_sweeps

    batch = SweepSampler(size=64, batch_size=4).batch("intrinsic", torch.Generator().manual_seed(0))
    export_sweeps([batch], tmp_path / "data")
    config = TrainConfig(out=str(tmp_path / "run"), steps=1, batch_size=4, data=str(tmp_path / "data"), image_every=1)
    Trainer(config).train()
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "run" / "images").iterdir()) == ["recon", "sweeps"]


@pytest.mark.runs_without_triton
@pytest.mark.parametrize("backend", ["triton", "cuda"], ids=["triton_backend", "cuda_backend"])  # (-m cuda: GPU)
def test_a_gpu_backend_on_a_cpu_run_is_refused_before_anything_is_written(backend, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("DCIGN_FAST_CUDA_EMULATION", raising=False)
    with pytest.raises(ValueError, match=f"backend='{backend}' needs"):
        Trainer(TrainConfig(out=str(tmp_path / "run"), backend=backend, device="cpu", data_pool=5))
    assert not (tmp_path / "run").exists()


def test_a_step_is_checkpointed_before_its_pictures_are_drawn(tmp_path, monkeypatch):
    """Drawing the progress pictures can fail (a full disk): the step's checkpoint is already written."""
    import dcign_fast.train.trainer as trainer_module

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer_module, "save_progress_images", full_disk)
    config = TrainConfig(out=str(tmp_path / "run"), steps=1, batch_size=2, image_every=1, data_pool=1)
    with pytest.raises(OSError, match="No space left"):
        Trainer(config).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000001"]


def test_folder_sweeps_of_another_size_are_used_whole_and_counted_as_they_are(tmp_path):
    """batch_size was silently ignored with folder data, and images/s computed from it (5x too high here)."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.folders import export_sweeps

    export_sweeps([SweepSampler(size=64, batch_size=4).batch("azimuth", torch.Generator().manual_seed(0))], tmp_path)
    trainer = Trainer(TrainConfig(out=str(tmp_path / "run"), steps=1, data=str(tmp_path), batch_size=20))
    with pytest.warns(UserWarning, match=r"batch_size=20 does not apply .* used whole \(4 images here\)"):
        trainer.train()
    assert trainer._forward_backward(1, trainer._draw(1)).images == 4


def test_a_one_image_folder_sweep_is_refused_when_disentangling(tmp_path):
    """TrainConfig refuses batch_size=1 with disentangle=true (no batch mean to clamp to), but folder sweeps of
    one image trained with only the batch-size warning: a plain VAE step, silently."""
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.folders import export_sweeps

    export_sweeps([SweepSampler(size=64, batch_size=1).batch("light", torch.Generator().manual_seed(0))], tmp_path)
    with pytest.raises(ValueError, match=r"data=.* gave a light sweep of 1 image: with disentangle=true a sweep needs"):
        Trainer(TrainConfig(out=str(tmp_path / "run"), steps=1, data=str(tmp_path))).train()
    plain = TrainConfig(out=str(tmp_path / "plain"), steps=1, data=str(tmp_path), disentangle=False, batch_size=1)
    assert Trainer(plain).train().step == 1


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"grad_clip": -1.0}, "grad_clip must be > 0"),  # trained by gradient ascent, silently
        ({"batch_size": 1}, "batch_size must be >= 2 with disentangle=true"),
        ({"log_every": 0}, "log_every must be >= 1"),  # a ZeroDivisionError after the first step
        ({"accumulation": 0}, "accumulation must be >= 1"),
        ({"out": ""}, "out must not be empty"),  # wrote into the current folder
        ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1"),
        ({"steps": "2"}, "steps must be int"),
    ],
)
def test_a_config_edited_after_it_was_made_is_checked_by_the_trainer(edit, words, tmp_path):
    """TrainConfig checked itself when made only; the trainer took an edited one as it was."""
    edited = config(tmp_path)
    for option, value in edit.items():
        setattr(edited, option, value)
    with pytest.raises((TypeError, ValueError), match=re.escape(words)):
        Trainer(edited, render=blobs)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "returns, words",
    [
        (lambda images, factors: (images,), " sweep is a tuple of 1; render(kind, generator) must return (images"),
        (lambda images, factors: images, " sweep is a Tensor; render(kind, generator) must return (images"),
        (lambda images, factors: (images[:, 0], factors), "images as a tensor [B, 1, S, S], got shape (4, 64, 64)"),
        (lambda images, factors: (images.numpy(), factors), "images as a tensor [B, 1, S, S], got ndarray"),
        (lambda images, factors: (images, list(factors)), "factors as a dict of [B] tensors, got list"),
        (lambda images, factors: (images[:0], factors), "gave an empty"),  # a ZeroDivisionError in the loss
        (lambda images, factors: (images[:1], factors), "sweep of 1 image: with disentangle=true"),  # trained plain
    ],
)
def test_what_a_render_callable_returns_is_checked_by_name(returns, words, tmp_path):
    def render(kind, generator):
        return returns(*blobs(kind, generator))

    with pytest.raises((TypeError, ValueError), match=r"render\(kind, generator\).*" + re.escape(words)):
        Trainer(config(tmp_path, data_pool=1), render=render)  # the pool's sweeps, checked as they are drawn


def test_the_samplers_batch_serves_as_a_render_callable(tmp_path):
    """SweepSampler.batch returns (images, factors, kind); the trainer refused its third value."""
    from dcign_fast.data import SweepSampler

    render = SweepSampler(size=64, batch_size=4).batch
    assert Trainer(config(tmp_path, steps=1), render=render).train().step == 1


def test_a_render_that_is_not_a_function_or_beside_a_data_folder_is_refused(tmp_path):
    with pytest.raises(TypeError, match="render must be a function"):
        Trainer(config(tmp_path), render=3)  # failed at step 1, after a checkpoint of step 0
    # data would be recorded in the checkpoints but not read, and a resume without render= would read it.
    with pytest.raises(ValueError, match="render= replaces the data source: leave data at 'render'"):
        Trainer(config(tmp_path, data=str(tmp_path)), render=blobs)


def test_kind_weights_with_a_key_that_is_not_text_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"kind_weights names unknown batch kinds \[1\]"):
        TrainConfig(kind_weights={1: 1.0, "light": 2.0})  # a TypeError from sorting an int with a str


def test_training_from_a_cache_equals_training_from_the_same_sweeps_in_folders(tmp_path):
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.cache import write_cache
    from dcign_fast.data.folders import export_sweeps

    sampler = SweepSampler(size=64, batch_size=4, num_batches=6, seed=3)
    batches = list(sampler)
    write_cache(batches, tmp_path / "cache", batches_per_shard=4)
    export_sweeps(batches, tmp_path / "folders")
    losses = {}
    for source, workers in (("cache", 0), ("folders", 0), ("cache", 2)):  # (2 workers: the cache loaded whole)
        run = tmp_path / f"run-{source}-{workers}"
        options = {"steps": 3, "checkpoint_every": 3, "data": str(tmp_path / source), "data_workers": workers}
        Trainer(config(run, **options)).train()
        lines = (run / "run" / "metrics.jsonl").read_text().splitlines()
        losses[source, workers] = [json.loads(line)["total"] for line in lines]
    # The same batches, picked in the same order.
    assert losses["cache", 0] == losses["folders", 0] == losses["cache", 2]


def test_a_cache_of_another_image_size_is_refused_by_name(tmp_path):
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.cache import write_cache

    write_cache(SweepSampler(size=32, batch_size=2, num_batches=1), tmp_path / "cache")
    with pytest.raises(ValueError, match=r"data=.*cache holds 32px images but this model takes 64px"):
        Trainer(config(tmp_path, data=str(tmp_path / "cache"))).train()


def test_a_resume_names_the_dataset_in_any_spelling_but_not_another_one(tmp_path, monkeypatch):
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.cache import write_cache

    monkeypatch.chdir(tmp_path)
    for name in ("cache", "other"):
        write_cache(SweepSampler(size=64, batch_size=4, num_batches=2), tmp_path / name)
    Trainer(config(tmp_path, steps=2, data="cache"), render=None).train()
    assert Trainer(config(tmp_path, steps=3, data="./cache/"), resume=True).step == 2
    assert Trainer(config(tmp_path, steps=3, data=str(tmp_path / "cache")), resume=True).step == 2
    other = re.escape(str(tmp_path.resolve() / "other"))
    with pytest.raises(ValueError, match=rf"data='{other}' \(checkpoint: '.*/cache'\)"):
        Trainer(config(tmp_path, steps=3, data="other"), resume=True)


def test_a_cache_whose_writing_stopped_is_named_as_such(tmp_path):
    from dcign_fast.data import SweepSampler
    from dcign_fast.data.cache import write_cache

    write_cache(SweepSampler(size=64, batch_size=2, num_batches=1), tmp_path / "cache")
    (tmp_path / "cache" / "index.json").unlink()  # written last
    with pytest.raises(ValueError, match=r"data=.*cache holds cache shards but no index.json: its render --format"):
        Trainer(config(tmp_path, data=str(tmp_path / "cache"))).train()


def test_batches_differ_between_steps_and_follow_the_kind_odds(tmp_path):
    from dcign_fast.train.data import BatchStream

    odds = {"azimuth": 1.0, "elevation": 9.0, "light": 0.0, "intrinsic": 0.0}
    stream = BatchStream(blobs, config(tmp_path, kind_weights=odds), show_progress=False)
    assert not torch.equal(stream.batch(0, 0)[0], stream.batch(1, 0)[0])
    kinds = [stream.batch(step, 0)[2] for step in range(400)]
    assert set(kinds) == {"azimuth", "elevation"} and 0.84 < kinds.count("elevation") / 400 < 0.96


def test_every_step_and_shard_draws_its_own_noise():
    from dcign_fast.train.data import latent_seed

    assert len({latent_seed(0, step, shard) for step in range(3) for shard in range(3)}) == 9


def test_the_procedure_options_reach_the_sampler(tmp_path, monkeypatch):
    """pretrain_steps plain-VAE steps first (no mask), then clamped batches; clamp as set, and the invariance
    divided by the batch size, as the loss is (the option is relative to the loss summed over the batch, as
    the paper's 1/100 is)."""
    import dcign_fast.models.dcign as dcign_module

    calls, sample_latents = [], dcign_module.sample_latents

    def spy(mu, logvar, active=None, **kwargs):
        calls.append((active is None, kwargs["clamp"], kwargs["invariance"]))
        return sample_latents(mu, logvar, active, **kwargs)

    monkeypatch.setattr(dcign_module, "sample_latents", spy)
    changes = {"steps": 3, "pretrain_steps": 1, "clamp": "first", "invariance": 0.25, "checkpoint_every": 3}
    Trainer(config(tmp_path, **changes), render=blobs).train()
    pull = 0.25 / 4  # batch_size 4
    assert calls == [(True, "first", pull), (False, "first", pull), (False, "first", pull)]


def test_grad_clip_bounds_the_gradient_norm_the_optimizer_sees(tmp_path):
    trainer = Trainer(config(tmp_path, steps=2, grad_clip=1e-3), render=blobs)
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer.optimizer.register_step_pre_hook(record)
    trainer.train()
    assert len(norms) == 2 and all(0.999e-3 <= n <= 1.0001e-3 for n in norms)  # clipped, not zeroed


def test_accumulated_gradient_is_the_mean_of_the_micro_batches(tmp_path):
    """Invariance pull included (a strong one, so that a pull counted twice would show): the mean of each
    micro-batch's gradient as a step of its own would give it, as DDP's average over ranks does."""
    from dcign_fast.train.data import latent_seed
    from dcign_fast.train.procedure import batch_loss

    options = config(tmp_path, steps=1, accumulation=2, grad_clip=None, channels_last=False, invariance=5.0)
    trainer = Trainer(options, render=blobs)
    model = DCIGN.from_preset(options.preset, backend=options.backend)
    model.load_state_dict(trainer.model.state_dict())
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    one_batch = dataclasses.replace(options, accumulation=1)
    for shard in range(2):
        model.zero_grad()
        images, _, kind = trainer.stream.batch(0, shard)
        seed = latent_seed(options.seed, 0, shard)
        batch_loss(model, images, kind, one_batch, seed, plain=False)["total"].backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad / 2
    seen = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: seen.update({name: p.grad.clone() for name, p in trainer.model.named_parameters()})
    )
    trainer.train()
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, rtol=1e-3, atol=1e-3 * float(grad.abs().max()))


@pytest.mark.parametrize("change", [{"invariance": 0.5}, {"clamp": "first"}, {"pretrain_steps": 3}, {"grad_clip": 1.0}])
def test_resume_refuses_a_change_of_the_training_procedure(tmp_path, change):
    Trainer(config(tmp_path, steps=1), render=blobs).train()
    with pytest.raises(ValueError, match=f"differ from its newest checkpoint: {next(iter(change))}="):
        Trainer(config(tmp_path, steps=2, **change), resume=True, render=blobs)


def test_resume_starts_from_the_newest_checkpoint_and_drops_later_metrics(tmp_path):
    """Killed after step 4 was logged but before its checkpoint: resume at step 2 and log 3 and 4 once."""
    Trainer(config(tmp_path, steps=4, checkpoint_every=2), render=blobs).train()
    assert Trainer(config(tmp_path, steps=6), resume=True, render=blobs).step == 4
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-00000004")
    Trainer(config(tmp_path, steps=4), resume=True, render=blobs).train()
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_a_trainer_on_a_run_folder_another_process_trains_in_is_refused(tmp_path):
    """Two processes writing one folder would interleave their checkpoints; a new one would empty the
    metrics. (Trainers of one process share the lock: they run one after another.) The other process holds
    the folder as a trainer does, with run_folder_lock: two shared locks would not exclude each other."""
    Trainer(config(tmp_path, steps=2), render=blobs).train()
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with held_by_another_process(tmp_path / "run"):
        for resume in (False, True):
            with pytest.raises(BlockingIOError, match="another trainer is writing"):
                Trainer(config(tmp_path, steps=4), resume=resume, render=blobs)
    # Refused before anything was read or trimmed (a new run's MetricsLog used to empty metrics.jsonl).
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    inspected = Trainer(config(tmp_path, steps=4), resume=True, render=blobs)  # free again; shared in-process
    assert Trainer(config(tmp_path, steps=4), resume=True, render=blobs).train().step == 4
    assert inspected.step == 2


@contextlib.contextmanager
def held_by_another_process(run: Path) -> Iterator[None]:
    """``run`` locked as a trainer in another process holds it (two locks of one process would be one)."""
    hold = (
        "import sys, time; from dcign_fast.train.lock import run_folder_lock; lock = run_folder_lock(sys.argv[1]); "
        "lock.__enter__(); print(1, flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_trainer_s_forked_children_do_not_hold_its_lock(tmp_path):
    """DataLoader workers, forked while the trainer held the lock, shared its open file: killed with them still
    winding down, the trainer left its folder locked for seconds, and an immediate --resume was refused."""
    (tmp_path / "run").mkdir()
    script = (
        "import multiprocessing, os, sys, time; from dcign_fast.train.lock import run_folder_lock\n"
        "with run_folder_lock(sys.argv[1]):\n"
        "    child = multiprocessing.get_context('fork').Process(target=time.sleep, args=(60,)); child.start()\n"
        "    print(child.pid, flush=True); os._exit(0)  # as a SIGKILL leaves it: nothing unlocked"
    )
    trainer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")], stdout=subprocess.PIPE)
    child = int(trainer.stdout.readline())  # (read, not waited for: the child holds the pipe too)
    try:
        assert trainer.wait(timeout=60) == 0 and os.path.exists(f"/proc/{child}")
        assert not locked_elsewhere(tmp_path / "run")
    finally:
        os.kill(child, signal.SIGKILL)
        trainer.stdout.close()
    # A forked child that leaves the block itself (not by os._exit) leaves the parent's lock alone, quietly: it
    # raised a KeyError (the lock it no longer knew of).
    script = (
        "import os, sys; from dcign_fast.train.lock import run_folder_lock\n"
        "with run_folder_lock(sys.argv[1]):\n"
        "    child = os.fork()\n"
        "    if child:\n"
        "        print(os.waitpid(child, 0)[1], flush=True); sys.stdin.readline()\n"
        "if not child:\n"
        "    os._exit(0)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "run")], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert int(parent.stdout.readline()) == 0 and locked_elsewhere(tmp_path / "run")  # still the parent's
    finally:
        parent.communicate(b"\n", timeout=60)


class _FullDisk:
    """A file whose writes fail as on a full disk, at every flush (and so at close, which flushes)."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, text: str) -> int:
        return self.file.write(text)

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self.file.close()
        self.flush()


def test_a_metrics_log_that_cannot_be_written_is_named_and_the_run_lets_go(tmp_path):
    """The log's close flushed the failed line again: its error replaced the first, and the cleanup after it
    (signal handlers, the run folder's lock) was skipped. Neither error named the file."""
    trainer = Trainer(config(tmp_path, steps=3), render=blobs)
    trainer.log.file = _FullDisk(trainer.log.file)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(OSError, match=r"cannot write .*metrics.jsonl \(No space left on device\)"):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is handler and not locked_elsewhere(tmp_path / "run")


def test_the_cli_and_readers_leave_a_save_under_way_alone(tmp_path, capsys):
    """Listing put a step's .old- folder back, and train --resume (for the stored options) or
    DCIGN.from_checkpoint(run folder) list without the lock: between a running save's two renames, that made
    the save's own rename fail (ENOTEMPTY). Listing reads the step where it is; the lock's holder puts it back."""
    from dcign_fast.cli import main

    Trainer(config(tmp_path, steps=2), render=blobs).train()
    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000002").rename(root / ".old-step-00000002-999999")  # the save, between its renames
    before = sorted(p.name for p in root.iterdir())
    with held_by_another_process(tmp_path / "run"):
        assert main(["train", "--out", str(tmp_path / "run"), "--steps", "4", "--resume"]) == 2
        assert "another trainer is writing" in capsys.readouterr().err
        assert DCIGN.from_checkpoint(tmp_path / "run").config.image_size == 64
        assert sorted(p.name for p in root.iterdir()) == before
    assert Trainer(config(tmp_path, steps=3), resume=True, render=blobs).train().step == 3
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]


def locked_elsewhere(run: Path) -> bool:
    """Whether another process finds ``run``'s lock held (it tries flock without waiting)."""
    probe = (
        "import fcntl, sys; f = open(sys.argv[1], 'a')\n"
        "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(run / ".lock")], timeout=60)
    assert done.returncode in (0, 3)
    return done.returncode == 3


def test_a_run_folder_is_free_for_other_processes_once_training_is_over(tmp_path):
    """train() and a constructor that fails release the folder themselves, while the trainer or the error's
    traceback is still referenced (a notebook keeps both), not only at Trainer.close or garbage collection."""
    trainer = Trainer(config(tmp_path, steps=2), render=blobs)
    trainer.train()
    assert not locked_elsewhere(tmp_path / "run")
    with pytest.raises(FileExistsError) as refused:  # its traceback holds the half-built trainer
        Trainer(config(tmp_path, steps=2), render=blobs)
    assert not locked_elsewhere(tmp_path / "run") and refused.traceback


def test_a_trainer_holds_its_folder_while_another_in_the_process_finishes(tmp_path):
    """Trainers of one process share the lock: the folder stays locked until the last of them lets go."""
    Trainer(config(tmp_path, steps=2), render=blobs).train()
    first = Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    Trainer(config(tmp_path, steps=4), resume=True, render=blobs).train()
    assert locked_elsewhere(tmp_path / "run")
    first.close()
    assert not locked_elsewhere(tmp_path / "run")


def test_a_run_folder_named_two_ways_is_one_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = Trainer(config(tmp_path, steps=2, out="run"), render=blobs)
    assert Trainer(config(tmp_path, steps=2, out=str(tmp_path / "run")), render=blobs).train().step == 2
    relative.close()


def test_the_last_step_is_logged_and_checkpointed_whatever_the_intervals(tmp_path):
    Trainer(config(tmp_path, steps=5, log_every=2, checkpoint_every=2), render=blobs).train()
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 5]
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-00000005"


def test_a_nonfinite_loss_exits_1_and_frees_the_run_folder(tmp_path, capsys):
    from dcign_fast.cli import main

    # Adam at this rate: NaN at step 2. The trainer has let go of the folder (the demo's process goes on).
    args = ["train", "--out", str(tmp_path / "run"), "--steps", "3", "--device", "cpu", "--set", "lr=1e30"]
    assert main([*args, "--set", "batch_size=4"]) == 1
    assert not locked_elsewhere(tmp_path / "run")
    err = capsys.readouterr().err
    assert "dcign-fast train: error: the loss or its gradient became NaN or infinite at step 2;" in err
    assert "Traceback" not in err


def test_a_timed_out_run_under_torchrun_exits_0(tmp_path, monkeypatch):
    """torchrun counts any status but 0 as a failure (and may restart the workers): 75 is for one process only."""
    import dcign_fast.train.trainer as trainer_module
    from dcign_fast.train.cli import run_training
    from dcign_fast.train.distributed import World

    class SecondOfTwoRanks(Trainer):  # what a rank of a two-process run sees (no process group needed here)
        def train(self):
            result = super().train()
            self.world = World(rank=1, size=2)
            return result

    monkeypatch.setattr(trainer_module, "Trainer", SecondOfTwoRanks)
    code, trainer, result = run_training(config(tmp_path, steps=5, time_limit_s=0.0), resume=False)
    assert result.timed_out and trainer.world.distributed and code == 0


def test_resuming_a_run_at_exactly_its_steps_says_nothing_was_trained(tmp_path, capsys):
    from dcign_fast.cli import main

    Trainer(config(tmp_path, steps=2), render=blobs).train()
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--resume"]) == 0
    assert "already at step 2 >= steps 2: nothing was trained" in capsys.readouterr().err


def test_each_set_overrides_the_named_flags(tmp_path):
    from dcign_fast.train.cli import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(["--steps", "4", "--set", "steps=6", "--out", str(tmp_path / "a"), "--set", "out=b"])
    assert (config_from_args(args).steps, config_from_args(args).out) == (6, "b")


def test_a_run_moved_into_the_default_folder_resumes_there(tmp_path, monkeypatch):
    """Without --out the folder is runs/<preset>: a resumed run stays there, not in the folder its checkpoint
    names."""
    from dcign_fast.train.cli import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    Trainer(config(tmp_path, steps=2, seed=5), render=blobs).train()
    shutil.copytree(tmp_path / "run", tmp_path / "runs" / "demo64")
    parser = build_parser()
    resumed = config_from_args(parser.parse_args(["--steps", "4", "--resume"]))
    assert (resumed.out, resumed.seed) == ("runs/demo64", 5)


@pytest.mark.parametrize(
    "change",
    [{"keep_checkpoints": 5}, {"time_limit_s": 100.0}, {"log_every": 3}, {"image_every": 7}, {"checkpoint_every": 3},
     {"on_nonfinite": "skip"}, {"threads": 1}, {"channels_last": False}],
)  # fmt: skip
def test_resume_accepts_a_change_of_how_the_run_executes(tmp_path, change, recwarn):
    """And says so where the change alters the rounding: the bits of an uninterrupted run are then not kept."""
    threads = torch.get_num_threads()
    Trainer(config(tmp_path, steps=1), render=blobs).train()
    try:
        assert Trainer(config(tmp_path, steps=2, **change), resume=True, render=blobs).train().step == 2
    finally:
        torch.set_num_threads(threads)
    said = [str(w.message) for w in recwarn if "other floating-point rounding" in str(w.message)]
    rounds_otherwise = {"threads": threads != 1, "channels_last": True}.get(next(iter(change)), False)
    assert len(said) == rounds_otherwise
    if "channels_last" in change:
        assert said[0].startswith("this resume runs with memory_format NCHW (before: channels_last)")


@pytest.mark.parametrize("option", ["checkpoint_every", "keep_checkpoints", "log_every", "image_every"])
def test_intervals_of_0_are_refused_up_front(option):
    """0 would divide by zero at the end of the first step (its work lost), or keep no checkpoint."""
    with pytest.raises(ValueError, match=f"{option} must be >= 1, got 0"):
        TrainConfig().override([f"{option}=0"])


def test_a_checkpoint_with_an_option_this_version_dropped_still_resumes(tmp_path):
    checkpoint = Trainer(config(tmp_path, steps=1), render=blobs).train().checkpoint
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    state["config"]["retired_option"] = 3
    torch.save(state, checkpoint / "trainer.pt")
    with pytest.warns(UserWarning, match=r"options \['retired_option'\] are unknown to this version: ignored"):
        assert Trainer(config(tmp_path, steps=2), resume=True, render=blobs).train().step == 2


def test_odds_that_are_all_zero_are_refused_when_the_options_are_read():
    with pytest.raises(ValueError, match="the batch kinds' odds must not all be 0"):
        TrainConfig(shape_bias=0, kind_weights={"azimuth": 0, "elevation": 0, "light": 0})


def test_set_tolerates_spaces_around_the_key():
    assert TrainConfig().override(["steps = 3", " out=x"]).steps == 3


def test_zero_weight_kinds_are_left_out_of_the_stream(tmp_path):
    """(the progress pictures render one row per kind of stream.kinds)"""
    from dcign_fast.train.data import BatchStream

    odds = {"azimuth": 1.0, "elevation": 9.0, "light": 0.0, "intrinsic": 0.0}
    stream = BatchStream(blobs, config(tmp_path, kind_weights=odds), show_progress=False)
    assert stream.kinds == ["azimuth", "elevation"]


def test_each_rank_renders_a_pool_of_its_own(tmp_path):
    """(data.py: "a pool is rendered per rank, so more ranks draw from more sweeps")"""
    from dcign_fast.train.data import BatchStream

    pools = [BatchStream(blobs, config(tmp_path, data_pool=1), rank=r, show_progress=False).pool for r in (0, 1)]
    assert not torch.equal(pools[0]["azimuth"][0][0], pools[1]["azimuth"][0][0])


def test_each_rank_and_micro_batch_takes_its_own_shard(tmp_path, monkeypatch):
    """shard = rank x accumulation + micro-batch: rank 1 of 2, accumulating 2 sweeps, takes shards 2 and 3 (as a
    single process accumulating 4 does for its last two)."""
    import dcign_fast.train.trainer as trainer_module
    from dcign_fast.train.distributed import World

    trainer = Trainer(config(tmp_path, steps=1, accumulation=2), render=blobs)
    monkeypatch.setattr(trainer_module, "all_agree", lambda flag, world: flag)  # no process group here
    monkeypatch.setattr(trainer_module, "run_together", lambda action, world: action())
    trainer.world = World(rank=1, size=2)
    trainer.batches = trainer._prefetcher()
    shards, original = [], trainer.stream.batch
    trainer.stream.batch = lambda step, shard: shards.append(shard) or original(step, shard)
    trainer._forward_backward(0, trainer._draw(0))
    assert shards == [2, 3]
    trainer.close()


def test_a_crash_while_a_step_is_saved_again_keeps_its_previous_checkpoint(tmp_path, monkeypatch):
    import dcign_fast.train.checkpoint as checkpoint_module
    from dcign_fast.train.checkpoint import save_checkpoint

    model = DCIGN.from_preset("demo64")
    state = {"step": 3, "optimizer": {"state": {}, "param_groups": []}, "rng": torch.get_rng_state(), "config": {}}
    first = {k: torch.full_like(v, 1.0) for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path, 3, first, model.config.to_dict(), state, keep=2)
    rename = os.rename

    def crash_on_the_new_one(source, target):
        if Path(source).name.startswith(".tmp-"):
            raise OSError("killed")
        rename(source, target)

    monkeypatch.setattr(checkpoint_module.os, "rename", crash_on_the_new_one)
    second = {k: torch.full_like(v, 2.0) for k, v in model.state_dict().items()}
    with pytest.raises(OSError, match="killed"):
        save_checkpoint(tmp_path, 3, second, model.config.to_dict(), state, keep=2)
    monkeypatch.undo()
    recover_checkpoints(tmp_path)  # as the next trainer does under the lock
    assert list_checkpoints(tmp_path) == [path] and all((t == 1.0).all() for t in load_checkpoint(path)[0].values())


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    Trainer(config(tmp_path, steps=2), render=blobs).train()
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tot')  # killed mid-write
    Trainer(config(tmp_path, steps=3), resume=True, render=blobs).train()
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]


def test_a_kill_while_a_resume_trims_the_metrics_keeps_the_history(tmp_path, monkeypatch):
    """The trim rewrote metrics.jsonl in place: a kill mid-write left it cut short (a 220 MB log: empty)."""
    from dcign_fast.train import logs

    history = "".join(json.dumps({"step": step, "total": 1.0}) + "\n" for step in range(1, 6))
    (tmp_path / "metrics.jsonl").write_text(history)

    def killed(*args):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(logs.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        logs.MetricsLog(tmp_path, enabled=True, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == history
    monkeypatch.undo()
    logs.MetricsLog(tmp_path, enabled=True, resume_step=3).close()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_each_metrics_line_reaches_the_file_at_once(tmp_path):
    """A run killed later (SIGKILL, out of memory) keeps the lines it wrote, and tail -f shows them."""
    from dcign_fast.train.logs import MetricsLog

    log = MetricsLog(tmp_path, enabled=True)
    log.write({"step": 1, "total": 2.0})
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "total": 2.0}
    log.close()


def test_train_can_be_called_again_after_a_time_limit(tmp_path):
    """A notebook continuing a run: a timed-out train() releases the folder and closes the metrics log; the next
    train() holds the folder again, and it wrote to the closed log (ValueError) after its first step had changed
    the weights."""
    locked = []

    def slow_render(kind, generator):  # each batch outlasts the time limit: one step per train() call
        locked.append(locked_elsewhere(tmp_path / "run"))
        time.sleep(0.3)
        return blobs(kind, generator)

    trainer = Trainer(config(tmp_path, steps=10, checkpoint_every=100, time_limit_s=0.2), render=slow_render)
    assert trainer.train().step == 1 and not locked_elsewhere(tmp_path / "run")
    assert trainer.train().step == 2 and locked == [True, True]
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]


def test_train_can_be_called_again_after_an_interrupt(tmp_path):
    """The next train() continues: the signal the first one acted on no longer stops it at once."""
    trainer = Trainer(config(tmp_path, steps=4), render=blobs)
    signal_at_batch(trainer, 1, signal.SIGINT)
    assert trainer.train().interrupted
    result = trainer.train()
    assert not result.interrupted and result.step == 4


def test_the_default_run_folder_follows_the_preset_and_an_explicit_out_wins(tmp_path, monkeypatch):
    """The default out was runs/demo64 whatever the preset. Each way of giving an out (--out, --set, a config
    file) still names the folder; each way of giving a preset moves the default."""
    from dcign_fast.train.cli import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    Path("face.yaml").write_text("preset: face128\n")
    Path("elsewhere.yaml").write_text("out: elsewhere\n")
    parser = build_parser()

    def folder(*argv: str) -> Path:
        return config_from_args(parser.parse_args(argv)).run_folder

    assert folder() == Path("runs/demo64")
    assert folder("--preset", "paper150") == Path("runs/paper150")
    assert folder("--set", "preset=face128") == folder("--config", "face.yaml") == Path("runs/face128")
    assert folder("--preset", "paper150", "--out", "a") == folder("--preset", "paper150", "--set", "out=a") == Path("a")
    assert folder("--preset", "paper150", "--config", "elsewhere.yaml") == Path("elsewhere")
    # The default is not fixed when the options are made: a copy with another preset moves with it.
    assert TrainConfig().updated({"preset": "face128"}).run_folder == Path("runs/face128")


def test_runs_of_two_presets_without_out_train_and_resume_apart(tmp_path, monkeypatch):
    """Both went to runs/demo64: the second preset's run found the first's checkpoints and was refused."""
    from dcign_fast.train.cli import build_parser, config_from_args

    def blobs_128(kind: str, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        images, factors = blobs(kind, generator)
        return torch.nn.functional.interpolate(images, size=128), factors

    monkeypatch.chdir(tmp_path)
    parser = build_parser()

    def train(preset: str, *argv: str) -> Path | None:
        args = parser.parse_args(["--preset", preset, *argv, *(a for s in FAST for a in ("--set", s))])
        render = blobs if preset == "demo64" else blobs_128
        return Trainer(config_from_args(args), resume=args.resume, render=render).train().checkpoint

    assert train("demo64", "--steps", "1") == Path("runs/demo64/checkpoints/step-00000001")
    assert train("face128", "--steps", "1") == Path("runs/face128/checkpoints/step-00000001")
    assert train("face128", "--steps", "2", "--resume") == Path("runs/face128/checkpoints/step-00000002")
    stored = load_checkpoint(Path("runs/face128/checkpoints/step-00000002"))[2]["config"]
    assert (stored["preset"], stored["out"]) == ("face128", "runs/face128")  # the folder in effect, not None


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nonfinite_step_is_numbered_as_metrics_and_checkpoints_number_it(tmp_path, capsys, policy):
    """The first step taken is step 1 in metrics.jsonl, checkpoints and the progress bar; the NaN message
    named the step it failed in by its 0-based index (step 1 for the second step, which the bar showed as
    under way)."""
    from dcign_fast.train.trainer import NonFiniteLossError

    trainer = Trainer(config(tmp_path, steps=3, on_nonfinite=policy), render=blobs)
    original, taking = trainer.stream.batch, [0]

    def noting_the_step(step, shard):
        taking[0] = step  # 0-based, as the trainer passes it
        return original(step, shard)

    trainer.stream.batch = noting_the_step
    trainer.model.to_mu.register_forward_hook(lambda module, inputs, mu: mu * float("nan") if taking[0] == 1 else mu)
    if policy == "stop":
        with pytest.raises(NonFiniteLossError, match="at step 2;"):
            trainer.train()
    else:
        trainer.train()
        assert "skipped step 2:" in capsys.readouterr().out  # bar.write prints to stdout
    logged = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == ([1] if policy == "stop" else [1, 3])  # the step named is the one missing here


def test_a_resume_from_a_checkpoint_stored_without_foreach_keeps_adams_foreach(tmp_path):
    """Checkpoints of earlier versions stored foreach=None, which load_state_dict put back (the CPU's slower loop)."""
    from dcign_fast.train.checkpoint import STATE

    Trainer(config(tmp_path, steps=2), render=blobs).train()
    state_file = list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / STATE
    state = torch.load(state_file, weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["foreach"] = None
    torch.save(state, state_file)
    resumed = Trainer(config(tmp_path, steps=4), resume=True, render=blobs)
    assert [group["foreach"] for group in resumed.optimizer.param_groups] == [True]


def test_where_the_built_in_renderer_rendered_is_compared_on_resume(tmp_path):
    """Only the built-in renderer renders on the device (or the workers' CPU); a checkpoint of an earlier version
    did not record it, and rendered on its device."""
    builtin, hook = Trainer(config(tmp_path / "builtin")), Trainer(config(tmp_path / "hook"), render=blobs)
    now = builtin._execution()
    assert now["data_device"] == "cpu"
    earlier = {key: value for key, value in now.items() if key != "data_device"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        builtin._warn_of_other_rounding(earlier)  # rendered on its device, the CPU: the same
        hook._warn_of_other_rounding({**now, "data_device": "cuda"})
    with pytest.warns(UserWarning, match=r"this resume runs with data_device cpu \(before: cuda\)"):
        builtin._warn_of_other_rounding({**now, "data_device": "cuda"})
    for trainer in (builtin, hook):
        trainer.log.close()
        trainer.close()
