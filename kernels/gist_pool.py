"""Gist pooling (DESIGN §4, §8.2): learned-query attention pooling of every aligned group of K rows.

x: [B, T, H, D] with T = G * K, query: [H, D] (one learned query per head). For group g, head h, and the rows i < K
of the group:

    s_i = <x_i, query_h> / sqrt(D)        p = softmax_i(s)        out[b, g, h] = sum_i p_i x_i

Backward, with dout = d loss / d out[b, g, h]:

    dp_i = <dout, x_i>        ds_i = p_i (dp_i - sum_j p_j dp_j)
    dx_i = p_i dout + ds_i query_h / sqrt(D)        dquery_h = sum over b, g, i of ds_i x_i / sqrt(D)

Groups never mix: a group is K consecutive rows starting at a multiple of K, and the tree never pools a partial
block, so T must be a multiple of K. K is a power of two, 1 <= K <= 64 (one register tile per group and head).

Kernels: one program per (b, g, h) holding a [K, D] tile. The backward recomputes the scores and the softmax instead
of saving them: it must reload the [K, D] tile anyway for dp and dquery, and the scores are K*D FMAs on data already
in registers, so saving p would only add a write in forward and a read in backward. dquery is a sum over B*G programs:
each writes its fp32 [D] partial, torch sums them (deterministic, unlike atomics; 2/K of the bytes of x in bf16).
"""
import math

import torch

from kernels._util import INTERPRET, check, pick, tl, triton, use_triton

K_MAX = 64


