"""DC-IGN models and their presets."""

from dcign_fast.models.dcign import DCIGN, PRESETS, DCIGNConfig, preset

__all__ = ["DCIGN", "DCIGNConfig", "PRESETS", "preset"]
