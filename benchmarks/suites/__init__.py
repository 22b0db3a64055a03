"""Benchmark suites: each module exposes ``run(device: str, quick: bool) -> list[dict]``."""
