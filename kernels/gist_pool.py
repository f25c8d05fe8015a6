"""Gist pooling (DESIGN §4, §8.2): learned-query attention pooling of every aligned group of K rows.

x: [B, T, H, D] with T = G * K, query: [H, D] (one learned query per head). For group g, head h, and the rows i < K
of the group:

    s_i = <x_i, query_h> / sqrt(D)        p = softmax_i(s)        out[b, g, h] = sum_i p_i x_i

Backward, with dout = d loss / d out[b, g, h]:

    dp_i = <dout, x_i>        ds_i = p_i (dp_i - sum_j p_j dp_j)
    dx_i = p_i dout + ds_i query_h / sqrt(D)        dquery_h = sum over b, g, i of ds_i x_i / sqrt(D)

Groups never mix: a group is K consecutive rows starting at a multiple of K, and the tree never pools a partial
block, so T must be a multiple of K. K is a power of two, 1 <= K <= 64 (one register tile per group and head).

Kernels: one program per GB consecutive groups, all heads: it streams the groups' contiguous K * H * D elements head
by head in [GB, K, D] tiles (the per-head grid before read 128-byte pieces of every row from programs far apart in
time); GB is autotuned among configs pruned by shape (16..64 elements per thread and head step). Each byte of x, dout
and dx is read or written once. The backward recomputes the scores and the softmax instead of saving them: it must
reload the tile anyway for dp and dquery, and the scores are K*D FMAs on data already in registers. dquery is
reduced in the kernel: each program adds its groups' sum of ds_i x_i per head to an fp32 [H, D] buffer with one
atomic add per head (B*G/GB adds per head; the summation order, so the last bits, can differ run to run).

Eager calls go through GistPoolFn; under torch.compile the same launchers run as the custom ops
megacontext::gist_pool / gist_pool_bwd.
"""
import math

import torch

from kernels._util import check, launch, tl, triton, use_triton

K_MAX = 64


