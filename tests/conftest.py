"""Test setup. Without a GPU, Triton kernels run in Triton's CPU interpreter; that must be switched on
before any @triton.jit decorator runs, i.e. before the package's kernels are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# pytest-xdist workers share the cores: each worker's torch thread pool gets its share of them, so that N workers
# do not run N times as many threads as there are cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _takes_triton(item: pytest.Item) -> bool:
    """Whether a test is parametrised with the triton backend (any parameter whose value is "triton")."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(value, str) and value == "triton" for value in params.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from dcign_fast.ops.backends import triton_available, triton_unavailable_reason

    # Cases that need what this machine lacks skip, named: a GPU, or triton (an optional dependency, not
    # installed off x86-64 Linux), wherever a test is parametrised with it, unless it says it also runs without.
    gpu, triton = torch.cuda.is_available(), triton_available()
    for item in items:
        if not gpu and "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        elif not triton and _takes_triton(item) and "runs_without_triton" not in item.keywords:
            item.add_marker(pytest.mark.skip(reason=triton_unavailable_reason()))
