"""Every Triton kernel compiles ahead of time for sm_90 (Hopper) in every autotune config, without spilling
registers to the stack. Needs no GPU: compiled in a subprocess without TRITON_INTERPRET (tests/aot.py)."""

from __future__ import annotations

import pytest
import torch

from dcign_fast.ops.backends import triton_installed

pytestmark = pytest.mark.skipif(not triton_installed(), reason="needs the triton package")


def unpool_conv_kernels() -> list[dict[str, object]]:
    """Compiles the unpool-conv kernels: K=7 valid in bf16 (all phases share a window) and K=3 same in fp32
    (phase by phase), each autotune config. Runs in the subprocess."""
    from dcign_fast.kernels.triton import unpool_conv as u
    from tests.aot import compile_kernel

    scalars = dict.fromkeys(("N", "H", "W", "C_IN", "C_OUT", "HO", "WO", "CHUNK"), 1)
    strides = {f"s{t}{d}": 1 for t in "xyg" for d in "nchw"}
    results = []
    for k, p, dtype in ((7, 0, torch.bfloat16), (3, 1, torch.float32)):
        constexprs = {**u._constexprs(*u._unions(k, k, p, p), "relu", dtype), "UPCAST": False}
        windows = {n: v for n, v in constexprs.items() if n[:2] not in ("RS", "RT", "CS", "CT") and n != "SHARED"}
        pointers = dict.fromkeys(("x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "dx_ptr"), dtype)
        pointers.update(taps_ptr=torch.int32, dw_ptr=torch.float32, db_ptr=torch.float32)
        for name, kernel, extra in (
            ("forward", u._forward_kernel, {**constexprs, "HAS_BIAS": True}),
            ("grad_input", u._grad_input_kernel, constexprs),
            ("grad_weight", u._grad_weight_kernel, {**windows, "HAS_BIAS": True, "BLOCK_C": 64, "BLOCK_O": 64}),
        ):
            for config in kernel.configs:
                args = {**pointers, **scalars, **strides, **extra, **config.kwargs}
                usage = compile_kernel(kernel, args, config.num_warps, config.num_stages)
                results.append({"kernel": name, "k": k, "dtype": str(dtype), "config": str(config), **usage})
    return results


def test_unpool_conv_kernels_compile_for_sm90_without_spills():
    from tests.aot import compile_in_subprocess

    results = compile_in_subprocess("tests.test_triton_aot", "unpool_conv_kernels")
    assert {r["kernel"] for r in results} == {"forward", "grad_input", "grad_weight"}
    for r in results:
        print({k: v for k, v in r.items() if k != "config"}, r["config"].split(", num_ctas")[0])
    assert all(0 < r["reg"] <= 255 for r in results)
    spilled = [r for r in results if r["stack"]]
    assert not spilled, spilled