def gist_pool_ref(x: torch.Tensor, query: torch.Tensor, K: int) -> torch.Tensor:
    """Reference and CPU fallback. x: [B, T, H, D], query: [H, D] -> [B, T // K, H, D] in x.dtype (fp32 compute)."""
    B, T, H, D = x.shape
    xg = x.float().view(B, T // K, K, H, D)
    s = torch.einsum("bgkhd,hd->bgkh", xg, query.float()) / math.sqrt(D)  # (B, G, K, H)
    p = torch.softmax(s, dim=2)
    return torch.einsum("bgkh,bgkhd->bghd", p, xg).to(x.dtype)


@triton.jit
def _load_groups(X, QRY, g, h, NG, scale,
                 H: tl.constexpr, D: tl.constexpr, K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The [GB, K, D] tile of groups g (group = b * G + g, first row group * K) at head h, its query, and p."""
    i = tl.arange(0, K)
    d = tl.arange(0, BLOCK_D)
    offs = ((g[:, None] * K + i[None, :]) * (H * D) + h * D)[:, :, None] + d[None, None, :]  # (GB, K, BLOCK_D)
    dmask = d < D
    mask = (g < NG)[:, None, None] & dmask[None, None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    qv = tl.load(QRY + h * D + d, mask=dmask, other=0.0).to(tl.float32)
    s = tl.sum(x * qv[None, None, :], axis=2) * scale  # (GB, K); masked d and groups contribute 0
    e = tl.exp(s - tl.max(s, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    return x, qv, p, offs, mask, d, dmask


@triton.jit(do_not_specialize=["NG"])
def _gist_pool_fwd_kernel(
    X,  # [B, T, H, D] contiguous, T = G * K
    QRY,  # [H, D] contiguous learned queries
    OUT,  # [B, G, H, D] contiguous, x's dtype
    NG,  # B * G groups
    scale,  # 1 / sqrt(D)
    H: tl.constexpr,  # heads
    D: tl.constexpr,  # head dim (any; padded to BLOCK_D)
    K: tl.constexpr,  # rows per group, a power of two <= 64
    GB: tl.constexpr,  # groups per program (autotuned; GB * K * H * D contiguous elements per program)
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    g = tl.program_id(0).to(tl.int64) * GB + tl.arange(0, GB)  # int64: row offsets pass 2**31 at long T
    for h in range(H):
        x, qv, p, offs, mask, d, dmask = _load_groups(X, QRY, g, h, NG, scale, H, D, K, BLOCK_D)
        out = tl.sum(p[:, :, None] * x, axis=1)  # (GB, BLOCK_D)
        o_offs = (g * H + h)[:, None] * D + d[None, :]
        tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=(g < NG)[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["NG"])
def _gist_pool_bwd_kernel(
    X,  # [B, T, H, D] contiguous, the forward input
    QRY,  # [H, D] contiguous
    DOUT,  # [B, G, H, D] contiguous upstream gradient
    DX,  # [B, T, H, D] contiguous, x's dtype
    DQRY,  # [H, D] fp32, zeroed: dquery accumulates here (one atomic add of a [D] partial per program and head)
    NG,  # B * G groups
    scale,  # 1 / sqrt(D)
    H: tl.constexpr,  # heads
    D: tl.constexpr,  # head dim
    K: tl.constexpr,  # rows per group
    GB: tl.constexpr,  # groups per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    g = tl.program_id(0).to(tl.int64) * GB + tl.arange(0, GB)
    for h in range(H):
        x, qv, p, offs, mask, d, dmask = _load_groups(X, QRY, g, h, NG, scale, H, D, K, BLOCK_D)
        o_offs = (g * H + h)[:, None] * D + d[None, :]
        do = tl.load(DOUT + o_offs, mask=(g < NG)[:, None] & dmask[None, :], other=0.0).to(tl.float32)  # (GB, BD)
        dp = tl.sum(x * do[:, None, :], axis=2)  # (GB, K)
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * scale  # softmax Jacobian, score scale folded in
        dx = p[:, :, None] * do[:, None, :] + ds[:, :, None] * qv[None, None, :]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        tl.atomic_add(DQRY + h * D + d, tl.sum(tl.sum(ds[:, :, None] * x, axis=1), axis=0), mask=dmask)


def _prune(configs, named_args, **kwargs):
    """Keep configs whose [GB, K, D] head step gives each thread 16..64 elements (>= 4 KB a step, no spills)."""
    a = {**named_args, **kwargs}  # the autotuner passes positional arguments in named_args, keywords in kwargs
    e = a["K"] * a["BLOCK_D"]
    keep = [c for c in configs if 16 <= c.kwargs["GB"] * e // (32 * c.num_warps) <= 64]
    return keep or configs[:1]


CONFIGS = [triton.Config(dict(GB=gb), num_warps=nw) for gb in (1, 2, 4, 8, 16, 32, 64) for nw in (4, 8)]
_KEY = ["H", "D", "K"]
_gist_pool_fwd_tuned = triton.autotune(CONFIGS, key=_KEY, prune_configs_by=dict(early_config_prune=_prune))(
    _gist_pool_fwd_kernel)
_gist_pool_bwd_tuned = triton.autotune(CONFIGS, key=_KEY, prune_configs_by=dict(early_config_prune=_prune),
                                       reset_to_zero=["DQRY"])(_gist_pool_bwd_kernel)
DEFAULT_CFG = dict(GB=4, num_warps=4)  # interpreter: cost is per program, so several groups per program


def _grid(B, G):
    return lambda meta: (triton.cdiv(B * G, meta["GB"]),)


def _gist_pool_fwd(x, query, K):
    B, T, H, D = x.shape
    assert query.shape == (H, D) and T % K == 0
    x, query = x.contiguous(), query.contiguous()
    out = torch.empty((B, T // K, H, D), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    launch(_gist_pool_fwd_tuned, _grid(B, T // K), DEFAULT_CFG, x, query, out, B * (T // K), 1.0 / math.sqrt(D),
           H=H, D=D, K=K, BLOCK_D=triton.next_power_of_2(D))
    return out


def _gist_pool_bwd(x, query, dout, K):
    B, T, H, D = x.shape
    assert dout.shape == (B, T // K, H, D)
    x, query, dout = x.contiguous(), query.contiguous(), dout.contiguous()
    dx = torch.empty_like(x)
    dquery = torch.zeros((H, D), device=x.device, dtype=torch.float32)
    if dx.numel() == 0:
        return dx, dquery.to(query.dtype)
    launch(_gist_pool_bwd_tuned, _grid(B, T // K), DEFAULT_CFG, x, query, dout, dx, dquery, B * (T // K),
           1.0 / math.sqrt(D), H=H, D=D, K=K, BLOCK_D=triton.next_power_of_2(D))
    return dx, dquery.to(query.dtype)


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


# the same launches as custom ops, for torch.compile (opaque to dynamo: no tracing into the autotuner)
@torch.library.custom_op("megacontext::gist_pool", mutates_args=())
def _gist_pool_op(x: torch.Tensor, query: torch.Tensor, K: int) -> torch.Tensor:
    return _gist_pool_fwd(x, query, K)


@_gist_pool_op.register_fake
def _gist_pool_fake(x, query, K):
    B, T, H, D = x.shape
    return x.new_empty((B, T // K, H, D))


@torch.library.custom_op("megacontext::gist_pool_bwd", mutates_args=())
def _gist_pool_bwd_op(x: torch.Tensor, query: torch.Tensor, dout: torch.Tensor, K: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return _gist_pool_bwd(x, query, dout, K)


@_gist_pool_bwd_op.register_fake
def _gist_pool_bwd_fake(x, query, dout, K):
    return x.new_empty(x.shape), query.new_empty(query.shape)


def _gist_pool_setup(ctx, inputs, output):
    x, query, K = inputs
    ctx.save_for_backward(x, query)
    ctx.K = K


def _gist_pool_backward(ctx, dout):
    x, query = ctx.saved_tensors
    dx, dquery = torch.ops.megacontext.gist_pool_bwd(x, query, dout.contiguous(), ctx.K)
    return dx, dquery, None


_gist_pool_op.register_autograd(_gist_pool_backward, setup_context=_gist_pool_setup)


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
        if torch.compiler.is_compiling():
            return torch.ops.megacontext.gist_pool(x, query, K)
        return GistPoolFn.apply(x, query, K)
    return gist_pool_ref(x, query, K)
