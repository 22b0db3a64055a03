"""Compiled and JIT kernels behind the ops' "triton" and "cuda" backends."""
