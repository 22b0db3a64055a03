"""Re-rendering and disentanglement metrics."""

from dcign_fast.eval.evaluate import evaluate
from dcign_fast.eval.rerender import rerender, sweep_grid

__all__ = ["evaluate", "rerender", "sweep_grid"]
