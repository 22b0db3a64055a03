"""What both fused ops' PyTorch custom ops (``torch.ops.dcign_fast.*``, in unpool_conv_op.py and
latent_sampler_op.py) share: the backend check a direct call gets, and ``op_entry``, through which
the public functions call them.

Each op's kernel backends (torch, triton, cuda) run behind one ``torch.library.custom_op`` whose ``backend``
argument is a string, so torch.compile traces the op whole; Python ints (padding, scale factor, seed) are op
arguments too. A fake implementation gives the output shapes to the compiler, and ``register_autograd`` routes
the backward through a second custom op, so the backward graph is as opaque and traceable as the forward.
The "reference" backends stay plain PyTorch outside these ops: they are the oracles, differentiated by
autograd itself, and dynamo traces them like any torch code.

The public functions call each op through :func:`op_entry`, which picks one of three ways to run it:
- plain eager autograd (the common case): an autograd.Function whose forward is the op's Python body, with the
  op's setup_context and backward. The op's dispatch (schema checks, its autograd wrapper, the dispatcher's
  Python round trips) cost a fifth to a half of a small layer's host time (measured on a CPU with the Triton
  kernels stubbed), and on a GPU a small layer's host time, not its kernels, sets its pace;
- torch.compile, tracing (fake tensors, make_fx, export, torch.jit.trace), dispatch and torch-function modes,
  tensor subclasses, vmap and the older batched gradients: the custom op itself, which each of them sees as
  one opaque node;
- torch.func's grad transforms (grad, vjp, jacrev), which refuse a custom op's own autograd: an
  autograd.Function over the op, with the same setup_context and backward.
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
    from torch._C._functorch import TransformType, is_legacy_batchedtensor
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    def _differentiating() -> bool:
        """Whether a torch.func grad or jvp transform (grad, vjp, jacrev, jacfwd) is active. Not vmap alone
        nor functionalize: they take the custom op itself, and functionalize has no rule for an
        autograd.Function."""
        differentiating = (TransformType.Grad, TransformType.Jvp)
        return any(interpreter.key() in differentiating for interpreter in retrieve_all_functorch_interpreters())

    def _plain_eager(args: tuple) -> bool:
        """Whether nothing would look at the op: no torch.func transform, no dispatch or torch-function mode
        (fake tensors, make_fx, FlopCounterMode, ``with torch.device(...)``, ``torch.set_default_device``), no
        torch.jit.trace, only plain tensors (see _plain)."""
        if retrieve_all_functorch_interpreters() or torch._C._len_torch_dispatch_stack():
            return False
        if torch._C._is_torch_function_mode_enabled() or torch._C._get_tracing_state() is not None:
            return False  # (torch.jit.trace would record a Python Function it cannot run)
        return all(_plain(a) for a in args if isinstance(a, torch.Tensor))

    def _plain(t: torch.Tensor) -> bool:
        """A tensor the op's body can take: a plain type holding data, and not a batched tensor of PyTorch's
        older vmap (grad(..., is_grads_batched=True), jacobian(vectorize=True), gradcheck's batched checks), which
        looks like a plain tensor but only the op's per-sample fallback handles."""
        return type(t) in _PLAIN_TENSORS and not t.is_meta and not is_legacy_batchedtensor(t)

except ImportError:

    def _differentiating() -> bool:
        return False

    def _plain_eager(args: tuple) -> bool:
        return False


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def op_entry(name: str, op, body: Callable, setup_context, backward) -> Callable:
    """The function that runs custom op ``op`` (whose Python implementation is ``body``, with autograd
    ``setup_context`` and ``backward``) the way the module docstring describes."""

    def refuse_forward_mode(ctx, *tangents):
        raise NotImplementedError(
            f"{name} has no forward-mode AD (torch.func.jvp, jacfwd, hessian): use reverse mode "
            "(torch.autograd.grad, torch.func.jacrev)"
        )

    # vmap over it runs the op through PyTorch's per-sample fallback, like vmap of the op itself.
    transformed: type[torch.autograd.Function] = type(
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

    def eager_forward(ctx, *args):
        # ctx in forward, not a separate setup_context: Function.apply binds a setup_context Function's
        # arguments through inspect.signature at every call, which costs as much as the rest of the call.
        output = body(*args)
        setup_context(ctx, args, output)
        return output

    eager: type[torch.autograd.Function] = type(
        f"{name}_eager",
        (torch.autograd.Function,),
        {
            "forward": staticmethod(eager_forward),
            "backward": staticmethod(backward),
            "jvp": staticmethod(refuse_forward_mode),
        },
    )
    label = f"dcign_fast::{name}"

    def run(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if _plain_eager(args):
            if torch.autograd.profiler._is_profiler_enabled:  # named in traces as the op would be
                with torch.profiler.record_function(label):
                    return eager.apply(*args)
            return eager.apply(*args)
        return transformed.apply(*args) if _differentiating() else op(*args)

    return run
