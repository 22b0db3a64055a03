"""sample_latents: every backend against the reference, values and both gradients; noise; errors."""

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dcign_fast
from dcign_fast.kernels import cuda
from dcign_fast.ops.backends import triton_available
from dcign_fast.ops.latent_sampler import sample_latents
from dcign_fast.ops.reference import sample_latents_reference
from tests.aot import aot_unsupported_reason, compile_in_subprocess, compile_launch, recorded_launches
from tests.helpers import NEEDS_TRITON, poisoned_allocations, seed_none_backward_error, seed_offset_mismatches

FUSED = ["torch", "triton"]
# The GPU tests' backends: the fused ones and the CUDA C++ kernels where the extension was built.
ON_GPU = [
    *FUSED,
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda.available(), reason="dcign_fast._C not built")),
]
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 2e-2},
}


def random_inputs(batch, dim, dtype=torch.float32):
    mu = torch.randn(batch, dim) * 1.5
    logvar = torch.randn(batch, dim) * 0.7 - 0.5
    return mu.to(dtype), logvar.to(dtype)


def run_with_grads(backend, mu, logvar, active, grad_z, grad_kl, **kwargs):
    """(z, kl, grad_mu, grad_logvar); None output gradients leave that output out of the loss."""
    mu, logvar = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    z, kl = sample_latents(mu, logvar, active, backend=backend, **kwargs)
    loss = sum((out.float() * g.float()).sum() for out, g in ((z, grad_z), (kl, grad_kl)) if g is not None)
    loss.backward()
    return z, kl, mu.grad, logvar.grad


