"""Triton kernels (one file per op). Importing this package needs the ``triton`` package."""
