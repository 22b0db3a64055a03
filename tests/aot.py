"""Ahead-of-time compilation of Triton kernels for a GPU target, without a GPU (shared by the kernel tests).

Run it where TRITON_INTERPRET is unset: under the interpreter ``@triton.jit`` yields functions that
cannot be compiled. :func:`compile_in_subprocess` takes care of that from a test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}


def _jit_function(kernel: object) -> object:
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_kernel(
    kernel: object, args: dict[str, object], num_warps: int = 4, num_stages: int = 3, arch: int = 90
) -> dict[str, object]:
    """Compiles ``kernel`` for CUDA compute capability ``arch``; returns its resource usage (registers,
    stack bytes, static shared memory: see :func:`resource_usage`; and Triton's dynamic shared memory).

    ``args`` gives every argument by name: a torch.dtype for a pointer, int or float for a scalar, and the
    value of each constexpr.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(kernel)
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    for param in fn.params:
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.dtype):
            signature[param.name] = "*" + TRITON_TYPES[value]
        else:
            signature[param.name] = "fp32" if isinstance(value, float) else "i32"
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    return {**resource_usage(compiled.asm["cubin"]), "dynamic_shared": compiled.metadata.shared}


def compile_in_subprocess(module: str, function: str, timeout: float = 600) -> list[dict[str, object]]:
    """Runs ``module.function()`` (which returns a JSON-able list) in a fresh interpreter without
    TRITON_INTERPRET, and returns its result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json, {module} as m; print(json.dumps(m.{function}()))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"AOT compile failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in a cubin, read by the cuobjdump bundled with Triton."""
    import re
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}