def assert_matches_reference(backend, mu, logvar, active, grad_z, grad_kl, tolerance, **kwargs):
    # The reference computes from the same stored values, in float32 at least.
    ours = run_with_grads(backend, mu, logvar, active, grad_z, grad_kl, **kwargs)
    ref = run_with_grads("reference", mu, logvar, active, grad_z, grad_kl, **kwargs)
    for name, a, b in zip(("z", "kl", "grad_mu", "grad_logvar"), ours, ref):
        assert a.dtype == mu.dtype, name
        # kl sums D terms: allow for the summation order.
        scale = mu.shape[1] ** 0.5 if name == "kl" else 1
        torch.testing.assert_close(
            a.float(),
            b.float(),
            rtol=tolerance["rtol"],
            atol=tolerance["atol"] * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("clamp", ["mean", "first"])
@pytest.mark.parametrize("invariance", [0.0, 0.37])
@pytest.mark.parametrize("mask", ["random", "none", "all-inactive"])
def test_matches_reference(backend, clamp, invariance, mask):
    batch, dim = 21, 45  # dim is not a multiple of any block size
    mu, logvar = random_inputs(batch, dim)
    active = {"random": torch.rand(dim) < 0.5, "none": None, "all-inactive": torch.zeros(dim, dtype=torch.bool)}[mask]
    grad_z, grad_kl = torch.randn(batch, dim), torch.randn(batch)
    seed = int(torch.randint(0, 2**62, ())) * 3  # up to 2**64
    assert_matches_reference(
        backend,
        mu,
        logvar,
        active,
        grad_z,
        grad_kl,
        TOLERANCE[torch.float32],
        clamp=clamp,
        invariance=invariance,
        seed=seed,
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("used", ["z", "kl"])
def test_one_output_used_still_pulls(backend, used):
    batch, dim = 9, 13
    mu, logvar = random_inputs(batch, dim)
    active = torch.rand(dim) < 0.5
    grad_z = torch.randn(batch, dim) if used == "z" else None
    grad_kl = torch.randn(batch) if used == "kl" else None
    assert_matches_reference(
        backend, mu, logvar, active, grad_z, grad_kl, TOLERANCE[torch.float32], invariance=0.5, seed=11
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    batch, dim = 17, 40
    mu, logvar = random_inputs(batch, dim, dtype)
    assert_matches_reference(
        backend, mu, logvar, torch.rand(dim) < 0.5, torch.randn(batch, dim), torch.randn(batch), TOLERANCE[dtype],
        invariance=0.2, seed=3,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", *FUSED])
@pytest.mark.parametrize("clamp", ["mean", "first"])
def test_batch_of_one_clamp_is_identity(backend, clamp):
    mu, logvar = random_inputs(1, 30)
    active = torch.rand(30) < 0.5
    z, kl, grad_mu, grad_logvar = run_with_grads(
        backend, mu, logvar, active, torch.randn(1, 30), torch.randn(1), clamp=clamp, invariance=0.9, seed=4
    )
    z_plain, kl_plain = sample_latents(mu, logvar, seed=4, backend=backend)
    torch.testing.assert_close(z, z_plain)
    torch.testing.assert_close(kl, kl_plain)
    # Inactive latents: no reconstruction or KL gradient, and the pull toward a mean of one is zero.
    assert torch.equal(grad_mu[:, ~active], torch.zeros_like(grad_mu[:, ~active]))
    assert torch.equal(grad_logvar[:, ~active], torch.zeros_like(grad_logvar[:, ~active]))


@pytest.mark.parametrize("backend", FUSED)
def test_strided_inputs_and_expanded_gradients(backend):
    # Transposed views and the stride-0 gradient kl.sum() produces.
    mu_t, logvar_t = random_inputs(19, 12)
    mu, logvar = mu_t.T, logvar_t.T
    active = torch.rand(19) < 0.5
    results = []
    for name in ("reference", backend):
        m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = sample_latents(m, lv, active, backend=name, invariance=0.3, seed=8)
        (z.sum() + kl.sum()).backward()
        results.append((z, kl, m.grad, lv.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@NEEDS_TRITON
@pytest.mark.parametrize("clamp", ["mean", "first"])
@pytest.mark.parametrize("with_mask", [True, False])
def test_triton_many_rows(clamp, with_mask, monkeypatch):
    """More rows than one tile, split among programs (as on a GPU: the interpreter would run one) unless the
    launch needs a batch statistic."""
    from dcign_fast.kernels.triton import latent_sampler as kernels

    monkeypatch.setattr(kernels, "program_target", lambda device: 64)
    dim = 10
    batch = 2 * kernels.block_sizes(dim)[0] + 37
    assert kernels._grid(batch, dim, False, torch.device("cpu"))[0][1] == 3  # three programs down the rows
    mu, logvar = random_inputs(batch, dim)
    active = (torch.rand(dim) < 0.5) if with_mask else None
    grad_z, grad_kl = torch.randn(batch, dim), torch.randn(batch)
    assert_matches_reference(
        "triton", mu, logvar, active, grad_z, grad_kl, TOLERANCE[torch.float32], clamp=clamp, invariance=0.4, seed=21
    )


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("invariance", [0.0, 0.6])
def test_every_output_element_is_written(backend, invariance):
    """Allocations pre-filled with NaN: any element a backend forgets to write would show."""
    batch, dim = 23, 70
    mu, logvar = random_inputs(batch, dim)
    active = torch.rand(dim) < 0.5
    grad_z, grad_kl = torch.randn(batch, dim), torch.randn(batch)
    with poisoned_allocations():
        ours = run_with_grads(backend, mu, logvar, active, grad_z, grad_kl, invariance=invariance, seed=5)
    ref = run_with_grads("reference", mu, logvar, active, grad_z, grad_kl, invariance=invariance, seed=5)
    for got, want in zip(ours, ref):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_gradcheck_float64_all_active():
    mu, logvar = (t.double().requires_grad_() for t in random_inputs(4, 3))
    for backend in ("reference", "torch"):
        assert torch.autograd.gradcheck(
            lambda m, lv, b=backend: sample_latents(m, lv, seed=13, backend=b), (mu, logvar), eps=1e-6, atol=1e-5
        )


@pytest.mark.parametrize("clamp", ["mean", "first"])
@pytest.mark.parametrize("masked", [False, True])
def test_gradgradcheck_float64(masked, clamp):
    """The fused backward's own backward (sample_latents_double_backward) against finite differences of it."""
    mu, logvar = (t.double().requires_grad_() for t in random_inputs(4, 5))
    active = torch.tensor([True, False, True, False, False]) if masked else None

    def sample(m: torch.Tensor, lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_latents(m, lv, active, clamp=clamp, invariance=0.3, seed=13, backend="torch")

    assert torch.autograd.gradgradcheck(sample, (mu, logvar), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("clamp", ["mean", "first"])
def test_double_backward_matches_reference(clamp):
    """A gradient penalty differentiates the backward (create_graph=True): the fused op had no formula for it."""
    mu, logvar = (t.double().requires_grad_() for t in random_inputs(5, 7))
    active = torch.rand(7) < 0.5
    weights = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def penalised_grads(backend: str) -> list[torch.Tensor]:
        z, kl = sample_latents(mu, logvar, active, clamp=clamp, invariance=0.3, seed=11, backend=backend)
        loss = (z.sin() * weights[0]).sum() + (kl.square() * weights[1]).sum()
        grads = torch.autograd.grad(loss, (mu, logvar), create_graph=True)
        return [*grads, *torch.autograd.grad(sum(g.square().sum() for g in grads), (mu, logvar))]

    for got, want in zip(penalised_grads("torch"), penalised_grads("reference")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:.*batching rule")
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_vmap_with_a_seed_matches_a_loop(backend):
    mu, logvar = random_inputs(3 * 4, 5)
    mu, logvar = mu.view(3, 4, 5), logvar.view(3, 4, 5)
    active = torch.rand(5) < 0.5

    def sample(m: torch.Tensor, lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_latents(m, lv, active, invariance=0.1, seed=7, backend=backend)

    batched = torch.func.vmap(sample)(mu, logvar)
    looped = [torch.stack(outputs) for outputs in zip(*(sample(m, lv) for m, lv in zip(mu, logvar)))]
    for got, want in zip(batched, looped):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*batching rule")
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_vmap_of_the_gradient_matches_a_loop(backend):
    """Per-sample gradients (vmap of torch.func.grad) through the invariance pull: the reference's
    autograd.Function, the fused op's through its own autograd.Function (PyTorch refuses the custom op's)."""
    mu, logvar = (t.view(3, 4, 5) for t in random_inputs(3 * 4, 5))
    active = torch.rand(5) < 0.5

    def loss(m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        z, kl = sample_latents(m, lv, active, invariance=0.2, seed=7, backend=backend)
        return z.sin().sum() + kl.sum()

    batched = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(mu, logvar)
    looped = [torch.func.grad(loss, argnums=(0, 1))(m, lv) for m, lv in zip(mu, logvar)]
    for got, want in zip(batched, map(torch.stack, zip(*looped))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:.*batching rule")
def test_torch_func_transforms_match_the_reference():
    """torch.func.grad, jacrev and jacrev of grad (the backward op's own backward) equal the reference's."""
    mu, logvar = (t.double() for t in random_inputs(4, 6))
    active = torch.tensor([True, False, True, False, False, True])

    def loss(backend: str):
        def fn(m: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
            z, kl = sample_latents(m, lv, active, invariance=0.3, seed=11, backend=backend)
            return z.sin().sum() + kl.square().sum()

        return fn

    def results(backend: str) -> list[torch.Tensor]:
        z_of_mu = lambda m: sample_latents(m, logvar, active, invariance=0.3, seed=11, backend=backend)[0]  # noqa: E731
        return [
            *torch.func.grad(loss(backend), argnums=(0, 1))(mu, logvar),
            torch.func.jacrev(z_of_mu)(mu),
            torch.func.jacrev(torch.func.grad(loss(backend), argnums=1))(mu, logvar),  # d/dmu of d/dlogvar
        ]

    got, want = results("torch"), results("reference")
    for g, r in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:.*batching rule")
@pytest.mark.parametrize(
    "backend, randomness, outcome",
    [
        ("torch", "different", "each sample its own noise"),
        ("torch", "same", NotImplementedError),
        ("torch", "error", RuntimeError),
        ("reference", "different", NotImplementedError),  # it would draw once: the same noise for all
        ("reference", "same", NotImplementedError),
        ("reference", "error", RuntimeError),
    ],
)
def test_vmap_randomness_is_honoured_or_refused_with_seed_none(backend, randomness, outcome):
    """seed=None draws from torch's generator, which vmap does not see: vmap's randomness was ignored."""
    mu, logvar = (t.view(3, 4, 5) for t in random_inputs(3 * 4, 5))
    vmapped = torch.func.vmap(lambda m, lv: sample_latents(m, lv, backend=backend), randomness=randomness)
    if isinstance(outcome, type):
        with pytest.raises(outcome, match="seed=None"):
            vmapped(mu, logvar)
        return
    eps = (vmapped(mu, logvar)[0] - mu) / torch.exp(0.5 * logvar)
    assert not torch.allclose(eps[0], eps[1]) and not torch.allclose(eps[1], eps[2])


# (active columns of 40, whether the backward takes the sparse branch): up to three quarters active it draws
# eps for the active columns alone; past that, for all.
@pytest.mark.parametrize(
    "active_columns, sparse", [(0, True), (2, True), (20, True), (30, True), (32, False), (40, False)]
)
def test_torch_backward_sparse_eps_is_bit_identical(active_columns, sparse):
    """The CPU backward regenerates eps for the active columns only (when few are active): the same bits as
    the dense formula, NaN included; and the dense branch, past the switch."""
    from dcign_fast.ops import latent_sampler, philox

    batch, dim = 33, 40
    mu, logvar = random_inputs(batch, dim)
    active = torch.randperm(dim) < active_columns
    assert (latent_sampler._sparse_columns(active, mu) is not None) == sparse
    for column in (int(active.int().argmax()), int(active.int().argmin())):  # an active and an inactive one
        mu[3, column] = logvar[4, column] = float("nan")
    grad_z, grad_kl = torch.randn(batch, dim), torch.randn(batch)
    got = latent_sampler.sample_latents_torch_backward(mu, logvar, active, 0.3, 2**64 - 5, 17, grad_z, grad_kl)
    eps = philox.normal(2**64 - 5, 17, (batch, dim))
    std = torch.exp(0.5 * logvar)
    dense = (
        torch.where(active, torch.addcmul(grad_z, grad_kl[:, None], mu), 0.3 * (mu - mu.mean(0, keepdim=True))),
        torch.where(
            active,
            0.5 * (grad_z * std * eps + grad_kl[:, None] * (std * std - 1)),
            0.3 * (logvar - logvar.mean(0, keepdim=True)),
        ),
    )
    for ours, expected in zip(got, dense):
        assert torch.equal(ours.view(torch.int32), expected.view(torch.int32))


def test_statistics_of_noise_torch():
    batch, dim = 5000, 200  # 10**6 draws
    mu, logvar = random_inputs(batch, dim)
    z, _ = sample_latents(mu, logvar, backend="torch")
    eps = ((z - mu) / torch.exp(0.5 * logvar)).double()
    n = eps.numel()
    flat = eps.flatten()
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    for lag in (1, dim):  # neighbours within a row and within a column
        corr = torch.corrcoef(torch.stack([flat[:-lag], flat[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / n**0.5, lag


@NEEDS_TRITON
def test_statistics_of_noise_triton():
    batch, dim = 256, 128
    mu, logvar = random_inputs(batch, dim)
    z, _ = sample_latents(mu, logvar, backend="triton")
    flat = ((z - mu) / torch.exp(0.5 * logvar)).double().flatten()
    n = flat.numel()
    assert abs(flat.mean().item()) < 5 / n**0.5
    assert abs(flat.var().item() - 1) < 5 * (2 / n) ** 0.5
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(corr) < 5 / n**0.5


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_seeds(backend):
    mu, logvar = random_inputs(6, 20)
    same = [sample_latents(mu, logvar, seed=99, backend=backend)[0] for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], sample_latents(mu, logvar, seed=100, backend=backend)[0])
    successive = [sample_latents(mu, logvar, backend=backend)[0] for _ in range(2)]
    assert not torch.equal(successive[0], successive[1])
    torch.manual_seed(1234)
    first = [sample_latents(mu, logvar, backend=backend)[0] for _ in range(2)]
    torch.manual_seed(1234)
    again = [sample_latents(mu, logvar, backend=backend)[0] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_all_backends_draw_the_same_noise():
    fused = FUSED if triton_available() else ["torch"]  # (triton is optional: the others are compared without it)
    mu, logvar = random_inputs(7, 33)
    zs = [sample_latents(mu, logvar, seed=2**64 - 5, backend=b)[0] for b in ("reference", *fused)]
    for z in zs[1:]:
        torch.testing.assert_close(z, zs[0], rtol=1e-6, atol=1e-5)
    # Negative seeds wrap to uint64 like torch.manual_seed's, the ends of the range too.
    torch.testing.assert_close(sample_latents(mu, logvar, seed=-5, backend="torch")[0], zs[1])
    top_bit = sample_latents_reference(mu, logvar, seed=2**63)[0]
    for seed, backend in itertools.product((2**63, -(2**63)), fused):
        torch.testing.assert_close(
            sample_latents(mu, logvar, seed=seed, backend=backend)[0], top_bit, rtol=1e-6, atol=1e-5
        )


@pytest.mark.parametrize("backend", FUSED)
def test_kernels_at_a_nonzero_offset_match_the_reference_by_value_and_from_memory(backend):
    assert seed_offset_mismatches(backend, "cpu") == []


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_seed_none_backward_regenerates_the_forwards_noise(backend):
    assert seed_none_backward_error(backend, "cpu") < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ON_GPU)
def test_kernels_on_the_gpu_at_a_nonzero_offset_and_with_seed_none(backend):
    """seed=None draws its pair on the GPU, where the kernels read it from memory."""
    assert seed_offset_mismatches(backend, "cuda") == []
    assert seed_none_backward_error(backend, "cuda") < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ON_GPU)
def test_a_cuda_graph_captured_with_seed_none_draws_anew_at_every_replay(backend):
    """The draw runs on the device: every replay samples a new (seed, offset), and z, kl and both gradients
    are the reference's at that pair; torch.manual_seed before a replay repeats its draw."""
    mu, logvar = (t.cuda() for t in random_inputs(24, 40))
    active = (torch.rand(40) < 0.5).cuda()
    grad_z, grad_kl = torch.randn_like(mu), torch.randn(24, device="cuda")
    m, lv = mu.clone().requires_grad_(), logvar.clone().requires_grad_()

    def sample_and_grads():
        z, kl, rng = torch.ops.dcign_fast.sample_latents(m, lv, active, False, 0.3, None, backend)
        return z, kl, *torch.autograd.grad((z, kl), (m, lv), (grad_z, grad_kl)), rng

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles, autotunes and loads kernels outside the capture
        sample_and_grads()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        *outputs, rng = sample_and_grads()
    assert rng.device == mu.device
    draws = []
    for replay_seed in (5, None, 5):
        for out in outputs:
            out.fill_(float("nan"))
        if replay_seed is not None:
            torch.manual_seed(replay_seed)
        graph.replay()
        draws.append(tuple(rng.tolist()))
        m_ref, lv_ref = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
        z, kl = sample_latents_reference(m_ref, lv_ref, active, "mean", 0.3, *rng.tolist())
        want = z, kl, *torch.autograd.grad((z, kl), (m_ref, lv_ref), (grad_z, grad_kl))
        for name, got, expected in zip(("z", "kl", "grad_mu", "grad_logvar"), outputs, want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    assert draws[0] != draws[1] and draws[0] == draws[2]


def test_reparameterize_is_the_sampler_without_clamping():
    mu, logvar = random_inputs(5, 8)
    z = dcign_fast.reparameterize(mu, logvar, seed=17)
    torch.testing.assert_close(z, sample_latents_reference(mu, logvar, seed=17)[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf, in the interpreter
@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_non_finite_inputs_propagate_like_torch(backend):
    batch, dim = 8, 16
    mu, logvar = random_inputs(batch, dim)
    active = torch.ones(dim, dtype=torch.bool)
    active[[3, 9]] = False
    mu[2, 5] = float("nan")  # active column
    logvar[4, 9] = float("inf")  # inactive column: its mean is inf
    z, kl = sample_latents(mu, logvar, active, seed=1, backend=backend)
    bad_z = ~torch.isfinite(z)
    expected = torch.zeros_like(bad_z)
    expected[2, 5] = True
    expected[:, 9] = True
    assert torch.equal(bad_z, expected)
    assert not bool(torch.isfinite(kl).any())
    ref_z, ref_kl = sample_latents_reference(mu, logvar, active, seed=1)
    torch.testing.assert_close(z, ref_z, equal_nan=True)
    torch.testing.assert_close(kl, ref_kl, equal_nan=True)


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_invariance_zero_gives_inactive_columns_zero_gradients_even_where_they_are_not_finite(backend):
    """0 * (x - mean) would be NaN there; the kernels skip the pull at invariance 0, and so must the rest."""
    mu, logvar = random_inputs(6, 5)
    mu[2, 1], logvar[3, 3] = float("nan"), float("inf")
    active = torch.tensor([True, False, True, False, True])
    # clamp="first" reads row 0 of the inactive columns only: every output is finite.
    z, _, grad_mu, grad_logvar = run_with_grads(
        backend, mu, logvar, active, torch.randn(6, 5), None, clamp="first", invariance=0.0, seed=1
    )
    assert torch.isfinite(z).all()
    assert torch.isfinite(grad_mu).all() and torch.isfinite(grad_logvar).all()
    assert not grad_mu[:, ~active].any() and not grad_logvar[:, ~active].any()


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a: {**a, "mu": a["mu"][0]}, ValueError, "mu must be 2-D"),
        (lambda a: {**a, "mu": a["mu"].int()}, TypeError, "mu must be float"),
        (lambda a: {**a, "mu": a["mu"].tolist()}, TypeError, "mu must be a torch.Tensor"),
        (lambda a: {**a, "logvar": a["logvar"][:, :-1]}, ValueError, "logvar must have mu's shape"),
        (lambda a: {**a, "logvar": a["logvar"].double()}, TypeError, "logvar must have the dtype of mu"),
        (lambda a: {**a, "logvar": a["logvar"].to("meta")}, ValueError, "logvar must be on the device of mu"),
        (lambda a: {**a, "mu": a["mu"][:0], "logvar": a["logvar"][:0]}, ValueError, "mu must have at least one row"),
        (lambda a: {**a, "active": a["active"][:-1]}, ValueError, "active must have shape"),
        (lambda a: {**a, "active": a["active"][None]}, ValueError, "active must have shape"),
        (lambda a: {**a, "active": a["active"][:, None]}, ValueError, "active must have shape"),
        (
            lambda a: {**a, "mu": a["mu"][:, :0], "logvar": a["logvar"][:, :0], "active": None},
            ValueError,
            "mu must have at least one row and one column",
        ),
        (lambda a: {**a, "active": a["active"].float()}, TypeError, "active must be a bool tensor"),
        (lambda a: {**a, "active": a["active"].to("meta")}, ValueError, "active must be on mu's device"),
        (lambda a: {**a, "clamp": "median"}, ValueError, "clamp must be one of"),
        (lambda a: {**a, "invariance": -0.1}, ValueError, "invariance must be >= 0 and finite"),
        (lambda a: {**a, "invariance": float("nan")}, ValueError, "invariance must be >= 0 and finite"),
        (lambda a: {**a, "invariance": True}, TypeError, "invariance must be a number"),
        (lambda a: {**a, "invariance": 1e300}, ValueError, "invariance must fit in a float32"),
        (lambda a: {**a, "mu": a["mu"].to_sparse()}, TypeError, "mu must be a dense"),
        (lambda a: {**a, "seed": 1.5}, TypeError, "seed must be an int or None"),
        (lambda a: {**a, "seed": True}, TypeError, "seed must be an int or None"),
        (lambda a: {**a, "seed": 2**64}, ValueError, "seed must lie in"),
        (lambda a: {**a, "seed": -(2**63) - 1}, ValueError, "seed must lie in"),
        (lambda a: {**a, "backend": "fast"}, ValueError, "backend must be one of"),
        (lambda a: {**a, "backend": "cuda"}, ValueError, "backend='cuda'"),
        pytest.param(
            lambda a: {**a, "mu": a["mu"].double(), "logvar": a["logvar"].double(), "backend": "triton"},
            ValueError,
            "backend='triton' takes float16",
            marks=NEEDS_TRITON,  # (without triton, backend="triton" is refused for that first)
        ),
    ],
)
def test_bad_arguments(change, error, words):
    mu, logvar = random_inputs(4, 6)
    args = {"mu": mu, "logvar": logvar, "active": torch.rand(6) < 0.5, "clamp": "mean", "invariance": 0.1, "seed": 3}
    args["backend"] = "torch"
    args = change(args)
    with pytest.raises(error, match=words):
        sample_latents(args.pop("mu"), args.pop("logvar"), args.pop("active"), **args)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_numpy_scalars_are_accepted_as_numbers(backend):
    """A seed or strength computed with numpy (np.int64, np.float32) was refused as not an int / float."""
    import numpy as np

    mu, logvar = random_inputs(4, 6)
    active = torch.rand(6) < 0.5
    ours = sample_latents(mu, logvar, active, invariance=np.float32(0.5), seed=np.int64(3), backend=backend)
    pythons = sample_latents(mu, logvar, active, invariance=0.5, seed=3, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(ours, pythons))


def compile_kernels_for_sm90() -> list[dict[str, object]]:
    """Both kernels as the launcher runs them for paper150's 200 latents at batch 20 and 128, float32 and
    bfloat16, in their variants with the most code (the forward's batch-mean pass, the backward's pull); at
    batch 128 also with the seed and offset read from memory (a CUDA graph captured with seed=None)."""
    from dcign_fast.kernels.triton import latent_sampler as kernels

    in_memory = tuple(torch.tensor([7, 0]))
    cases = [(dtype, batch, (7, 0)) for dtype in (torch.float32, torch.bfloat16) for batch in (20, 128)]
    cases += [(dtype, 128, in_memory) for dtype in (torch.float32, torch.bfloat16)]
    results = []
    for dtype, batch, (seed, offset) in cases:
        mu, logvar = random_inputs(batch, 200, dtype)
        active = torch.rand(200) < 0.5
        grad_z, grad_kl = torch.randn_like(mu), torch.randn(batch, dtype=dtype)
        with recorded_launches(kernels, "_forward_kernel", "_backward_kernel") as launches:
            kernels.forward(mu, logvar, active, False, seed, offset)
            kernels.backward(mu, logvar, active, 0.01, seed, offset, grad_z, grad_kl)
        for launch in launches:
            results += compile_launch(launch)
    return results


@pytest.mark.skipif(bool(aot_unsupported_reason()), reason=aot_unsupported_reason())
def test_triton_kernels_compile_for_sm90():
    """Ahead-of-time compilation for an H100/H200, without a GPU and outside the interpreter."""
    results = compile_in_subprocess("tests.test_latent_sampler", "compile_kernels_for_sm90")
    assert [r["kernel"] for r in results] == ["forward", "backward"] * 6
    assert all(r["stack"] == 0 and r["local"] == 0 for r in results)  # no register spills


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func's own
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_forward_mode_ad_is_refused_not_zero(backend):
    """PyTorch would give the custom op's outputs zero tangents (a silent wrong answer), and the reference's
    autograd.Function has no jvp (an error that does not say what to do instead)."""
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    with pytest.raises(NotImplementedError, match=rf"sample_latents\(backend='{backend}'\) has no forward-mode AD"):
        torch.func.jvp(lambda m: sample_latents(m, logvar, None, seed=1, backend=backend)[0], (mu,), (mu,))
    # jacfwd of jacrev: the reference's refusal there is torch's own
    with pytest.raises(NotImplementedError, match="no forward-mode AD" if backend == "torch" else "forward mode AD"):
        torch.func.hessian(lambda m: sample_latents(m, logvar, None, seed=1, backend=backend)[0].sum())(mu)


def test_latent_sampler_module():
    mu, logvar = random_inputs(6, 10)
    active = torch.rand(10) < 0.5
    module = dcign_fast.nn.LatentSampler(clamp="first", invariance=0.2, backend="torch")
    z, kl = module(mu, logvar, active, seed=31)
    want_z, want_kl = sample_latents_reference(mu, logvar, active, "first", 0.2, 31)
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(kl, want_kl)
    with pytest.raises(ValueError, match="invariance"):
        dcign_fast.nn.LatentSampler(invariance=-1.0)


def test_model_samples_through_the_op():
    model = dcign_fast.models.DCIGN.from_preset("demo64", backend="torch")
    x = torch.rand(3, 1, 64, 64)
    active = torch.zeros(model.config.latent_dim, dtype=torch.bool)
    active[:3] = True
    recon, mu, logvar, z, kl = model(x, active, clamp="mean", invariance=0.1, seed=5, return_kl=True)
    want_z, want_kl = sample_latents_reference(mu, logvar, active, "mean", 0.1, 5)
    torch.testing.assert_close(z, want_z)
    torch.testing.assert_close(kl, want_kl)
    assert len(model(x, seed=5)) == 4
    losses = model.loss(x, recon, mu, logvar, kl=kl)
    torch.testing.assert_close(losses["kl"], kl.sum() / 3)
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", FUSED)
def test_seed_none_on_cuda_draws_with_the_cuda_generator(backend):
    """seed=None draws (seed, offset) on the GPU with its generator: torch.manual_seed repeats a draw (for
    the reference backend too), the next call draws anew, and z is the reference's at the drawn pair."""
    mu, logvar = (t.cuda() for t in random_inputs(5, 7))
    torch.manual_seed(77)
    first = [sample_latents(mu, logvar, backend=backend)[0] for _ in range(2)]
    assert not torch.equal(first[0], first[1])
    torch.manual_seed(77)
    again, _, rng = torch.ops.dcign_fast.sample_latents(mu, logvar, None, False, 0.0, None, backend)
    assert torch.equal(again, first[0]) and rng.device == mu.device
    seed, offset = rng.tolist()
    torch.testing.assert_close(again, sample_latents_reference(mu, logvar, seed=seed, offset=offset)[0])
    torch.manual_seed(77)
    torch.testing.assert_close(sample_latents(mu, logvar, backend="reference")[0], again)


@NEEDS_TRITON
def test_triton_launchers_copy_views_whose_column_offsets_pass_int32():
    from dcign_fast.kernels.triton.latent_sampler import _columns_in_int32

    wide = torch.empty(0, device="meta").as_strided((2, 4096), (1, 2**20))  # a transposed view of [4096, 2**20]
    assert _columns_in_int32(wide).stride() == (4096, 1)
    narrow = torch.randn(3, 5).t()
    assert _columns_in_int32(narrow) is narrow


def test_the_largest_float32_invariance_is_accepted():
    mu, logvar = random_inputs(4, 6)
    largest = float(torch.finfo(torch.float32).max)
    z, _ = sample_latents(mu, logvar, torch.rand(6) < 0.5, invariance=largest, seed=1, backend="torch")
    assert z.shape == (4, 6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_the_rng_output_of_a_seed_none_draw_is_the_pair_it_drew_with(backend):
    """On the CPU too (test_seed_none_on_cuda_... checks it on a GPU): the op's rng reproduces its noise."""
    mu, logvar = random_inputs(5, 7)
    torch.manual_seed(77)
    z, _, rng = torch.ops.dcign_fast.sample_latents(mu, logvar, None, False, 0.0, None, "torch")
    seed, offset = rng.tolist()
    torch.testing.assert_close(z, sample_latents_reference(mu, logvar, seed=seed, offset=offset)[0])
    torch.manual_seed(77)
    torch.testing.assert_close(sample_latents(mu, logvar, backend=backend)[0], z)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_shapes_come_out_of_meta_tensors_with_seed_none(backend):
    mu = torch.empty(3, 4, device="meta")
    z, kl = sample_latents(mu, mu, seed=None, backend=backend)
    assert (z.shape, kl.shape, z.device.type) == ((3, 4), (3,), "meta")


def traced_raise(message: str) -> str:
    """What pytest.raises matches for a raise traced by dynamo: its message, which torch before 2.13 (CI's) may
    replace by "Observed exception" (torch 2.8 does). (torch.__version__ is a TorchVersion: it compares as a
    version, "2.8.0" < "2.13".)"""
    return message if torch.__version__ >= "2.13" else f"{message}|Observed exception"


@pytest.mark.parametrize("invariance", [1e300, float("inf")])
def test_a_compiled_sampler_refuses_an_invariance_past_float32(invariance):
    torch._dynamo.reset()
    mu, logvar = random_inputs(4, 5)
    active = torch.tensor([True, False, True, False, False])

    def sample(m, lv):
        return sample_latents(m, lv, active, seed=1, invariance=invariance, backend="torch")[0]

    with pytest.raises(RuntimeError, match=traced_raise("invariance must be >= 0 and finite")):
        torch.compile(sample, fullgraph=True, backend="eager")(mu, logvar)


def test_a_compiled_reference_refuses_seeds_from_2_63_by_name():
    torch._dynamo.reset()
    mu, logvar = random_inputs(4, 5)

    def sample(m, lv, seed):
        return sample_latents(m, lv, seed=seed, backend="reference")[0]

    with pytest.raises(RuntimeError, match=traced_raise(r"takes seeds < 2\*\*63")):
        torch.compile(sample, fullgraph=True, backend="eager")(mu, logvar, 2**63)


@NEEDS_TRITON  # (not importorskip: that skips a missing triton, not one whose import fails)
def test_the_triton_launchers_copy_a_view_whose_last_column_offset_is_2_31():
    from dcign_fast.kernels.triton.latent_sampler import _columns_in_int32

    edge = torch.empty(0, device="meta").as_strided((2, 3), (1, 2**30))  # (3 - 1) * 2**30 == 2**31
    assert _columns_in_int32(edge).stride() == (3, 1)
    below = torch.empty(0, device="meta").as_strided((2, 3), (1, 2**30 - 1))
    assert _columns_in_int32(below) is below


def test_auto_on_cuda_picks_triton_except_for_float64(monkeypatch):
    from dcign_fast.ops import latent_sampler

    monkeypatch.setattr(latent_sampler, "triton_available", lambda: True)
    with FakeTensorMode():  # CUDA tensors without a GPU: choose_backend reads only the device and dtype
        assert latent_sampler.choose_backend(torch.empty(3, 4, device="cuda")) == "triton"
        assert latent_sampler.choose_backend(torch.empty(3, 4, device="cuda", dtype=torch.float64)) == "torch"
    assert latent_sampler.choose_backend(torch.empty(3, 4)) == "torch"
