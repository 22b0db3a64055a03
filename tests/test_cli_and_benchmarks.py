"""The command line and both benchmark front doors run end to end (quick CPU subsets, no thresholds)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks import report
from benchmarks import run as bench
from dcign_fast.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["torch"] and "cuda_extension_built" in info and "cuda_emulation" in info


def test_info_says_why_a_cuda_emulation_switched_on_cannot_build(tmp_path, capsys, monkeypatch):
    """An installed wheel has no csrc/: info said the emulation was on, and backend="cuda" then failed."""
    from dcign_fast.kernels import cuda_emulation

    monkeypatch.setenv("DCIGN_FAST_CUDA_EMULATION", "1")
    assert main(["info"]) == 0 and json.loads(capsys.readouterr().out)["cuda_emulation"] is True
    monkeypatch.setattr(cuda_emulation, "CSRC", tmp_path / "csrc")
    assert main(["info"]) == 0
    assert "needs the csrc/ sources of a source checkout" in json.loads(capsys.readouterr().out)["cuda_emulation"]
    monkeypatch.delenv("DCIGN_FAST_CUDA_EMULATION")
    assert main(["info"]) == 0 and json.loads(capsys.readouterr().out)["cuda_emulation"] is False


def test_python_dash_m_runs_the_command():
    """`python -m dcign_fast` is the `dcign-fast` command where pip's scripts folder is not on PATH."""
    done = subprocess.run([sys.executable, "-m", "dcign_fast", "info"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cuda_extension_built" in json.loads(done.stdout)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--preset", "nope"], "preset must be one of"),
        (["train", "--set", "steps=2.5"], "steps must be int"),
        (["train", "--config", "/nonexistent.yaml"], "No such file"),
        (["render", "--preview", "p.png", "--device", "cuda:99"], "device="),
        (["eval", "--checkpoint", "/nonexistent"], "no weights file"),
        (["eval", "--checkpoint", "/nonexistent", "--device", "xpu"], "--device must be 'auto', cpu, cuda or cuda:N"),
        (["train", "--set", "batch_size=1"], "batch_size must be >= 2 with disentangle=true"),  # a plain VAE
        (["train", "--set", "threads=-1"], "threads must be in [0, 1025)"),
        (["train", "--set", "threads=4096"], "threads must be in [0, 1025)"),  # thousands crashed torch
        (["train", "--out", ""], "out must not be empty"),  # was the current folder
        (["demo", "--set", "out=elsewhere"], "give the demo's run folder with --out"),  # split the outputs
        (["train", "--set", "device=foo"], "device must be 'auto', cpu, cuda or cuda:N"),
        (["train", "--set", "lr=[1"], "--set lr=[1 is not valid YAML"),
        (["train", "--config", "bad.yaml"], "bad.yaml is not valid YAML"),
    ],
)
def test_user_errors_are_one_line(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DCIGN_FAST_DEBUG", raising=False)
    Path("bad.yaml").write_text("a: [")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"dcign-fast {argv[0]}: error:" in err and words in err and "Traceback" not in err


@pytest.mark.parametrize("debug", ["", "0", "false", "off"])
def test_ctrl_c_outside_training_is_one_line_and_130(debug, capsys, monkeypatch):
    from dcign_fast.cli import run_reporting_errors

    monkeypatch.setenv("DCIGN_FAST_DEBUG", debug)  # "false" and "off" switched tracebacks on

    def interrupted(args):
        raise KeyboardInterrupt

    assert run_reporting_errors("dcign-fast render", interrupted, None) == 130
    assert capsys.readouterr().err == "dcign-fast render: interrupted\n"

    def twice(args):
        raise KeyboardInterrupt("signal 2 received again: stopping without a checkpoint")

    assert run_reporting_errors("dcign-fast train", twice, None) == 130
    assert "interrupted (signal 2 received again: stopping without a checkpoint)" in capsys.readouterr().err


def test_sigterm_outside_training_is_one_line_and_130(capsys, monkeypatch):
    """SIGTERM's default action ended the process without a word (a scheduler's stop while the demo renders its
    pool, before training's own handler is set); the handler goes again with the command."""
    import signal

    from dcign_fast.cli import run_reporting_errors

    monkeypatch.delenv("DCIGN_FAST_DEBUG", raising=False)

    def rendering(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises first
        return 0

    pytests_own = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as a command starts
    try:
        assert run_reporting_errors("dcign-fast demo", rendering, None) == 130
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, pytests_own)
    assert capsys.readouterr().err == "dcign-fast demo: interrupted (SIGTERM received)\n"


def test_a_dead_data_worker_is_one_line_with_status_1(monkeypatch, capsys):
    """It was the DataLoader's traceback, which said no more than its last line."""
    from dcign_fast.cli import DEBUG_ENV, run_reporting_errors
    from dcign_fast.train.prefetch import DataWorkerError

    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def run(args):
        raise DataWorkerError("a data worker died (DataLoader worker (pid 7) is killed by signal: Killed.)")

    assert run_reporting_errors("dcign-fast train", run, None) == 1
    assert capsys.readouterr().err == (
        "dcign-fast train: error: a data worker died (DataLoader worker (pid 7) is killed by signal: Killed.)\n"
    )


def test_warnings_print_as_one_line_under_the_commands_name(monkeypatch):
    import argparse
    import warnings

    from dcign_fast.cli import DEBUG_ENV, run_reporting_errors

    monkeypatch.delenv(DEBUG_ENV, raising=False)
    original, formatted = warnings.formatwarning, []

    def run(args: argparse.Namespace) -> int:  # (pytest records warnings itself: ask for the text directly)
        formatted.append(warnings.formatwarning("no checkpoint here", UserWarning, "trainer.py", 9, "warn(...)"))
        return 0

    assert run_reporting_errors("dcign-fast train", run, argparse.Namespace()) == 0
    assert formatted == ["dcign-fast train: warning: no checkpoint here\n"] and warnings.formatwarning is original


def test_text_options_take_names_that_look_like_numbers():
    """--set passes text options as typed: YAML read out=2024 as a number (refused), 007 as 7, 12:30 as 750."""
    from dcign_fast.train import TrainConfig

    for typed in ("2024", "007", "12:30", "1.50"):
        assert TrainConfig().override([f"out={typed}"]).out == typed
    with pytest.raises(TypeError, match="out must be str \\| None, got 2024 \\(quote it in a YAML file"):
        TrainConfig.from_dict({"out": 2024})  # as a YAML file's out: 2024 reads


def test_set_out_null_is_the_default_run_folder():
    """--help says out = null is runs/<preset>; --set out=null kept the text and trained into a folder "null"
    (a helper's audit). The text options that allow no None keep it as typed."""
    from dcign_fast.train import TrainConfig

    config = TrainConfig().override(["out=null"])
    assert config.out is None and config.run_folder == Path("runs/demo64")
    assert TrainConfig().override(["data=null"]).data == "null"  # (a folder of that name)


@pytest.mark.parametrize("command, steps", [("train", 3000), ("demo", 6000)])
def test_help_lists_every_option_with_its_default_and_meaning(command, steps, capsys):
    """The help named the options for --set and sent the reader to a README that describes only some of them:
    each is listed with the command's default, as --set would write it, and what it means."""
    import dataclasses

    from dcign_fast.demo import DEMO_OPTIONS
    from dcign_fast.train import TrainConfig

    with pytest.raises(SystemExit):
        main([command, "--help"])
    listed = dict(re.findall(r"^  (\w+) = (.+?): ", capsys.readouterr().out, flags=re.MULTILINE))
    names = [f.name for f in dataclasses.fields(TrainConfig) if not (command == "demo" and f.name == "out")]
    assert list(listed) == names  # the demo's run folder is its --out (--set out= is refused)
    assert listed["steps"] == str(steps) and listed["betas"] == "[0.9, 0.99]" and listed["grad_clip"] == "100.0"
    assert listed["bf16"] == "null" and listed["compile"] == "false" and listed["kind_weights"] == "{}"
    # Each default reads back through --set as the value it is.
    defaults = TrainConfig.from_dict(DEMO_OPTIONS if command == "demo" else {})
    typed = TrainConfig.parse_assignments([f"{name}={value}" for name, value in listed.items()])
    assert TrainConfig.from_dict(typed) == dataclasses.replace(defaults, out=typed.get("out"))


@pytest.mark.parametrize("suite", sorted(bench.SUITES))
def test_suite_quick_then_report(suite, tmp_path, capsys):
    assert bench.main(["--suite", suite, "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob(f"{suite}-cpu-*.json")
    data = json.loads(result.read_text())
    assert data["machine"]["torch"] and data["machine"]["cpu"] and data["rows"]
    timed = [row.get("median_ms", row.get("kernel_ms")) for row in data["rows"]]  # kernels: profiled times
    timed = [ms for ms in timed if ms is not None]
    assert timed and all(ms > 0 for ms in timed)
    # A quick run says so in its file and its table: its two repeats of small shapes are no measurement.
    assert data["machine"]["quick"] is True and data["finished"] is True
    assert f"suite {suite}" in (printed := capsys.readouterr().out) and "QUICK SMOKE RUN" in printed
    assert report.main(["--results", str(tmp_path), "--out", str(tmp_path), "--include-quick"]) == 0
    assert f"### {suite} on" in (text := (tmp_path / "RESULTS.md").read_text()) and "Quick smoke run" in text


def test_ops_suite_compares_backends(tmp_path, monkeypatch):
    """Without --out a quick run writes to a git-ignored folder of its own: in benchmarks/results it was
    committed and reported beside the measurements."""
    monkeypatch.chdir(tmp_path)
    bench.main(["--suite", "ops", "--quick"])
    rows = json.loads(next(tmp_path.glob("benchmarks/results-quick/ops-*.json")).read_text())["rows"]
    assert {"reference", "torch"} <= {row["backend"] for row in rows}
    assert not (tmp_path / "benchmarks" / "results").exists()
    assert (tmp_path / "benchmarks" / "results-quick" / ".gitignore").read_text().endswith("\n*\n")


def test_train_suite_writes_eager_rows_before_compiling(monkeypatch):
    """A suite cut short by its time limit must keep the eager rows: they come first, and a spent compile
    budget is noted without timing the eager variants again."""
    from benchmarks.suites import train

    assert train.cases("cuda", quick=False)[0] == ("paper150", 128, True)  # the goals' case first on a GPU
    monkeypatch.setattr(train, "cases", lambda device, quick: [("demo64", 2, False)])
    monkeypatch.setenv("DCIGN_BENCH_COMPILE_S", "0")
    monkeypatch.setattr(train.os, "cpu_count", lambda: 2)  # one data worker
    rows = list(train.run("cpu", quick=False))
    assert [(row.get("pass"), row["backend"]) for row in rows] == [
        ("eager", "eager reference"),
        ("eager", "dcign_fast"),
        ("eager", "eager reference (channels_last)"),
        (None, "renderer"),
        (None, "train loop, rendered in process"),
        (None, "train loop, 1 data worker"),
        ("compiled", "compiled reference"),
        ("compiled", "dcign_fast compiled"),
    ]
    assert all(row["note"] == "compile: budget spent" and "median_ms" not in row for row in rows[6:])


def test_gpu_suites_measure_every_eager_row_before_any_compile(monkeypatch):
    """On CUDA both suites time every eager row first (a max-autotune compile, once begun, can outlast the
    suite's time limit), the goals' case first; the train suite's first compiled variant is the goal's
    baseline, max-autotune (left last, the budget was spent before it). Checked by recording what the suites
    would time (no GPU needed)."""
    from benchmarks.suites import ops, train

    timed = []
    monkeypatch.setattr(train, "_time_case", lambda *a: timed.append((a[:3], a[3][-1])) or [{"median_ms": 1.0}])
    monkeypatch.setattr(train, "_data_row", lambda *a: {"backend": "renderer"})
    monkeypatch.setattr(train, "_loop_rows", lambda *a: [])
    list(train.run("cuda", quick=False))
    goal = ("paper150", 128, True)
    cases = train.cases("cuda", quick=False)
    assert cases[0] == goal and timed[: len(cases)] == [(case, "dcign_fast") for case in cases]  # eager
    first_compiled = [name for case, name in timed[len(cases) : len(cases) + 4]]
    assert first_compiled[0] == "compiled reference (max-autotune)" and len(set(first_compiled)) == 4
    later = timed[len(cases) + 4 :]
    assert len(later) == 3 * (len(cases) - 1) and not any(case == goal or "max-autotune" in n for case, n in later)

    measured = []

    def record(device, batch, dtype, case, backends, *args):
        measured.append((ops.is_goal_case(device, batch, dtype, case), "compile" in backends))
        return iter(())

    monkeypatch.setattr(ops, "_measure", record)
    list(ops.run("cuda", quick=False))
    # paper150's four layers and its decoder, eager; every other case, eager; the goals' five again, compiled
    assert measured[:5] == [(True, False)] * 5 and measured[-5:] == [(True, True)] * 5
    assert len(measured) == len(ops.cases("cuda", False)) + 5
    assert not any(goal or compiled for goal, compiled in measured[5:-5])


def test_summary_takes_the_newest_run_not_the_best_one():
    def run(date: str, *speedups: float) -> dict:
        row = {"case": "c", "pass": "forward+backward", "dtype": "float32", "backend": "torch"}
        rows = [{**row, "speedup": s} for s in speedups]
        return {"suite": "ops", "machine": {"cpu": "cpu", "date": date, "torch": "2.x"}, "rows": rows}

    (row,) = report.summary_rows([run("2026-01-01", 3.0), run("2026-02-01", 2.0)])
    assert row["speedup"] == 2.0
    # --summary says what it was measured with (it printed no versions).
    printed = report.summary([run("2026-02-01", 2.0)])
    assert "ops on cpu: torch 2.x, triton None, None CPU threads, 2026-02-01" in printed
    (row,) = report.summary_rows([run("2026-01-01", 2.0, 3.0)])  # a re-timed backend: its first row
    assert row["speedup"] == 2.0
    # The plot's bars come from the same rows (they showed the oldest run's).
    ((_, bars),) = report.newest_rows([run("2026-01-01", 3.0), run("2026-02-01", 2.0)]).values()
    assert bars["torch"]["speedup"] == 2.0


def test_report_refuses_a_folder_without_results(tmp_path, capsys):
    """A mistyped --results folder emptied RESULTS.md and said so only in passing."""
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--results", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "holds no result files" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()
    (tmp_path / "quick.json").write_text(json.dumps(_result("2026-01-01", 2.0, quick=True)))
    with pytest.raises(SystemExit):  # it was reported as no results at all
        report.main(["--results", str(tmp_path), "--out", str(tmp_path)])
    assert "holds only quick (--quick) runs; --include-quick reports them" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()


def test_a_failed_compile_is_charged_to_the_budget():
    from benchmarks.harness import CompileBudget

    def slow_failure() -> None:
        time.sleep(0.05)
        raise RuntimeError("compiler error")

    budget = CompileBudget(1.0)
    with pytest.raises(RuntimeError, match="compiler error"):
        budget.spend("cpu", slow_failure)
    assert budget.left <= 0.95


def test_kernels_suite_splits_each_backend_into_kernels(tmp_path):
    from benchmarks.suites.kernels import short_kernel_name

    bench.main(["--suite", "kernels", "--quick", "--out", str(tmp_path)])
    rows = json.loads(next(tmp_path.glob("kernels-*.json")).read_text())["rows"]
    for backend in ("reference", "torch"):
        shares = [row["share"] for row in rows if row["backend"] == backend]
        assert len(shares) > 1 and sum(shares) == pytest.approx(1.0)
    demangled = (
        "void dcign::(anonymous namespace)::unpool_conv_forward_kernel<__nv_bfloat16, false, 64, 64>"
        "(__nv_bfloat16 const*, __nv_bfloat16 const*, dcign::Geometry, int)"
    )
    assert short_kernel_name(demangled) == "unpool_conv_forward_kernel<__nv_bfloat16, false, 64, 64>"


def _suite_rows(suites: list[str], device: str, quick: bool, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The rows ``suites`` would write, each variant "timed" at 1 ms without running it: which cases and
    variants a suite times, in seconds."""

    def compare(variants, _device, row, *args, **kwargs):
        return [{**row, "backend": name, "median_ms": 1.0} for name in variants]

    def time_side_by_side(variants, *args, **kwargs):
        return dict.fromkeys(variants, 1.0)

    rows: list[dict] = []
    for name in suites:
        module = importlib.import_module(bench.SUITES[name])
        for fake in (compare, time_side_by_side):
            if hasattr(module, fake.__name__):
                monkeypatch.setattr(module, fake.__name__, fake)
        rows += module.run(device, quick)
    return rows


def test_pytest_benchmark_front_door_runs_the_suites_cases(monkeypatch):
    """The pytest-benchmark door timed a hand-picked case per suite, apart from the suites' lists: it runs (as
    CI runs it) and its tests are every eager variant of every case the suites time, no more (quick cases)."""
    from benchmarks.test_benchmarks import DEVICE, param_id

    env = {**os.environ, "DCIGN_BENCH_QUICK": "1"}
    door = subprocess.Popen(
        [sys.executable, "-m", "pytest", "benchmarks/", "-v", "--benchmark-disable", "-p", "no:cacheprovider"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:  # the suites' rows are listed while the door runs
        # Every suite but kernels (its profiler breakdown only benchmarks.run gives): a new suite must be in both.
        rows = _suite_rows([name for name in bench.SUITES if name != "kernels"], DEVICE, True, monkeypatch)
        stdout, stderr = door.communicate(timeout=600)
    finally:
        door.kill()  # only if still running (an error above, or the timeout)
    assert door.returncode == 0, stdout[-3000:] + stderr[-2000:]
    passed = re.findall(r"^benchmarks/test_benchmarks\.py::\w+\[(.*)\] PASSED", stdout, re.MULTILINE)
    # Not in the pytest door: compiled variants (they need the compile budget), the train suite's data rows (the
    # renderer and the loop with and without data workers: not variants of the step) and notes (a suite or
    # variant that could not run: skipped there too).
    timed = [r for r in rows if "median_ms" in r and "compile" not in r["backend"] and not r["case"].endswith(" data")]
    assert len(passed) == len(set(passed)) and set(passed) == {param_id(r, r["backend"]) for r in timed}


def test_device_check_script_names_what_exists():
    """benchmarks/device_check.sh runs only on a GPU: here its syntax, suites, training settings and time
    limits are checked, so the first GPU minutes are not lost to a typo."""
    from dcign_fast.train.config import TrainConfig

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    suites = re.findall(r"(\w+):(\d+):(\d+)", text.split("for suite in", 1)[1].split(";", 1)[0])
    assert suites and {name for name, _, _ in suites} == set(bench.SUITES)
    TrainConfig().override(re.findall(r"--set (\w+=\S+)", text))  # known options, each within its range
    limits = [int(s) for s in re.findall(r"^step (?:--foreground )?(?:--ok \d+ )?[\w-]+ (\d+)", text, re.MULTILINE)]
    # The training run stops at its time limit: exit status 75, which must not fail the check.
    assert re.search(r"^step --foreground --ok 75 train-paper150 .*time_limit_s=", text, re.MULTILINE | re.DOTALL)
    # Under 8 minutes with 20 s left for the start, packing the logs after each step and the report.
    assert len(limits) == 4 and sum(limits) + sum(int(limit) for _, limit, _ in suites) <= 8 * 60 - 20
    # The device tool returns at most 8 files from $OUT: one JSON per suite and the tarball of the rest.
    written = set(re.findall(r'"\$out/([^"]+)"', text))
    assert written == {"device-check-logs.tgz", "device-check-logs.tgz.partial"} and len(suites) + 2 <= 8


def test_a_baseline_that_cannot_run_leaves_the_other_rows_without_speedups():
    """It raised KeyError, and `--suite all` lost every suite after it."""
    from benchmarks.harness import compare

    def broken() -> None:
        raise RuntimeError("no kernel image for this device")

    rows = compare({"reference": broken, "torch": lambda: None}, "cpu", {"case": "c"}, "reference", 1, 2)
    assert [r["backend"] for r in rows] == ["torch", "reference"]
    assert "median_ms" in rows[0] and "speedup" not in rows[0]
    assert rows[1]["note"].startswith("skipped: RuntimeError: no kernel image")


def test_results_name_the_code_measured(tmp_path):
    """The report mixes runs taken with different code: each records dcign-fast's version, its commit (the
    short hash) and whether that checkout had uncommitted changes; files from before say they did not."""
    import dcign_fast
    from benchmarks.harness import machine, source_commit

    info = machine("cpu")
    assert info["dcign_fast"] == dcign_fast.__version__ and info["quick"] is False
    assert (info["commit"], info["dirty"]) == source_commit()
    info.update(commit="0123abc", dirty=True)
    assert "dcign-fast " + dcign_fast.__version__ + " at 0123abc with uncommitted changes" in bench.header("ops", info)
    old = {**info, "date": "2026-01-01T00:00:00Z"}
    for key in ("dcign_fast", "commit", "dirty", "quick"):
        del old[key]
    for name, m in (("new", info), ("old", old)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"suite": name, "machine": m, "rows": []}))
    report.main(["--results", str(tmp_path), "--out", str(tmp_path)])
    text = (tmp_path / "RESULTS.md").read_text()
    assert f"dcign-fast {dcign_fast.__version__} at 0123abc with uncommitted changes" in text
    assert "2026-01-01T00:00:00Z, dcign-fast version and commit not recorded" in text


def test_source_commit_is_the_short_hash_of_the_packages_own_checkout(tmp_path):
    """Untracked files (the results a run writes) leave the tree clean; a package installed inside some
    other repository (a virtual environment in a project) has no commit rather than that repository's."""
    from benchmarks.harness import source_commit

    tmp_path = tmp_path / "a checkout"  # a space in the path
    tmp_path.mkdir()

    def git(*args: str) -> str:
        command = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    package = tmp_path / "dcign_fast"
    package.mkdir()
    (package / "__init__.py").write_text("")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "c")
    assert source_commit(package) == (git("rev-parse", "--short", "HEAD"), False)
    (tmp_path / "results.json").write_text("{}")
    assert source_commit(package)[1] is False
    (package / "__init__.py").write_text("x = 1\n")
    assert source_commit(package)[1] is True
    installed = tmp_path / "venv" / "site-packages" / "dcign_fast"
    installed.mkdir(parents=True)
    assert source_commit(installed) == (None, None)
    assert source_commit(tmp_path / "nowhere" / "dcign_fast") == (None, None)


def _fake_cuda_memory(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """torch.cuda's memory counters over a fake allocator (no GPU here); returns its alloc(bytes)."""
    from benchmarks import harness

    counter = {"now": 0, "peak": 0}

    def alloc(size: int) -> None:
        counter["now"] += size
        counter["peak"] = max(counter["peak"], counter["now"])

    monkeypatch.setattr(harness, "synchronize", lambda device: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: counter.update(peak=counter["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: counter["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: counter["peak"])
    return alloc


def test_peak_memory_is_counted_without_the_previous_calls_gradients(monkeypatch):
    """A step frees the last step's gradients, then makes a workspace and new ones: measured from a base that
    still held the old gradients, its peak came out short by their size (near 0 for a fused layer)."""
    from benchmarks.harness import Step, compare, peak_memory_mb

    alloc, mib = _fake_cuda_memory(monkeypatch), 2**20
    held = {"grads": False}

    def clear() -> None:
        if held["grads"]:
            alloc(-100 * mib)
            held["grads"] = False

    def call() -> None:
        clear()
        alloc(50 * mib)  # workspace
        alloc(100 * mib)  # gradients, kept after the call
        alloc(-50 * mib)
        held["grads"] = True

    call()
    assert peak_memory_mb(call, "cuda") == 50  # a plain call: the gradients' 100 MiB go missing
    step = Step(call, clear)
    assert peak_memory_mb(step, "cuda") == 150
    # A variant replaying CUDA graphs allocates nothing on replay: no peak is reported for it, only why.
    rows = compare({"eager": step, "graphed": step}, "cuda", {"case": "c"}, "eager", 1, 1, graphed=("graphed",))
    assert rows[0]["peak_mb"] == 150 and "peak_mb" not in rows[1] and "CUDA graph" in rows[1]["note"]


def test_cuda_rows_tell_host_time_from_wall_time(monkeypatch):
    """On CUDA a call returns once its kernels are queued: host_ms is that time, median_ms includes the wait for
    the device. Here a fake device has 30 ms of queued work per call, which only synchronize waits for."""
    from benchmarks import harness

    _fake_cuda_memory(monkeypatch)
    queued = {"s": 0.0}

    def synchronize(device: str) -> None:
        time.sleep(queued["s"])
        queued["s"] = 0.0

    def launch() -> None:
        queued["s"] = 0.03

    monkeypatch.setattr(harness, "synchronize", synchronize)
    rows = harness.compare({"async": launch}, "cuda", {"case": "c"}, "async", 1, 3)
    assert rows[0]["host_ms"] < 10 < 30 <= rows[0]["median_ms"]
    cpu = harness.compare({"sync": lambda: None}, "cpu", {"case": "c"}, "sync", 1, 3)
    assert "host_ms" not in cpu[0]  # on the CPU it would only repeat the wall time


def _result(date: str, speedup: float, suite: str = "latent", case: str = "c", **machine: object) -> dict:
    """A result file's contents: one baseline row and one torch row, measured on "cpu" at ``date``."""
    row = {"case": case, "pass": "forward+backward", "dtype": "float32", "median_ms": 1.0}
    rows = [{**row, "backend": "reference", "speedup": 1.0}, {**row, "backend": "torch", "speedup": speedup}]
    info = {"device": "cpu", "cpu": "cpu", "cpu_threads": 2, "torch": "2.x", "date": date, **machine}
    return {"suite": suite, "machine": info, "rows": rows}


def _report(tmp_path: Path, runs: list[dict], *options: str) -> str:
    """RESULTS.md of ``runs``, written as result files and reported with ``options``."""
    folder = tmp_path / "results"
    folder.mkdir(exist_ok=True)
    for i, run in enumerate(runs):
        (folder / f"{run['suite']}-{i}.json").write_text(json.dumps(run))
    assert report.main(["--results", str(folder), "--out", str(tmp_path), *options]) == 0
    return (tmp_path / "RESULTS.md").read_text()


def test_results_md_shows_the_current_runs_first(tmp_path):
    """RESULTS.md listed every run oldest first: an early latent table (the torch backend at 0.6x) read as
    current above the later one (1.2x). The newest run of each suite and machine comes first now, then the
    older ones as superseded, newest first; an older run stays current for the cases no newer run measured."""
    runs = [
        _result("2026-01-01", 0.6),
        _result("2026-01-02", 0.9, case="only-old"),
        _result("2026-02-01", 1.2),
        _result("2026-01-15", 3.0, suite="ops"),
        _result("2026-01-03", 5.0, cpu_threads=16),  # another machine: current too
    ]
    text = _report(tmp_path, runs)
    current, superseded = text.split("## Superseded runs")
    order = re.findall(r"^### (\w+) on cpu, (\d+) threads \(cpu\), ([\d-]+)$", current, re.MULTILINE)
    assert order == [("ops", "2", "2026-01-15"), ("latent", "16", "2026-01-03")] + [
        ("latent", "2", date) for date in ("2026-02-01", "2026-01-02")
    ]
    assert "shown for the cases that the run of 2026-02-01 did not measure" in current
    assert "| 0.6 |" not in current and "| 1.2 |" in current
    dates = re.findall(r"^### latent on cpu, 2 threads \(cpu\), ([\d-]+)$", superseded, re.MULTILINE)
    assert dates == ["2026-01-02", "2026-01-01"] and "Superseded by the run of 2026-02-01." in superseded


def test_report_leaves_quick_runs_out_unless_asked(tmp_path, monkeypatch):
    """Quick runs were merged into RESULTS.md and the plot as if measured (two repeats: noise)."""
    plotted: list[list[dict]] = []
    monkeypatch.setattr(report, "plot_speedups", lambda runs, path: plotted.append(runs))
    measured, quick = _result("2026-01-01", 1.5), _result("2026-02-01", 9.0, quick=True)
    text = _report(tmp_path, [measured, quick])
    assert "smoke runs are left out (1 here)" in text and "2026-02-01" not in text and "Superseded" not in text
    assert plotted[-1] == [measured] and report.summary_rows([measured])[0]["speedup"] == 1.5
    # --include-quick adds it, marked and apart from the measurement, which it does not supersede.
    text = _report(tmp_path, [measured, quick], "--include-quick")
    assert "### latent on cpu, 2 threads, quick (cpu), 2026-02-01" in text and "Quick smoke run" in text
    assert "Superseded" not in text and len(plotted[-1]) == 2
    assert {r["machine"] for r in report.summary_rows(plotted[-1])} == {"cpu, 2 threads", "cpu, 2 threads, quick"}


def test_report_marks_a_run_stopped_before_it_finished(tmp_path):
    """A suite cut by device_check.sh's time limit keeps its rows; nothing said that the rest were missing."""
    stopped, finished, unknown = (_result(f"2026-01-0{day}", 1.5) for day in (1, 2, 3))
    stopped["suite"], finished["suite"] = "ops", "render"
    stopped["finished"], finished["finished"] = False, True  # (files before 2026-11-30 did not record it)
    text = _report(tmp_path, [stopped, finished, unknown])
    assert text.count("Stopped before it finished") == 1
    assert text.index("### ops on") < text.index("Stopped before it finished") < text.index("### latent on")


def test_report_keeps_cpu_runs_with_other_thread_counts_apart():
    def run(threads: int) -> dict:
        row = {"case": "c", "pass": "forward+backward", "dtype": "float32", "backend": "torch", "speedup": 2.0}
        machine = {"cpu": "Xeon", "cpu_threads": threads, "date": f"2026-01-0{threads % 9 + 1}", "torch": "2.x"}
        return {"suite": "ops", "machine": machine, "rows": [row]}

    rows = report.summary_rows([run(2), run(16)])
    assert sorted(r["machine"] for r in rows) == ["Xeon, 16 threads", "Xeon, 2 threads"]


def test_report_names_the_baseline_where_it_is_fastest_and_shows_rows_with_only_a_note(tmp_path, capsys):
    """The summary named a slower backend "best" where the reference won; RESULTS.md left out rows holding only
    a note (a compile out of budget); a report with no speedup to plot left an older run's plot in place."""
    run = _result("2026-01-01", 0.5)
    note = {"case": "c", "pass": "forward+backward", "backend": "compiled", "note": "compile: budget spent"}
    run["rows"].append(note)
    (row,) = report.summary_rows([run])
    assert (row["best"], row["speedup"]) == ("reference", 1.0)
    assert "| compiled |" in _report(tmp_path, [run]) and "| compile: budget spent |" in _report(tmp_path, [run])
    assert (tmp_path / "speedup.png").exists()
    render = {"suite": "render", "machine": run["machine"], "rows": [{"case": "r", "backend": "torch", "median_ms": 2}]}
    (tmp_path / "results" / "latent-0.json").unlink()
    _report(tmp_path, [render])
    assert not (tmp_path / "speedup.png").exists() and "(no speedups to plot)" in capsys.readouterr().out


QUICK_DEMO = [
    *("--set", "time_limit_s=0", "--set", "batch_size=2", "--set", "contrast_views=2"),
    *("--set", "data_pool=1", "--set", "device=cpu"),
]


@pytest.mark.parametrize(
    "argv",
    [["eval", "--checkpoint", "x", "--sweeps", "0"], ["train", "--steps", "0"], ["demo", "--out", "", *QUICK_DEMO]],
)
def test_counts_below_1_and_an_empty_folder_are_refused_by_the_parser(argv, tmp_path, monkeypatch):
    """--sweeps 0 reached evaluate (torch.cat of no sweeps: a traceback); --out '' trained in the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and not list(tmp_path.iterdir())


def test_a_demo_stopped_by_its_time_limit_exits_75_without_evaluating(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *QUICK_DEMO]) == 75
    assert (out / "checkpoints" / "step-00000000").is_dir() and not (out / "eval").exists()


def test_replayed_rows_time_each_variants_cuda_graph_side_by_side(monkeypatch):
    """compare(replay=True) adds graph_ms and graph_speedup from each variant's recorded graph (a fake here:
    the replay skips the variant's 20 ms of host work), notes a variant that cannot be recorded, and leaves
    out the variants that replay graphs of their own."""
    from benchmarks import harness

    _fake_cuda_memory(monkeypatch)

    def recorded(fn):
        if fn is refusing:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return lambda: time.sleep(0.002 if fn is fast else 0.004)

    def slow_host():
        time.sleep(0.02)

    fast, refusing = (lambda: time.sleep(0.02)), (lambda: None)
    monkeypatch.setattr(harness, "cuda_graph_replay", recorded)
    variants = {"reference": slow_host, "fast": fast, "refusing": refusing, "compile": slow_host}
    rows = {
        r["backend"]: r
        for r in harness.compare(variants, "cuda", {"case": "c"}, "reference", 1, 3, graphed=("compile",), replay=True)
    }
    assert rows["reference"]["median_ms"] >= 20 and 2 <= rows["fast"]["graph_ms"] < rows["reference"]["graph_ms"]
    assert rows["fast"]["graph_speedup"] == rows["reference"]["graph_ms"] / rows["fast"]["graph_ms"] > 1
    assert rows["refusing"]["note"] == "no CUDA graph: RuntimeError: operation not permitted when stream is capturing"
    assert "graph_ms" not in rows["refusing"] and "graph_ms" not in rows["compile"]
    cpu = harness.compare({"reference": fast}, "cpu", {"case": "c"}, "reference", 1, 1, replay=True)
    assert "graph_ms" not in cpu[0]  # nothing to record on the CPU


@pytest.mark.cuda
def test_a_failed_capture_restores_the_stream_and_names_its_cause():
    from benchmarks.harness import cuda_graph_replay

    x = torch.ones(4, device="cuda")
    stream = torch.cuda.current_stream()
    with pytest.raises(RuntimeError, match="capturing"):
        cuda_graph_replay(lambda: (x * 2).item())  # a host read: not allowed while capturing
    assert torch.cuda.current_stream() == stream
    assert (x * 2).sum().item() == 8  # and the device still works


@pytest.mark.cuda
def test_a_cuda_graph_replay_reruns_a_training_step():
    from benchmarks.harness import cuda_graph_replay
    from benchmarks.suites.unpool_cases import case_inputs, paper150_cases, runner, with_backend

    case = paper150_cases(4)[0]
    module, x, grad = case_inputs(case, "cuda", torch.float32)
    routed = with_backend(module, "triton")
    leaves = [x, *routed.parameters()]
    step = runner(routed, x, grad)
    step()
    eager = [t.grad.clone() for t in leaves]
    replay = cuda_graph_replay(step)
    for t in leaves:  # each replay must write the gradients afresh, not add to them
        t.grad.fill_(float("nan"))
    replay()
    replay()
    for t, expected in zip(leaves, eager):
        torch.testing.assert_close(t.grad, expected)