def gist_pool_ref(x: torch.Tensor, query: torch.Tensor, K: int) -> torch.Tensor:
    """Reference and CPU fallback. x: [B, T, H, D], query: [H, D] -> [B, T // K, H, D] in x.dtype (fp32 compute)."""
    B, T, H, D = x.shape
    xg = x.float().view(B, T // K, K, H, D)
    s = torch.einsum("bgkhd,hd->bgkh", xg, query.float()) / math.sqrt(D)  # (B, G, K, H)
    p = torch.softmax(s, dim=2)
    return torch.einsum("bgkh,bgkhd->bghd", p, xg).to(x.dtype)


@triton.jit
def _load_group(X, QRY, pid_bg, h, scale,
                H: tl.constexpr, D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [K, D] tile of group pid_bg (= b * G + g, so its first row is pid_bg * K) and head h, its query, and p."""
    i = tl.arange(0, K)
    d = tl.arange(0, BLOCK_D)
    offs = (pid_bg * K + i)[:, None] * (H * D) + h * D + d[None, :]  # (K, BLOCK_D), int64 via pid_bg
    dmask = d < D
    x = tl.load(X + offs, mask=dmask[None, :], other=0.0).to(tl.float32)
    qv = tl.load(QRY + h * D + d, mask=dmask, other=0.0).to(tl.float32)
    s = tl.sum(x * qv[None, :], axis=1) * scale  # (K,) masked d contribute 0
    e = tl.exp(s - tl.max(s, axis=0))
    p = e / tl.sum(e, axis=0)
    return x, qv, p, offs, d, dmask


@triton.jit
def _gist_pool_fwd_kernel(
    X,  # [B, T, H, D] contiguous, T = G * K
    QRY,  # [H, D] contiguous learned queries
    OUT,  # [B, G, H, D] contiguous, x's dtype
    scale,  # 1 / sqrt(D)
    H: tl.constexpr,  # heads
    D: tl.constexpr,  # head dim (any; padded to BLOCK_D)
    K: tl.constexpr,  # rows per group, a power of two <= 64
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_bg = tl.program_id(0).to(tl.int64)  # b * G + g; row offsets pass 2**31 at long T
    h = tl.program_id(1)
    x, qv, p, offs, d, dmask = _load_group(X, QRY, pid_bg, h, scale, H, D, K, BLOCK_D)
    out = tl.sum(p[:, None] * x, axis=0)  # (BLOCK_D,)
    tl.store(OUT + (pid_bg * H + h) * D + d, out.to(OUT.dtype.element_ty), mask=dmask)


@triton.jit
def _gist_pool_bwd_kernel(
    X,  # [B, T, H, D] contiguous, the forward input
    QRY,  # [H, D] contiguous
    DOUT,  # [B, G, H, D] contiguous upstream gradient
    DX,  # [B, T, H, D] contiguous, x's dtype
    DQ_PART,  # [B * G, H, D] fp32 per-program partials of dquery, summed over dim 0 in torch
    scale,  # 1 / sqrt(D)
    H: tl.constexpr,  # heads
    D: tl.constexpr,  # head dim
    K: tl.constexpr,  # rows per group
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_bg = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    x, qv, p, offs, d, dmask = _load_group(X, QRY, pid_bg, h, scale, H, D, K, BLOCK_D)
    o_offs = (pid_bg * H + h) * D + d
    do = tl.load(DOUT + o_offs, mask=dmask, other=0.0).to(tl.float32)  # (BLOCK_D,)
    dp = tl.sum(x * do[None, :], axis=1)  # (K,)
    ds = p * (dp - tl.sum(p * dp, axis=0)) * scale  # softmax Jacobian, with the score scale folded in
    dx = p[:, None] * do[None, :] + ds[:, None] * qv[None, :]
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=dmask[None, :])
    tl.store(DQ_PART + o_offs, tl.sum(ds[:, None] * x, axis=0), mask=dmask)


_WARPS = [triton.Config({}, num_warps=nw) for nw in (1, 2, 4, 8)]  # one [K, D] tile per program: only warps to tune
_gist_pool_fwd_tuned = triton.autotune(configs=_WARPS, key=["H", "D", "K"])(_gist_pool_fwd_kernel)
_gist_pool_bwd_tuned = triton.autotune(configs=_WARPS, key=["H", "D", "K"])(_gist_pool_bwd_kernel)
DEFAULT_CFG = dict(num_warps=1)  # interpreter (autotune needs a driver); ignored there anyway


def _grid_cfg(B, G, H, D):
    return (B * G, H), dict(BLOCK_D=triton.next_power_of_2(D), **(DEFAULT_CFG if INTERPRET else {}))


def _gist_pool_fwd(x, query, K):
    B, T, H, D = x.shape
    assert query.shape == (H, D) and T % K == 0
    x, query = x.contiguous(), query.contiguous()
    out = torch.empty((B, T // K, H, D), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    grid, cfg = _grid_cfg(B, T // K, H, D)
    pick(_gist_pool_fwd_tuned, _gist_pool_fwd_kernel)[grid](x, query, out, 1.0 / math.sqrt(D), H=H, D=D, K=K, **cfg)
    return out


def _gist_pool_bwd(x, query, dout, K):
    B, T, H, D = x.shape
    assert dout.shape == (B, T // K, H, D)
    x, query, dout = x.contiguous(), query.contiguous(), dout.contiguous()
    dx = torch.empty_like(x)
    dq_part = torch.empty((B * (T // K), H, D), device=x.device, dtype=torch.float32)
    if dx.numel() == 0:
        return dx, torch.zeros_like(query)
    grid, cfg = _grid_cfg(B, T // K, H, D)
    pick(_gist_pool_bwd_tuned, _gist_pool_bwd_kernel)[grid](
        x, query, dout, dx, dq_part, 1.0 / math.sqrt(D), H=H, D=D, K=K, **cfg)
    return dx, dq_part.sum(0).to(query.dtype)


class GistPoolFn(torch.autograd.Function):
    """x, query -> pooled gists, with Triton forward and backward (grads for x and query)."""

    @staticmethod
    def forward(ctx, x, query, K):
        ctx.save_for_backward(x, query)  # p is recomputed in backward (see the module docstring)
        ctx.K = K
        return _gist_pool_fwd(x, query, K)

    @staticmethod
    def backward(ctx, dout):
        x, query = ctx.saved_tensors
        dx, dquery = _gist_pool_bwd(x, query, dout, ctx.K)
        return dx, dquery, None


def gist_pool(x: torch.Tensor, query: torch.Tensor, K: int) -> torch.Tensor:
    """Attention-pool every aligned group of K rows with one learned query per head.

    x: [B, T, H, D] with T a multiple of K, query: [H, D], K a power of two in 1..64. Returns [B, T // K, H, D] in
    x.dtype.
    """
    check(x.dim() == 4, f"gist_pool: x must be [B, T, H, D], got {tuple(x.shape)}")
    check(query.shape == (x.shape[2], x.shape[3]),
          f"gist_pool: query {tuple(query.shape)} must be [H, D] = {tuple(x.shape[2:])}")
    check(x.is_floating_point() and query.is_floating_point(),
          f"gist_pool: x and query must be floating point, got {x.dtype} and {query.dtype}")
    check(isinstance(K, int) and 1 <= K <= K_MAX and K & (K - 1) == 0,
          f"gist_pool: K must be a power of two in 1..{K_MAX}, got {K!r}")
    check(x.shape[1] % K == 0,
          f"gist_pool: T={x.shape[1]} is not a multiple of K={K}; the tree never pools a partial block")
    if use_triton(x, query):
        return GistPoolFn.apply(x, query, K)
    return gist_pool_ref(x, query, K)
