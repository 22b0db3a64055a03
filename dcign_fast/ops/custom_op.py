"""What both fused ops' PyTorch custom ops (``torch.ops.dcign_fast.*``, in unpool_conv_op.py and
latent_sampler_op.py) share: the backend check a direct call gets, and ``transformable``.

Each op's kernel backends (torch, triton, cuda) run behind one ``torch.library.custom_op`` whose ``backend``
argument is a string, so torch.compile traces the op whole; Python ints (padding, scale factor, seed) are op
arguments too. A fake implementation gives the output shapes to the compiler, and ``register_autograd`` routes
the backward through a second custom op, so the backward graph is as opaque and traceable as the forward.
The "reference" backends stay plain PyTorch outside these ops: they are the oracles, differentiated by
autograd itself, and dynamo traces them like any torch code.

torch.func's grad transforms (grad, vjp, jacrev) refuse a custom op's own autograd, so the ops are called
through ``transformable`` wrappers that run them as autograd.Functions with the same setup_context and
backward while such a transform is active.
"""

from typing import Callable

import torch

from dcign_fast.ops.backends import check_backend_runs_on


def check_op_backend(backend: str, device: torch.device, implemented: tuple[str, ...]) -> None:
    """The public functions' backend check, repeated in the ops: a direct call (an exported program loaded on
    another machine, say) would otherwise fail in a driver, or on "auto" with a KeyError."""
    if backend == "auto":
        raise ValueError(f"the dcign_fast ops take an explicit backend, one of {implemented}, not 'auto'")
    check_backend_runs_on(backend, device, implemented)


try:  # torch internals: should a release move them, the ops go back to refusing torch.func.grad
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    def _differentiating() -> bool:
        """Whether a torch.func grad or jvp transform (grad, vjp, jacrev, jacfwd) is active. Not vmap alone
        nor functionalize: they take the custom op itself, and functionalize has no rule for an
        autograd.Function."""
        differentiating = (TransformType.Grad, TransformType.Jvp)
        return any(interpreter.key() in differentiating for interpreter in retrieve_all_functorch_interpreters())

except ImportError:

    def _differentiating() -> bool:
        return False


def transformable(name: str, op, setup_context, backward) -> Callable:
    """``op`` as a function that also runs under torch.func's grad transforms. PyTorch refuses them for a
    custom op's own autograd (an autograd.Function without setup_context), so while one is active the op runs
    through an autograd.Function with ``op``'s setup_context and backward (vmap over it runs the op through
    PyTorch's per-sample fallback, like vmap of the op itself). Otherwise, eager autograd and torch.compile
    (which cannot trace torch.func over it) get ``op`` itself."""

    def refuse_forward_mode(ctx, *tangents):
        raise NotImplementedError(
            f"{name} has no forward-mode AD (torch.func.jvp, jacfwd, hessian): use reverse mode "
            "(torch.autograd.grad, torch.func.jacrev)"
        )

    function: type[torch.autograd.Function] = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "generate_vmap_rule": True,
            "forward": staticmethod(lambda *args: op(*args)),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(refuse_forward_mode),
        },
    )

    def run(*args):
        transformed = not torch.compiler.is_compiling() and _differentiating()
        return function.apply(*args) if transformed else op(*args)

    return run
