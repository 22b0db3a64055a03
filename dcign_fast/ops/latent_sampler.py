"""``sample_latents``: DC-IGN's reparameterised sampling with clamping, KL and the invariance pull, fused.

Semantics (``dcign_fast.ops.reference.sample_latents_reference`` is the oracle):

Forward. Inactive columns j (``active[j]`` False: latents of factors that do not vary in this batch)
have mu and logvar replaced by their batch mean (``clamp="mean"``, the paper) or by row 0
(``clamp="first"``, the original Lua code). With the clamped ``mu_c, logvar_c``::

    z[b, j] = mu_c[b, j] + exp(0.5 * logvar_c[b, j]) * eps[b, j]
    kl[b]   = -0.5 * sum_j (1 + logvar_c[b, j] - mu_c[b, j]**2 - exp(logvar_c[b, j]))

eps is element ``b * D + j`` of the Philox stream ``(seed, offset)`` (:mod:`dcign_fast.ops.philox`).

Backward. Active columns get the true gradients of z and kl. Inactive columns get no gradient from
z or kl; instead ``grad_mu[b, j] = invariance * (mu[b, j] - mean_b mu[:, j])`` and the same for
logvar, whatever the output gradients are, so gradient descent pulls them toward the batch mean.
This is deliberately NOT the gradient of the forward: it is DC-IGN's training signal (the original
code zeroes the reconstruction gradient of clamped units and inserts this invariance term). So it does
not scale with the loss: a loss divided by N (gradient accumulation over N micro-batches) or multiplied by
a loss scale needs ``invariance`` scaled the same way for the same pull. With ``invariance=0`` inactive
columns get exactly zero gradients, on every backend.

NaN and inf propagate as in the reference's torch expression: a non-finite entry of an active column
reaches its own z entry and its row's kl; one in an inactive column under ``clamp="mean"`` reaches
the whole column (the mean is non-finite) and hence every row's kl.

Backends:
  reference  the oracle: plain torch with autograd.
  torch      vectorised torch forward and backward; runs anywhere. Draws eps with ``philox.normal_fast``
             (the same bits as ``philox.normal``); on the CPU its backward regenerates eps only for active
             columns when at most 3/4 of them are active (the others' gradients never read eps).
  triton     one forward and one backward kernel (:mod:`dcign_fast.kernels.triton.latent_sampler`);
             float16/bfloat16/float32 on CUDA (or under TRITON_INTERPRET=1).
  cuda       CUDA C++ kernels of the compiled extension (:mod:`dcign_fast.kernels.cuda_latent_sampler`, csrc/);
             float16/bfloat16/float32 on CUDA. Never chosen by auto.
  auto       triton for CUDA tensors when Triton >= 3.4 is installed and the dtype is not float64, else torch.
The torch, triton and cuda backends run inside the custom op ``dcign_fast::sample_latents``
(:mod:`dcign_fast.ops.latent_sampler_op`, so torch.compile traces them without graph breaks); they save only mu,
logvar, active and the (seed, offset) drawn with; eps is regenerated in the backward. seed=None draws
(seed, offset) on mu's device and the kernels read them there (:func:`draw_rng`): a CUDA graph captured
so draws anew at every replay, like torch's own random ops; with an explicit seed every replay draws the
same noise. Under ``torch.func.vmap`` an explicit seed gives every sample the same
noise; seed=None draws each sample its own (``randomness="different"``, torch/triton/cuda backends), and
is refused where vmap's randomness or the reference backend would make it mean something else.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from dcign_fast.bounds import FLOAT32_MAX, Bounds, is_integer
from dcign_fast.ops import latent_sampler_op, philox
from dcign_fast.ops._checks import (
    check_like,
    check_no_forward_ad,
    check_on_device,
    check_tensor,
    check_while_compiling,
)
from dcign_fast.ops.backends import Kernels, check_backend_runs_on, imported_kernels, triton_available
from dcign_fast.ops.reference import invariance_pull, sample_latents_reference

CLAMPS = ("mean", "first")
SEED_RANGE = (-(2**63), 2**64)  # torch.manual_seed's; negative seeds wrap to uint64
Outputs = tuple[torch.Tensor, torch.Tensor]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _clamped(
    mu: torch.Tensor, logvar: torch.Tensor, active: torch.Tensor | None, clamp_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and logvar in the compute dtype, inactive columns replaced by the batch statistic."""
    m, lv = mu.to(_compute_dtype(mu)), logvar.to(_compute_dtype(mu))
    if active is None:
        return m, lv
    if clamp_first:
        return torch.where(active, m, m[:1]), torch.where(active, lv, lv[:1])
    return torch.where(active, m, m.mean(0, keepdim=True)), torch.where(active, lv, lv.mean(0, keepdim=True))


