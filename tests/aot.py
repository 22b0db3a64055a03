"""Ahead-of-time compilation of Triton kernels for a GPU target, without a GPU (shared by the kernel tests).

The kernels are compiled from real launches: :func:`recorded_launches` runs a backend's own launcher code
with the kernels replaced by recorders, and :func:`compile_launch` compiles what Triton would compile for
each recorded call on a GPU, with the launcher's specialisation of the argument values (ints equal to 1
become constants; ints and pointers divisible by 16 are marked so, which is what lets Triton prove that
a load is contiguous and aligned and issue it as 16-byte vectors or async copies).

Run it where TRITON_INTERPRET is unset: under the interpreter ``@triton.jit`` yields functions that
cannot be compiled. :func:`compile_in_subprocess` takes care of that from a test session.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

# Launch keywords that are compile options, not kernel arguments.
LAUNCH_OPTIONS = ("num_warps", "num_stages")
# sm_90's shared memory per block (227 KiB, with the opt-in that Triton requests).
SM90_SHARED_BYTES = 232448


def aot_unsupported_reason() -> str:
    """Why kernels cannot be compiled ahead of time here ("" when they can): :func:`compile_launch` replays
    the launcher's specialisation, which Triton exposes from 3.5 on."""
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        return "ahead-of-time compiles need triton>=3.5 (triton._C.libtriton.native_specialize_impl)"
    return ""


@dataclass
class Launch:
    """One recorded ``kernel[grid](...)`` call: the (autotuned) kernel and every argument by name."""

    kernel: object
    args: dict[str, object]


class _Recorder:
    def __init__(self, kernel: object, launches: list[Launch]) -> None:
        self.kernel = kernel
        self.launches = launches

    def __getitem__(self, grid: object):
        def launch(*args: object, **kwargs: object) -> None:
            names = _jit_function(self.kernel).arg_names
            self.launches.append(Launch(self.kernel, {**dict(zip(names, args)), **kwargs}))

        return launch


@contextlib.contextmanager
def recorded_launches(module: ModuleType, *names: str, into: list[Launch] | None = None) -> Iterator[list[Launch]]:
    """While the block runs, the kernels ``module.<name>`` record their launches (in ``into`` when given: one
    list across modules) instead of running."""
    launches: list[Launch] = [] if into is None else into
    originals = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(module, name, _Recorder(kernel, launches))
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)


