"""The code a reader copies from README.md and docs/: every Python example runs as written, and every command
line the README shows is accepted by the command it names (parsed, and for training resolved to its options;
nothing trains)."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dcign_fast.cli import build_parser
from dcign_fast.train import cli as train_cli

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced ``language`` block in the documents (the fence may be indented)."""
    fence = re.compile(rf"^( *)```{language}\n(.*?)^\1```", re.MULTILINE | re.DOTALL)
    blocks = []
    for document in DOCUMENTS:
        text = document.read_text()
        for match in fence.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            body = "\n".join(row.removeprefix(match.group(1)) for row in match.group(2).splitlines())
            blocks.append((f"{document.relative_to(ROOT)}:{line}", body))
    return blocks


PYTHON_EXAMPLES = code_blocks("python")


def decoder() -> nn.Sequential:
    """A small decoder of the kind the patch examples fuse: upsample (nearest) then convolve, twice."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(6, 2, 3, padding=1),
    )


def example_inputs() -> dict[str, object]:
    """The names the examples take as given, at the sizes their comments state (fresh random values)."""
    torch.manual_seed(0)
    mu = torch.randn(3, 200)
    return {
        "x": torch.randn(2, 5, 6, 7),
        "weight": torch.randn(4, 5, 3, 3),
        "bias": torch.randn(4),
        "conv2d": nn.Conv2d(96, 96, 7),
        "my_decoder": decoder(),
        "model": decoder(),
        "mu": mu,
        "logvar": torch.randn_like(mu) * 0.1,
        "active": torch.arange(200) < 1,
        "images": torch.rand(2, 1, 150, 150),
    }


@pytest.mark.parametrize("where, code", PYTHON_EXAMPLES, ids=[where for where, _ in PYTHON_EXAMPLES])
def test_python_examples_run_as_written(where: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # examples save models to relative paths
    names = example_inputs()
    given = dict(names)
    model_before = given["model"]
    sample = torch.rand(1, 4, 5, 5)
    expected_decoding = model_before(sample) if isinstance(model_before, nn.Sequential) else None
    exec(compile(code, where, "exec"), names)  # noqa: S102 (the documents' own code)

    if "y" in names:  # the op's example states its meaning in a comment: interpolate, then convolve
        x, weight, bias = given["x"], given["weight"], given["bias"]
        expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias)
        torch.testing.assert_close(names["y"], expected, rtol=1e-5, atol=1e-5)
    if "report" in names:  # the patch examples: something was replaced, and the decoder still decodes the same
        assert str(names["report"]).startswith("replaced 2, skipped 0"), names["report"]  # both pairs of decoder()
        torch.testing.assert_close(model_before(sample), expected_decoding)


def test_the_examples_are_found():
    """The block finder works: a regex that matched nothing would pass every test above."""
    places = [where.split(":")[0] for where, _ in PYTHON_EXAMPLES]
    assert "README.md" in places and "docs/patch.md" in places, places
    assert any("sample_latents" in code for _, code in PYTHON_EXAMPLES)


def readme_commands() -> list[list[str]]:
    """Each command line in the README's bash blocks, as argv, without its trailing comment."""
    commands = []
    for where, block in code_blocks("bash"):
        if where.startswith("README.md"):
            commands += [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    return commands


def parsed(argv: list[str]) -> argparse.Namespace | None:
    """``argv`` parsed by the program it runs, when that is one of this package's commands (else None)."""
    if argv[0] == "dcign-fast":
        return build_parser().parse_args(argv[1:])
    if argv[0] == "torchrun" and "dcign_fast.train" in argv:
        args = train_cli.build_parser().parse_args(argv[argv.index("dcign_fast.train") + 1 :])
        args.command = "train"
        return args
    return None


README_COMMANDS = [argv for argv in readme_commands() if argv[0] in ("dcign-fast", "torchrun")]


@pytest.mark.parametrize("argv", README_COMMANDS, ids=[" ".join(argv[:3]) for argv in README_COMMANDS])
def test_readme_command_lines_are_accepted(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.yaml").write_text("steps: 100\n")  # the --config file the README's line assumes
    args = parsed(argv)
    assert args is not None, argv
    if args.command == "train":  # every --set key and value is checked when the options are resolved
        config = train_cli.config_from_args(args)
        assert config.run_folder == Path(args.out or f"runs/{config.preset}")


def test_readme_commands_are_found():
    programs = {(argv[0], argv[1] if argv[0] == "dcign-fast" else "") for argv in README_COMMANDS}
    expected = {("dcign-fast", name) for name in ("train", "eval", "rerender", "render")} | {("torchrun", "")}
    assert expected <= programs, programs
