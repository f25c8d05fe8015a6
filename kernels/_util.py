"""Shared kernel plumbing: the interpreter flag, the backend switch, the fixed-or-autotuned launch, input checks.

The backend lives here (not in kernels/__init__.py) so that every op module can read it at call time without a
circular import. Triton is optional at import time: on a machine without it the modules still import (their
@triton.jit functions become inert placeholders) and the torch references serve every op.
"""
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # must be set before kernel modules are imported

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform: references only
    HAS_TRITON = False

    class _Inert:  # lets `@triton.jit`, `@triton.autotune(...)` and `tl.constexpr` annotations evaluate
        def __getattr__(self, name):
            return _Inert()

        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Inert()

    triton = tl = _Inert()

BACKEND = "torch"  # resolved by kernels/__init__.py; "triton" or "torch"


def resolve_backend(request: str) -> str:
    """auto -> triton on CUDA, else torch (never the interpreter automatically); triton raises if unusable."""
    if request not in ("auto", "triton", "torch"):
        raise ValueError(f"MC_KERNELS must be auto, triton or torch, got {request!r}")
    if request == "torch":
        return "torch"
    usable = HAS_TRITON and (torch.cuda.is_available() or INTERPRET)
    if request == "triton" and not usable:
        why = "triton is not installed" if not HAS_TRITON else "no CUDA device and TRITON_INTERPRET is not 1"
        raise RuntimeError(f"MC_KERNELS=triton requested but {why}")
    return "triton" if usable and (request == "triton" or torch.cuda.is_available()) else "torch"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the triton backend is active and the tensors are where it runs (CUDA; anywhere when interpreting)."""
    return BACKEND == "triton" and (INTERPRET or all(t.is_cuda for t in tensors))


SMEM_LIMIT = 227 * 1024  # bytes of shared memory one sm_90 block may use; launchers prune configs above it
LAUNCH_HOOK = None  # bench/compile_sm90.py sets this to record launches (kernel, grid, arguments) instead of running


def launch(tuned, grid, default_cfg: dict, *args, **kwargs):
    """The autotuned kernel on a GPU; its bare jit function with default_cfg under the interpreter; or LAUNCH_HOOK."""
    if LAUNCH_HOOK is not None:
        return LAUNCH_HOOK(tuned, grid, args, kwargs)
    return tuned.fn[grid](*args, **kwargs, **default_cfg) if INTERPRET else tuned[grid](*args, **kwargs)


def check(cond: bool, msg: str) -> None:
    """A clear ValueError from a public op instead of a silent wrong answer or an out-of-bounds access."""
    if not cond:
        raise ValueError(msg)