def _eps(mu: torch.Tensor, seed: philox.Value, offset: philox.Value) -> torch.Tensor:
    return philox.normal_fast(seed, offset, tuple(mu.shape), mu.device).to(_compute_dtype(mu))


def _sparse_columns(active: torch.Tensor | None, mu: torch.Tensor) -> torch.Tensor | None:
    """The active columns when the backward should regenerate eps for them alone, else None.

    Only active columns' gradients read eps (inactive ones get the invariance pull), so with few active
    columns (a DC-IGN batch varies one factor) the backward draws B * len(columns) normals instead of B * D.
    CPU only: finding the columns reads ``active`` on the host (a sync on CUDA, an error under graph capture).
    """
    if active is None or mu.device.type != "cpu":
        return None
    columns = active.nonzero()[:, 0]
    return columns if 4 * columns.numel() <= 3 * mu.shape[1] else None


def sample_latents_torch_forward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    clamp_first: bool,
    seed: philox.Value,
    offset: philox.Value,
) -> Outputs:
    m, lv = _clamped(mu, logvar, active, clamp_first)
    std = torch.exp(0.5 * lv)
    z = torch.addcmul(m, std, _eps(mu, seed, offset))
    kl = -0.5 * torch.sum(1 + lv - m * m - std * std, dim=1)
    return z.to(mu.dtype), kl.to(mu.dtype)


def sample_latents_torch_backward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    invariance: float,
    seed: philox.Value,
    offset: philox.Value,
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
) -> Outputs:
    compute = _compute_dtype(mu)
    m, lv = mu.to(compute), logvar.to(compute)
    gz, gkl = grad_z.to(compute), grad_kl.to(compute)[:, None]
    # d z / d mu = 1, d kl / d mu = mu; d z / d logvar = std * eps / 2, d kl / d logvar = (exp(logvar) - 1) / 2.
    grad_mu = torch.addcmul(gz, gkl, m)
    if active is not None:
        grad_mu = torch.where(active, grad_mu, invariance_pull(m, invariance))
    columns = _sparse_columns(active, mu)
    if columns is None:
        std = torch.exp(0.5 * lv)
        grad_logvar = 0.5 * (gz * std * _eps(mu, seed, offset) + gkl * (std * std - 1))
        if active is not None:
            grad_logvar = torch.where(active, grad_logvar, invariance_pull(lv, invariance))
    else:
        # The same elementwise expressions (so the same bits) on the active columns alone, eps drawn there only.
        grad_logvar = invariance_pull(lv, invariance)
        index = torch.arange(0, mu.numel(), mu.shape[1], device=mu.device)[:, None] + columns
        std = torch.exp(0.5 * lv[:, columns])
        eps = philox.normal_at(seed, offset, index).to(compute)
        grad_logvar[:, columns] = 0.5 * (gz[:, columns] * std * eps + gkl * (std * std - 1))
    return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)