def _jit_function(kernel: object) -> object:
    """The JITFunction under @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _configs(kernel: object, args: dict[str, object]) -> list[object]:
    """The autotune configs a launch with ``args`` would try (after the kernel's early pruning); [None]
    for a kernel without autotuning."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return [None]
    prune = getattr(kernel, "early_config_prune", None)
    return prune(configs, args) if prune else configs


def _specialise(fn: object, args: dict[str, object]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher derives them from argument values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int], tuple] = {}
    for index, param in enumerate(fn.params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
            continue
        kind, key = native_specialize_impl(
            BaseBackend, value, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
        if kind == "constexpr":
            signature[param.name], constexprs[param.name] = "constexpr", key
            continue
        signature[param.name] = kind
        if isinstance(key, str) and BaseBackend.parse_attr(key):
            attrs[(index,)] = tuple(tuple(attr) for attr in BaseBackend.parse_attr(key))  # hashable
    return signature, constexprs, attrs


def compile_launch(launch: Launch, arch: int = 90) -> list[dict[str, object]]:
    """Compiles ``launch`` for CUDA compute capability ``arch`` in each autotune config it would try.

    Returns one dict per config: kernel name, config, block sizes (every ``BLOCK_*`` argument), threads per
    program, resource usage (:func:`resource_usage`), Triton's dynamic shared memory, the instruction
    counts of :func:`instruction_counts` and ``issue_per_mma`` (:func:`issue_per_mma_cycle`).
    """

    fn = _jit_function(launch.kernel)
    results = []
    for config in _configs(launch.kernel, launch.args):
        # A plain launch may set its warps and stages itself (num_warps=...); a config sets them for autotuning.
        args = {name: value for name, value in launch.args.items() if name not in LAUNCH_OPTIONS}
        options = {name: value for name, value in launch.args.items() if name in LAUNCH_OPTIONS}
        if config is not None:
            args.update(config.kwargs)
            options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        key = tuple(tuple(sorted(part.items())) for part in (*_specialise(fn, args), options))
        results.append(
            {
                "kernel": fn.__name__.strip("_").removesuffix("_kernel"),
                "config": ", ".join(f"{k}={v}" for k, v in {**(config.kwargs if config else {}), **options}.items()),
                "blocks": {name: value for name, value in args.items() if name.startswith("BLOCK_")},
                "threads": 32 * options.get("num_warps", 4),
                **_compile(fn, key, arch),
            }
        )
    return results


@functools.cache
def _compile(fn: object, key: tuple, arch: int) -> dict[str, object]:
    """Resources, instruction counts and the hot loop's issue bound of ``fn`` compiled with ``key`` = (signature,
    constexprs, attrs, options) as item tuples; cached, since launches of different shapes often specialise
    alike."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = (dict(part) for part in key)
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", arch, 32),
        options=options,
    )
    return {
        **resource_usage(compiled.asm["cubin"]),
        "dynamic_shared": compiled.metadata.shared,
        **instruction_counts(compiled.asm["ptx"]),
        "issue_per_mma": issue_per_mma_cycle(_cuobjdump_cubin(compiled.asm["cubin"], "-sass")),
    }


def instruction_counts(ptx: str) -> dict[str, int]:
    """Instructions that show how a kernel uses the GPU: tensor-core multiplies (Hopper's wgmma, Ampere's
    mma), global-to-shared async copies of 16 bytes and narrower ones, and global loads as vectors or
    element by element."""
    copies = re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*(0x[0-9a-f]+|\d+)\s*[,;]", ptx)
    loads = re.findall(r"\bld\.global[\w.]*", ptx)
    return {
        "tensor_core": len(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\b", ptx)),
        "async_copy_16": sum(int(width, 0) == 16 for width in copies),
        "async_copy_narrow": sum(int(width, 0) < 16 for width in copies),
        "load_vector": sum(".v" in load for load in loads),
        "load_scalar": sum(".v" not in load for load in loads),
    }


# sm_90's dense 16-bit tensor-core rate: multiply-adds per clock per SM (989 TFLOP/s on an H100 SXM's 132 SMs
# at 1.83 GHz).
SM90_MACS_PER_CLOCK = 2048


def issue_per_mma_cycle(sass: str) -> float | None:
    """A static speed bound of a GEMM kernel: in its loop with the most tensor-core multiplies, the clocks its
    warps need to issue one trip's instructions over the clocks the tensor cores need for that trip's 16-bit
    multiply-adds. Above 1 the loop cannot keep the tensor cores busy whatever the memory does. None without
    such a loop.

    Per 4 warps (a warpgroup, whose warps issue on the SM's 4 schedulers, one instruction per clock each): they
    issue a trip in as many clocks as it has instructions, while its multiplies take their multiply-adds over
    the SM's rate; more warps scale both alike. A warpgroup's HGMMA 64xNxK multiplies 64 N K; a warp's HMMA.16816
    (mma.sync m16n8k16) 16 x 8 x 16, four times over in 4 warps. (The rate is wgmma's peak: mma.sync reaches
    less of it, so the bound flatters HMMA loops.)"""
    lines = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for end, text in lines:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < end:
            loops.append([t for a, t in lines if int(target.group(1), 16) <= a <= end])

    def macs(text: str) -> int:
        if m := re.search(r"HGMMA\.64x(\d+)x(\d+)", text):
            return 64 * int(m.group(1)) * int(m.group(2))
        return 4 * 16 * 8 * 16 if re.search(r"\bHMMA\.16816\b", text) else 0

    trips = [sum(macs(t) for t in body) for body in loops]
    best = max(range(len(loops)), key=trips.__getitem__, default=None)
    if best is None or not trips[best]:
        return None
    return len(loops[best]) / (trips[best] / SM90_MACS_PER_CLOCK)


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


def _usage(text: str) -> dict[str, int]:
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def _cuobjdump_tool() -> Path:
    """The cuobjdump bundled with Triton."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def cuobjdump_unavailable_reason() -> str:
    """Why :func:`_cuobjdump` cannot run here ("" when it can): triton, which bundles it, is optional."""
    try:
        tool = _cuobjdump_tool()
    except Exception as err:  # (a broken install raises more than ImportError)
        return f"needs the cuobjdump bundled with triton: importing triton failed ({type(err).__name__}: {err})"
    return "" if tool.is_file() else f"needs the cuobjdump bundled with triton, not found at {tool}"


def _cuobjdump(flag: str, path: str, *options: str) -> str:
    """``cuobjdump <flag> <options> <path>`` of a cubin or a fat binary, by the cuobjdump bundled with Triton."""
    return subprocess.run([str(_cuobjdump_tool()), flag, *options, path], capture_output=True, text=True).stdout


def _cuobjdump_cubin(cubin: bytes, flag: str) -> str:
    """``cuobjdump <flag>`` of a cubin held in memory."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _cuobjdump(flag, f.name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in a cubin."""
    return _usage(_cuobjdump_cubin(cubin, "--dump-resource-usage"))


def kernels_resource_usage(binary: Path) -> list[tuple[str, str, dict[str, int]]]:
    """(architecture, mangled name, REG/STACK/SHARED/LOCAL) of every kernel in a fat binary such as a compiled
    extension module."""
    rows = []
    for section in _cuobjdump("--dump-resource-usage", str(binary)).split("Fatbin elf code:")[1:]:
        arch = re.search(r"arch = (\S+)", section)
        for name, usage in re.findall(r"Function (\S+):\n(.*)", section):
            rows.append((arch.group(1) if arch else "?", name, _usage(usage)))
    return rows


def kernel_sass(binary: Path, arch: str, name: str) -> str:
    """The SASS of one kernel (mangled name) for one architecture of a fat binary."""
    return _cuobjdump("-sass", str(binary), "-arch", arch, "-fun", name)
