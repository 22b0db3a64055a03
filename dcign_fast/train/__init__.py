"""Training: DC-IGN's disentangling procedure, checkpoints, many processes, the CLI."""

from dcign_fast.train.config import TrainConfig

__all__ = ["TrainConfig", "Trainer"]


def __getattr__(name: str):
    # The trainer pulls in the renderer and distributed code; load it on first use.
    if name == "Trainer":
        from dcign_fast.train.trainer import Trainer

        return Trainer
    raise AttributeError(name)