def sample_latents_double_backward(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None,
    invariance: float,
    seed: philox.Value,
    offset: philox.Value,
    grad_z: torch.Tensor,
    grad_kl: torch.Tensor,
    grad_grad_mu: torch.Tensor,
    grad_grad_logvar: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of the backward (for create_graph=True, e.g. a gradient penalty): given
    the gradients of (grad_mu, grad_logvar), those of (mu, logvar, grad_z [B, D], grad_kl [B]). Written in
    differentiable torch ops on the inputs, so higher orders follow; eps is regenerated once more."""
    compute = _compute_dtype(mu)
    m, lv, gz, gkl = mu.to(compute), logvar.to(compute), grad_z.to(compute), grad_kl.to(compute)[:, None]
    ggm, gglv = grad_grad_mu.to(compute), grad_grad_logvar.to(compute)
    if active is not None:  # only active columns' gradients depend on grad_z, grad_kl and eps
        ggm, gglv = torch.where(active, ggm, 0.0), torch.where(active, gglv, 0.0)
    std = torch.exp(0.5 * lv)
    half_std_eps = 0.5 * std * _eps(mu, seed, offset)
    # From grad_mu = gz + gkl * m and grad_logvar = gz * std * eps / 2 + gkl * (std^2 - 1) / 2:
    d_grad_z = ggm + gglv * half_std_eps
    d_grad_kl = (ggm * m + 0.5 * gglv * (std * std - 1)).sum(1)
    d_mu, d_logvar = ggm * gkl, gglv * (0.5 * gz * half_std_eps + gkl * std * std * 0.5)
    if active is not None:

        def pulled(gg: torch.Tensor) -> torch.Tensor:  # through invariance * (x - mean_b x), inactive columns
            gg = gg.to(compute)
            return torch.where(active, 0.0, invariance_pull(gg, invariance))

        d_mu, d_logvar = d_mu + pulled(grad_grad_mu), d_logvar + pulled(grad_grad_logvar)
    return d_mu.to(mu.dtype), d_logvar.to(logvar.dtype), d_grad_z.to(grad_z.dtype), d_grad_kl.to(grad_kl.dtype)


TORCH_KERNELS = Kernels(sample_latents_torch_forward, sample_latents_torch_backward)

# Backend name -> its forward and backward halves, which run inside the custom op dcign_fast::sample_latents
# (dcign_fast.ops.latent_sampler_op); the reference is plain torch that autograd differentiates.
#   forward(mu, logvar, active, clamp_first, seed, offset) -> (z [B, D], kl [B]) in mu's dtype;
#   backward(mu, logvar, active, invariance, seed, offset, grad_z, grad_kl) -> (grad_mu, grad_logvar);
# seed and offset are ints, or 0-d int64 tensors on mu's device holding them (``philox.Value``).
KERNELS: dict[str, Callable[[], Kernels]] = {
    "torch": lambda: TORCH_KERNELS,
    "triton": imported_kernels("dcign_fast.kernels.triton.latent_sampler", "forward", "backward"),
    "cuda": imported_kernels("dcign_fast.kernels.cuda_latent_sampler", "sampler_forward", "sampler_backward"),
}
IMPLEMENTATIONS = ("reference", *KERNELS)


def choose_backend(mu: torch.Tensor) -> str:
    """The backend ``"auto"`` picks for these tensors."""
    if mu.device.type == "cuda" and triton_available() and mu.dtype != torch.float64:
        return "triton"
    return "torch"


def draw_rng(device: torch.device) -> torch.Tensor:
    """int64 [2] on ``device``: a fresh (seed, offset), each uniform in [0, 2**62), drawn by torch's
    generator for the device, so ``torch.manual_seed`` governs it and successive calls differ.

    Drawn by a kernel and, on a CUDA device, read by the sampler's kernels where it lies: the host never
    waits for it, and a captured CUDA graph draws anew at every replay (torch's generators are graph-safe;
    warm up with seed=None too, so the Triton kernels that read it are compiled before the capture).
    Offsets below 2**62 leave room for any draw's counters below 2**63.
    """
    # randint, not random_ on an empty tensor (the same numbers): torch.compile traces an out-of-place draw.
    return torch.randint(2**62, (2,), dtype=torch.int64, device=device)


def seed_offset(seed: int | None, rng: torch.Tensor | None) -> tuple[philox.Value, philox.Value]:
    """The (seed, offset) of a draw: a given ``seed`` (uint64) with offset 0, else the pair ``rng`` holds
    (:func:`draw_rng`): 0-d views of a CUDA or meta tensor (read by the kernels there), ints from any other."""
    if seed is not None:
        return seed % 2**64, 0
    if rng is None:
        raise ValueError("seed_offset takes rng (draw_rng's pair) when seed is None")
    if rng.device.type in ("cuda", "meta"):  # (a meta tensor holds no values to read)
        return rng[0], rng[1]  # a read on the host would wait for the GPU, and be frozen into a captured graph
    drawn, offset = rng.tolist()
    return drawn, offset


def as_int64(seed: int) -> int:
    """A seed in [-2**63, 2**64) as the int64 with the same bits as its uint64 (op arguments are int64)."""
    seed %= 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def check_vmap_randomness(seed: int | None, backend: str) -> None:
    """seed=None draws noise from torch's generator, which vmap does not see: PyTorch's per-sample fallback
    runs the fused op once per sample (randomness="different"), while the reference draws once for the
    whole vmap (every sample the same). Any other combination is refused rather than silently ignored.
    (Not checked while torch.compile traces: dynamo cannot read the functorch stack.)"""
    if seed is not None or torch.compiler.is_compiling():
        return
    try:  # torch internals: should a release move them, vmap goes unchecked rather than every call failing
        from torch._functorch.pyfunctorch import VmapInterpreter, retrieve_all_functorch_interpreters
    except ImportError:
        return
    for interpreter in retrieve_all_functorch_interpreters():
        if not isinstance(interpreter, VmapInterpreter):
            continue
        if interpreter.randomness() == "error":
            raise RuntimeError(
                "sample_latents with seed=None draws random noise, which vmap(randomness='error') forbids: "
                "pass seed= or choose randomness='different'"
            )
        if interpreter.randomness() == "same" or backend == "reference":
            raise NotImplementedError(
                f"sample_latents with seed=None under vmap(randomness={interpreter.randomness()!r}) and "
                f"backend={backend!r} cannot draw as asked: pass seed= (the same noise for every sample), or "
                "use randomness='different' with another backend (each sample its own noise)"
            )


def check_sample_latents_args(
    mu: object, logvar: object, active: object, clamp: object, invariance: Any, seed: object
) -> None:
    """Validates every argument; each error names the argument and what was expected."""
    mu = check_tensor("mu", mu, 2, "[batch, latents]")
    logvar = check_tensor("logvar", logvar, 2, "[batch, latents]")
    check_like("logvar", logvar, "mu", mu)
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if mu.numel() == 0:
        raise ValueError(f"mu must have at least one row and one column, got shape {tuple(mu.shape)}")
    if active is not None:
        if not isinstance(active, torch.Tensor):
            raise TypeError(f"active must be a bool tensor or None, got {type(active).__name__}")
        if active.dtype != torch.bool:
            raise TypeError(f"active must be a bool tensor, got dtype {active.dtype}")
        if active.shape != mu.shape[1:]:
            raise ValueError(f"active must have shape [{mu.shape[1]}] (one flag per latent), got {tuple(active.shape)}")
        check_on_device("active", active, mu.device, "mu's device")
    if clamp not in CLAMPS:
        raise ValueError(f"clamp must be one of {CLAMPS}, got {clamp!r}")
    if torch.compiler.is_compiling():  # dynamo makes a changing invariance symbolic, which math.isfinite rejects
        # (NaN and inf fail the comparison too.)
        check_while_compiling(0 <= invariance <= FLOAT32_MAX, "invariance must be >= 0 and finite")
    else:  # numpy scalars too: sample_latents passes Python numbers on
        Bounds(0).check("invariance", invariance)
        if invariance > FLOAT32_MAX:  # the kernels compute the pull in float32
            raise ValueError(f"invariance must fit in a float32 (at most 3.4e38), got {invariance!r}")
    if seed is not None:
        if not is_integer(seed):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        if not SEED_RANGE[0] <= int(seed) < SEED_RANGE[1]:
            raise ValueError(f"seed must lie in [-2**63, 2**64), got {seed}")


def sample_latents(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    active: torch.Tensor | None = None,
    *,
    clamp: str = "mean",
    invariance: float = 0.0,
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples DC-IGN latents with clamping of inactive latents, their KL and the invariance pull.

    See the module docstring for the exact forward and (deliberately non-standard) backward.

    Args:
        mu: [B, D] means, float16/bfloat16/float32/float64 (float64: the reference and torch backends only).
        logvar: [B, D] log-variances, same dtype and device as mu.
        active: bool [D], True for latents of the factor that varies in this batch; None: all active
            (a plain VAE).
        clamp: "mean" (inactive latents take their batch mean, the paper) or "first" (row 0, the
            original code).
        invariance: strength >= 0 of the pull of inactive latents toward their batch mean.
        seed: None draws (seed, offset) with torch's generator for mu's device (in a captured CUDA
            graph: anew at every replay; warm up with seed=None before capturing); an int in
            [-2**63, 2**64) is used as given (negative values wrap to uint64) with offset 0.
        backend: "auto", "reference", "torch", "triton" or "cuda".

    Returns:
        z [B, D] and kl [B] (KL of each row's clamped posterior to N(0, I)), in mu's dtype.
    """
    check_sample_latents_args(mu, logvar, active, clamp, invariance, seed)
    invariance, seed = float(invariance), None if seed is None else int(seed)
    check_backend_runs_on(backend, mu.device, IMPLEMENTATIONS)
    name = choose_backend(mu) if backend == "auto" else backend
    check_vmap_randomness(seed, name)
    if name in ("triton", "cuda") and mu.dtype == torch.float64:
        raise ValueError(f"backend={name!r} takes float16, bfloat16 or float32 mu and logvar, got float64")
    # Every backend: the reference's invariance pull is an autograd.Function without a jvp, whose own error does
    # not say what to do instead. (A jvp there would make torch.compile break its graph.)
    check_no_forward_ad("sample_latents", name, mu, logvar)
    if name == "reference":
        rng = draw_rng(mu.device) if seed is None else None
        key: philox.Value
        offset: philox.Value
        if torch.compiler.is_compiling():
            # As 0-d tensors on mu's device: Inductor mistypes integer ops between a tensor and a symbolic int seed
            # (invalid C++), and rng read on the host would be a sync.
            if seed is not None:  # as_int64 would need 2**64, which Inductor cannot print as an int64 either
                check_while_compiling(seed <= 2**63 - 1, "torch.compile of backend='reference' takes seeds < 2**63")
                rng = torch.tensor([seed, 0], dtype=torch.int64, device=mu.device)
            assert rng is not None  # drawn above when seed is None
            key, offset = rng[0], rng[1]
        else:
            key, offset = seed_offset(seed, rng)
        return sample_latents_reference(mu, logvar, active, clamp, invariance, key, offset)
    if seed is not None:
        seed = as_int64(seed)
    # The registered custom op; with seed None it draws (seed, offset) itself.
    z, kl, _ = latent_sampler_op.sampler_forward(mu, logvar, active, clamp == "first", invariance, seed, name)
    return z, kl


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, *, seed: int | None = None, backend: str = "auto"
) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps with the sampler's noise: ``sample_latents(mu, logvar)[0]``.

    Shapes: mu, logvar [B, D] -> z [B, D].
    """
    return sample_latents(mu, logvar, seed=seed, backend=backend)[0]
