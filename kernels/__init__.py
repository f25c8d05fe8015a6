"""MegaContext kernels: Gaussian RoPE, gist pooling, pyramidal (LOD-aware) attention, the fused output head + loss.

MC_KERNELS=auto|triton|torch is read once at import. `torch` selects the plain PyTorch references; `triton` the
Triton kernels, raising if they cannot run; `auto` the kernels on CUDA and the references elsewhere. The Triton
interpreter (TRITON_INTERPRET=1, set before import) is only ever chosen explicitly, by tests. The backend never
changes results beyond the tolerances in tests/.
"""
import os

import torch

from kernels import _util

_util.BACKEND = _util.resolve_backend(os.environ.get("MC_KERNELS", "auto"))

from kernels.rope import gauss_rope, gauss_rope_ref  # noqa: E402
from kernels.gist_pool import gist_pool, gist_pool_ref  # noqa: E402
from kernels.lod_attention import lod_attention, lod_attention_ref  # noqa: E402
from kernels.cross_entropy import linear_cross_entropy  # noqa: E402


def backend() -> str:
    return _util.BACKEND


def set_backend(request: str) -> str:
    """Override MC_KERNELS at run time (tests); returns the resolved backend."""
    _util.BACKEND = _util.resolve_backend(request)
    return _util.BACKEND


def banner() -> str:
    """One line for the run log; a loud block when a GPU run falls back to the references."""
    version = _util.triton.__version__ if _util.HAS_TRITON else "not installed"
    line = f"kernels: backend={_util.BACKEND} triton={version} interpreter={'on' if _util.INTERPRET else 'off'}"
    if torch.cuda.is_available() and _util.BACKEND != "triton":
        line = f"!!!\n!!! {line}\n!!! WARNING: CUDA is available but the torch reference kernels are in use (slow)\n!!!"
    return line


__all__ = ["gauss_rope", "gauss_rope_ref", "gist_pool", "gist_pool_ref", "lod_attention", "lod_attention_ref",
           "linear_cross_entropy", "backend", "set_backend", "banner"]
