"""Pyramidal (LOD-aware) attention, "MegaAttention" (DESIGN §8.3), with Gaussian RoPE fused where it is cheap.

N entries: tokens (lod 0), LOD1 gists (K tokens) and LOD2 gists (K*K tokens). Each query sees itself plus the exact
tiling of its past that kernels/pyramid.py defines (bands b0, b1 from W0, W1; optional focus lists; W0=None: plain
causal). With R the Gaussian rotation of kernels/rope.py: o = softmax(scale * R(q) R(k)^T + mask) v. mu, sigma are
constants (no grads).

Layouts: q [B, N, H, D], k, v [B, N, Hk, D] (H % Hk == 0: GQA), mu, sigma [B, N] (or [N]) float, start, end, lod
[N] or [B, N] int, focus [B, NQB, F, 2] or [NQB, F, 2] int (lod, index), lod < 0 = padding. The reference takes any
entry order; the kernels need W0=None or the training layout (tokens, then LOD1, then LOD2 gists; ValueError else).

Grid (fwd and dq, one kernel): one program per (token tile, b*H), longest first (a later tile's pyramid is wider),
heads fastest. A program also serves the <= BLOCK_M/K + BLOCK_M/K**2 gists whose cursors lie in its tile (a gist at
cursor c sees what token c sees, minus token c, plus itself): they ride along as a BLOCK_G-row block over the same key
tiles, so no program visits a gist tile's long, mostly masked token range and every program has similar work
(kernels/schedule.py: busy fraction >= 0.99 at 64k and 256k tokens, 0.59 for the per-level grid before). The key
tiles of the three levels run in two flat loops, the unmasked interior first and then the masked boundary tiles, so
the software pipeline sees one long loop instead of nine short ones. q is rotated in the program's prologue (once per
tile) and dq un-rotated in its epilogue; keys are visited from many tiles, so k is rotated once by a pre-pass
(rotating per visited tile cost 9x the instructions: bench/compile_sm90.py's probe). The dq pass also writes the
rotated q for the dk/dv pass and delta = rowsum(dO * O), and adds the dk/dv of focus-shown token keys (the only keys
the inverse pyramid misses) with fp32 atomics.

dk/dv: one program per (key tile, chunk, b*Hk), longest first, heads fastest, looping over the query tiles that see
the tile (the inverse pyramid), boundary tiles masked; dk is un-rotated in the epilogue. A gist tile's query range
grows with T, so it is split into chunks of ~_CHUNK_TOKENS query rows that meet in fp32 atomics (gist dk/dv may
differ in the last bits run to run). dtypes: bf16 and fp16 dots on tensor cores, fp32 IEEE dots; softmax, lse,
delta fp32; o and grads in the input dtype. Autotune keys bucket N (next power of two) and lengths are not
specialized, so any context length reuses the tuned, compiled kernels. Sequences with T <= W0 + K are plain causal
attention over the tokens (every token sees its whole past): they go to SDPA (`_dense_equivalent`).
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels._util import INTERPRET, SMEM_LIMIT, check, launch, tl, triton, use_triton
from kernels.lod_dkdv import _NOSPEC, _lod_attn_dkdv_kernel
from kernels.pyramid import _BIG, _bands_tl, _focus_hidden, _key_range, _vis, as_bn, focus_lists, lod_visibility, \
    training_layout
from kernels.rope import _gauss_rope_launch, _kv_heads, _rotate_rows, cached_freqs, gauss_rope, gauss_rope_ref
from kernels.schedule import tile_tokens

__all__ = ["lod_attention", "lod_attention_ref", "lod_visibility"]


def lod_attention_ref(q, k, v, mu, sigma, start=None, end=None, lod=None, *, K=32, W0=None, W1=0, focus=None,
                      focus_block=128, rope_base=10000.0, scale=None, rope_bands=0, rope_heads=0):
    """Reference and CPU fallback: Gaussian RoPE, the mask of lod_visibility, SDPA in fp32. Any entry order."""
    B, N, H, D = q.shape
    mu, sigma = as_bn(mu, B, N, "mu"), as_bn(sigma, B, N, "sigma")
    rq, rk = _kv_heads(H, k.shape[2], rope_heads)
    qr = gauss_rope_ref(q.float(), mu, sigma, rope_base, rope_bands, rq).transpose(1, 2)  # (B, H, N, D)
    kr = gauss_rope_ref(k.float(), mu, sigma, rope_base, rope_bands, rk).transpose(1, 2)  # (B, Hk, N, D)
    vf = v.float().transpose(1, 2)
    if k.shape[2] != H:
        kr, vf = kr.repeat_interleave(H // k.shape[2], 1), vf.repeat_interleave(H // k.shape[2], 1)
    if W0 is None:
        o = F.scaled_dot_product_attention(qr, kr, vf, is_causal=True, scale=scale)
    else:
        mask = lod_visibility(start, end, lod, K=K, W0=W0, W1=W1, focus=focus, focus_block=focus_block, B=B)
        o = F.scaled_dot_product_attention(qr, kr, vf, attn_mask=mask[:, None].to(q.device), scale=scale)
    return o.transpose(1, 2).to(q.dtype)


def _dense_equivalent(q, k, v, mu, sigma, T, N1, K, scale, base, bands, heads):
    """The pyramid when T <= W0 + K: token c sees tokens [0, c] (b0 = 0 for every cursor), a gist at cursor c sees
    tokens [0, c) and itself, focus lists change nothing. Tokens: causal SDPA over the T tokens (the flash kernel);
    gists: SDPA of their few rows over all N keys with that mask. RoPE by the gauss_rope op, autograd through SDPA."""
    B, N, H, D = q.shape
    qr, kr = gauss_rope(q, k, mu, sigma, base, bands, heads)
    qr, kr, vt = (x.transpose(1, 2) for x in (qr, kr, v))  # (B, heads, N, D)
    if k.shape[2] != H:
        kr, vt = kr.repeat_interleave(H // k.shape[2], 1), vt.repeat_interleave(H // k.shape[2], 1)
    o_tok = F.scaled_dot_product_attention(qr[:, :, :T], kr[:, :, :T], vt[:, :, :T], is_causal=True, scale=scale)
    if N == T:
        return o_tok.transpose(1, 2)
    i = torch.arange(T, N, device=q.device)
    cursor = torch.where(i < T + N1, (i - T) * K, (i - T - N1) * K * K)  # (Ng,)
    j = torch.arange(N, device=q.device)
    mask = ((j[None, :] < T) & (j[None, :] < cursor[:, None])) | (j[None, :] == i[:, None])  # (Ng, N)
    o_gist = F.scaled_dot_product_attention(qr[:, :, T:], kr, vt, attn_mask=mask, scale=scale)
    return torch.cat([o_tok, o_gist], 2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _query_rows(QR, O, DO, LSE, DELTA, rows, ok, h, H, BWD: tl.constexpr, LOWP: tl.constexpr, D: tl.constexpr):
    """A block of query rows (entries `rows` of the flattened batch): rotated q, and for BWD dO, lse and delta =
    rowsum(dO * O), with delta stored for the dk/dv pass."""
    ofs = (rows * H + h)[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(QR + ofs, mask=ok[:, None], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    if BWD:
        do = tl.load(DO + ofs, mask=ok[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * tl.load(O + ofs, mask=ok[:, None], other=0.0).to(tl.float32), 1)
        tl.store(DELTA + rows * H + h, delta, mask=ok)
        lse = tl.load(LSE + rows * H + h, mask=ok, other=0.0)
        do = do.to(q.dtype)
    else:
        do = q
        lse = tl.zeros([q.shape[0]], tl.float32)
        delta = lse
    return q, do, lse, delta, ofs


@triton.jit
def _attend(st0, st1, st2, q, do, lse, delta, k, v, mask, qk_scale, MASKED: tl.constexpr, BWD: tl.constexpr,
            PREC: tl.constexpr):
    """One key tile for one block of query rows. fwd: online softmax into (acc, m, l); BWD: dq_rot (unscaled) into
    st0. Returns the state and the tile's p and ds (BWD: the focus pass adds their dk/dv)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if BWD:
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(mask, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        st0 += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    else:
        s = s * qk_scale
        if MASKED:
            s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(st1, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(st1 - m_use)
        st0 = st0 * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        st1 = m_new
        st2 = st2 * alpha + tl.sum(p, 1)
        ds = p
    return st0, st1, st2, p, ds


@triton.jit
def _kv_load(KR, V, krow, hk, HK, kok, dtype, MASKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rotated keys and values of rows krow.. (an int64 scalar base, int32 offsets within the tile: 64-bit
    arithmetic per element would cost registers in every loop)."""
    kofs = (krow * HK + hk) * D + (tl.arange(0, BLOCK_N)[:, None] * HK * D + tl.arange(0, D)[None, :])
    if MASKED:
        k = tl.load(KR + kofs, mask=kok[:, None], other=0.0).to(dtype)
        v = tl.load(V + kofs, mask=kok[:, None], other=0.0).to(dtype)
    else:
        k = tl.load(KR + kofs).to(dtype)
        v = tl.load(V + kofs).to(dtype)
    return k, v, kofs


@triton.jit
def _finish(st0, st1, st2, ofs, rows, prow, ok, h, H, rot, O, LSE, DQ, MU, SIGMA, FREQ, sm_scale, BWD: tl.constexpr):
    """Epilogue of a block of query rows: o and lse; BWD: dq = R^T(scale * dq_rot) in q's dtype (positions at prow,
    rot = 0: a position-free head), so no adjoint pass over an fp32 dq_rot."""
    if BWD:
        mu = tl.load(MU + prow, mask=ok, other=0.0).to(tl.float32) * rot
        sg = tl.load(SIGMA + prow, mask=ok, other=0.0).to(tl.float32) * rot
        dq = _rotate_rows(st0 * sm_scale, mu, sg, FREQ, True)
        tl.store(DQ + ofs, dq.to(DQ.dtype.element_ty), mask=ok[:, None])
    else:
        l_i = tl.where(st2 == 0.0, 1.0, st2)
        tl.store(O + ofs, (st0 / l_i[:, None]).to(O.dtype.element_ty), mask=ok[:, None])
        tl.store(LSE + rows * H + h, st1 + tl.math.log2(l_i), mask=ok)


@triton.jit(do_not_specialize=_NOSPEC)
def _lod_attn_fwd_kernel(
    QR, KR, V,  # [B, N, H, D] rotated q; [B, N, HK, D] rotated k, v (the RoPE pre-pass); contiguous, one dtype
    MU, SIGMA, FREQ,  # BWD: [B, N] fp32 positions and spreads (batch stride SMB; 0: shared); [D/2] fp32 frequencies
    FOC,  # [B, NQB, NF, 2] int32 focus lists (deduplicated), or a dummy
    O, LSE,  # [B, N, H, D] in q.dtype; [B, N, H] fp32 log2-domain logsumexp (fwd: written; BWD: read)
    DO, DELTA, DQ,  # BWD: upstream grad; [B, N, H] fp32 rowsum(dO*O) (written); dq in q.dtype (written)
    DKA, DVA,  # BWD with focus: [B, N, HK, D] fp32, zeroed: dk_rot and dv of focus-shown token keys (atomics)
    N, T, N1, N2, B, H, HK, RH,  # entries, tokens, LOD1 gists, LOD2 gists (CAUSAL: T = N); batch, heads, kv heads;
    # query heads h < RH rotate (the others are position-free)
    W0, W1,  # windows (tokens; LOD1 blocks), clamped to < 2**30
    NF, FB, NQB,  # focus entries per list, focus_block (a multiple of BLOCK_M), lists per batch row
    NB, SMB,  # NB: next power of two >= N (the autotuner's key only); SMB: batch stride of MU and SIGMA
    qk_scale, sm_scale,  # scale * log2(e); scale
    KB: tl.constexpr, CAUSAL: tl.constexpr, HAS_FOCUS: tl.constexpr, BWD: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # tile rows: BLOCK_M - BLOCK_G tokens, then the gists whose cursors lie among them (LOD1 ones, then LOD2 ones);
    # with focus lists, a power-of-two token count so that one list serves the tile
    if CAUSAL:
        BLOCK_G: tl.constexpr = 0
    elif HAS_FOCUS:
        BLOCK_G: tl.constexpr = BLOCK_M // 2
    else:
        BLOCK_G: tl.constexpr = (BLOCK_M * (KB + 1) + KB * KB + KB) // (KB * KB + KB + 1) + 1  # >= gists of a tile
    BMT: tl.constexpr = BLOCK_M - BLOCK_G  # = kernels/schedule.py's tile_tokens(BLOCK_M, KB)
    pid = tl.program_id(0)
    bh = pid % (B * H)  # heads fastest, then token tiles from the last (the widest pyramid) to the first
    q0 = (tl.cdiv(T, BMT) - 1 - pid // (B * H)) * BMT
    b = bh // H
    h = bh % H
    hk = h // (H // HK)
    bN = b.to(tl.int64) * N  # row offsets pass 2**31 at long N
    q_last = tl.minimum(q0 + BMT, T) - 1
    r = tl.arange(0, BLOCK_M)
    tok = r < BMT
    j = r - BMT
    g1 = tl.cdiv(q0, KB)  # the first LOD1 gist with its cursor in the tile
    n1 = tl.maximum(tl.minimum(tl.cdiv(q0 + BMT, KB), N1) - g1, 0)
    g2 = tl.cdiv(q0, KB * KB)
    n2 = tl.maximum(tl.minimum(tl.cdiv(q0 + BMT, KB * KB), N2) - g2, 0)
    ql = tl.where(tok, 0, tl.where(j < n1, 1, 2))  # row level
    qi = tl.where(tok, q0 + r, tl.where(j < n1, g1 + j, g2 + j - n1))  # row index within its level
    qok = tl.where(tok, q0 + r < T, j < n1 + n2)
    qrow = qi + tl.where(ql == 0, 0, tl.where(ql == 1, T, T + N1))  # row entry
    cq = qi * tl.where(ql == 0, 1, tl.where(ql == 1, KB, KB * KB))  # row cursor
    b0q, b1q = _bands_tl(cq, W0, W1, KB)
    qself = tl.where(tok, qi, -1)  # a gist's own key is not in the tile's ranges: the state starts from it
    q, do, lse, delta, qofs = _query_rows(QR, O, DO, LSE, DELTA, bN + qrow, qok, h, H, BWD, LOWP, D)
    fbase = ((b * NQB + q0 // FB) * NF * 2).to(tl.int64)
    gist = qok & ~tok
    sofs = ((bN + qrow) * HK + hk)[:, None] * D + tl.arange(0, D)[None, :]
    ks = tl.load(KR + sofs, mask=gist[:, None], other=0.0).to(tl.float32)
    vs = tl.load(V + sofs, mask=gist[:, None], other=0.0).to(tl.float32)
    s_self = tl.sum(q.to(tl.float32) * ks, 1) * qk_scale
    if BWD:  # dq_rot of the own key: ds = p (dp - delta)
        ds_self = tl.where(gist, tl.math.exp2(s_self - lse), 0.0) * (tl.sum(do.to(tl.float32) * vs, 1) - delta)
        st0 = ds_self[:, None] * ks
    else:
        st0 = vs
    st1 = tl.where(gist, s_self, float("-inf"))  # fwd: running max (BWD: unused)
    st2 = tl.where(gist, 1.0, 0.0)
    k0 = _key_range(0, q0, q_last, T, N1, N2, W0, W1, KB, CAUSAL, HAS_FOCUS, BLOCK_N)
    k1 = _key_range(1, q0, q_last, T, N1, N2, W0, W1, KB, CAUSAL, HAS_FOCUS, BLOCK_N)
    k2 = _key_range(2, q0, q_last, T, N1, N2, W0, W1, KB, CAUSAL, HAS_FOCUS, BLOCK_N)
    # 1) the interior tiles of every level, seen by every query of the tile: no masks
    i1 = (k0[3] - k0[2]) // BLOCK_N
    i2 = i1 + (k1[3] - k1[2]) // BLOCK_N
    for i in range(0, i2 + (k2[3] - k2[2]) // BLOCK_N):
        start = tl.where(i < i1, k0[0] + k0[2] + i * BLOCK_N,
                         tl.where(i < i2, k1[0] + k1[2] + (i - i1) * BLOCK_N, k2[0] + k2[2] + (i - i2) * BLOCK_N))
        k, v, _ = _kv_load(KR, V, bN + start, hk, HK, qok, q.dtype, False, D, BLOCK_N)
        st0, st1, st2, _, _ = _attend(st0, st1, st2, q, do, lse, delta, k, v, qok, qk_scale, False, BWD, PREC)
    # 2) the boundary tiles: six segments (head and tail of each level), masked
    c0 = tl.cdiv(tl.maximum(k0[2] - k0[1], 0), BLOCK_N)
    c1 = c0 + tl.cdiv(tl.maximum(k0[4] - k0[3], 0), BLOCK_N)
    c2 = c1 + tl.cdiv(tl.maximum(k1[2] - k1[1], 0), BLOCK_N)
    c3 = c2 + tl.cdiv(tl.maximum(k1[4] - k1[3], 0), BLOCK_N)
    c4 = c3 + tl.cdiv(tl.maximum(k2[2] - k2[1], 0), BLOCK_N)
    for i in range(0, c4 + tl.cdiv(tl.maximum(k2[4] - k2[3], 0), BLOCK_N)):
        seg = (i >= c0).to(tl.int32) + (i >= c1) + (i >= c2) + (i >= c3) + (i >= c4)
        L = seg // 2
        first = tl.where(seg == 0, k0[1], tl.where(seg == 1, k0[3], tl.where(seg == 2, k1[1], tl.where(
            seg == 3, k1[3], tl.where(seg == 4, k2[1], k2[3])))))
        skip = tl.where(seg == 0, 0, tl.where(seg == 1, c0, tl.where(seg == 2, c1, tl.where(
            seg == 3, c2, tl.where(seg == 4, c3, c4)))))
        start = first + (i - skip) * BLOCK_N
        kk = start + tl.arange(0, BLOCK_N)
        kok = kk < tl.where(L == 0, k0[4], tl.where(L == 1, k1[4], k2[4]))
        k, v, _ = _kv_load(KR, V, bN + tl.where(L == 0, k0[0], tl.where(L == 1, k1[0], k2[0])) + start, hk, HK, kok,
                           q.dtype, True, D, BLOCK_N)
        mask = kok[None, :] & _vis(qself[:, None], cq[:, None], b0q[:, None], b1q[:, None], ql[:, None], kk[None, :],
                                   L, KB, CAUSAL)
        if HAS_FOCUS:
            mask = mask & ~(_focus_hidden(FOC, fbase, NF, kk, L)[None, :] & (L > 0) & tok[:, None])
        st0, st1, st2, _, _ = _attend(st0, st1, st2, q, do, lse, delta, k, v, mask, qk_scale, True, BWD, PREC)
    if HAS_FOCUS:  # token rows: tokens of each listed gist that the pyramid shows a query of the tile
        for f in range(NF):
            fl = tl.load(FOC + fbase + 2 * f)
            fspan = tl.where(fl == 1, KB, KB * KB)
            fa = tl.load(FOC + fbase + 2 * f + 1) * fspan
            fe = fa + fspan
            fvis = tl.where(fl == 1, (b1q <= fa) & (fe <= b0q), fe <= b1q) & (fl > 0) & qok & tok
            fhi = tl.where(tl.max(fvis.to(tl.int32), 0) > 0, tl.minimum(fe, T), fa)
            for start in range(fa, fhi, BLOCK_N):
                kk = start + tl.arange(0, BLOCK_N)
                kok = kk < fhi
                k, v, kofs = _kv_load(KR, V, bN + start, hk, HK, kok, q.dtype, True, D, BLOCK_N)
                st0, st1, st2, p, ds = _attend(st0, st1, st2, q, do, lse, delta, k, v, fvis[:, None] & kok[None, :],
                                               qk_scale, True, BWD, PREC)
                if BWD:  # the inverse pyramid does not see these (query, key) pairs: their dk/dv come from here
                    tl.atomic_add(DKA + kofs, tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * sm_scale,
                                  mask=kok[:, None])
                    tl.atomic_add(DVA + kofs, tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC),
                                  mask=kok[:, None])
    rot = (h < RH).to(tl.float32)
    _finish(st0, st1, st2, qofs, bN + qrow, b * SMB + qrow, qok, h, H, rot, O, LSE, DQ, MU, SIGMA, FREQ, sm_scale, BWD)


# ---------------------------------------------------------------------------------------------------------- launchers
class _Meta(NamedTuple):
    T: int  # tokens (CAUSAL: N)
    N1: int  # LOD1 gists
    N2: int  # LOD2 gists
    K: int
    W0: int | None
    W1: int | None
    FB: int  # focus_block
    scale: float
    causal: bool


def smem_bytes(kernel, cfg, D, elt):
    """Shared memory an sm_90 compile of `kernel` ('fwd', 'dq', 'dkdv') takes at cfg, D, element size: an upper
    bound fitted to compiles (tiles staged num_stages deep, plus layout scratch); bench/compile_sm90.py checks it."""
    bm, bn, st = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
    if kernel == "fwd":
        return (bm + 2 * bn * st) * D * elt + bm * bn * 4
    if kernel == "dq":  # scores in fp32 and the 16-bit ds tile staged for its second dot
        return (2 * bm + 2 * bn * st) * D * elt + bm * bn * 10
    return (2 * bn + 2 * bm * st) * D * elt + bm * bn * 8


def registers_ok(kernel, cfg, D, causal=False):
    """16-bit configs that compile without spills, by fp32 elements per thread: fwd holds a [BM, D] accumulator and
    two [BM, BN] score tiles (<= 128); dq its accumulator (<= 64; 32 for the causal one at 8 warps, which spilled
    12 B at D = 128) and scores (<= 32 with 8 warps, 16 with 4); dk/dv two [BN, D] accumulators and three [BM, BN]
    tiles per pipeline stage (<= 88). Fitted to sm_90 compiles at D = 64 and 128 (bench/results/compile_sm90.md),
    which check every kept config."""
    bm, bn, threads = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], 32 * cfg.num_warps
    if kernel == "fwd":
        return bm * (D + 2 * bn) // threads <= 128
    if kernel == "dkdv":
        return (2 * bn * D + 3 * bm * bn * cfg.num_stages) // threads <= 88
    wide = cfg.num_warps == 8
    return bm * D // threads <= (32 if causal and wide else 64) and bm * bn // threads <= (32 if wide else 16)


def _prune(kernel):
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}  # the autotuner passes positional arguments in named_args, keywords in kwargs
        D, elt = a["D"], a["QR"].element_size()
        keep = [c for c in configs if a["FB"] % c.kwargs["BLOCK_M"] == 0  # one focus list per query tile
                and smem_bytes(kernel, c, D, elt) <= SMEM_LIMIT
                and (registers_ok(kernel, c, D, a["CAUSAL"]) if elt == 2  # fp32 IEEE dots: small tiles, fast compiles
                     else c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048)]
        return keep or configs[-1:]
    return prune


def _cfgs(*tiles):
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


CONFIGS = dict(  # (BLOCK_M, BLOCK_N, warps, stages), pruned per shape by _prune; the last one fits every shape
    fwd=_cfgs((128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)),
    dq=_cfgs((128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)),
    dkdv=_cfgs((32, 64, 8, 2), (16, 64, 8, 2), (32, 64, 8, 1), (32, 32, 4, 1)),
)
_KEY = ["NB", "H", "HK", "D", "KB", "CAUSAL", "HAS_FOCUS", "LOWP"]  # NB buckets the length; dtypes join the key
_TUNED = dict(
    fwd=triton.autotune(CONFIGS["fwd"], key=_KEY + ["BWD"], prune_configs_by=dict(early_config_prune=_prune("fwd")))(
        _lod_attn_fwd_kernel),
    dq=triton.autotune(CONFIGS["dq"], key=_KEY + ["BWD"], prune_configs_by=dict(early_config_prune=_prune("dq")),
                       restore_value=["DKA", "DVA"])(_lod_attn_fwd_kernel),
    dkdv=triton.autotune(CONFIGS["dkdv"], key=_KEY, prune_configs_by=dict(early_config_prune=_prune("dkdv")),
                         restore_value=["DKA", "DVA"])(_lod_attn_dkdv_kernel),
)
DEFAULT_CFG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)  # interpreter: small tiles keep masked work cheap
SHORT_DENSE = True  # T <= W0 + K goes to causal SDPA (_dense_equivalent); tests turn it off to compare the kernels
_CHUNK_TOKENS = 1024  # query rows per dk/dv program, at least: a gist key tile's range is split into chunks of this
_DUMMY = {}  # device -> a 1-element fp32 tensor for unused pointer arguments


def _dummy(device):
    if str(device) not in _DUMMY:
        _DUMMY[str(device)] = torch.zeros(1, device=device, dtype=torch.float32)
    return _DUMMY[str(device)]


def _chunks(m):
    """dk/dv programs per key tile of each level: query rows a tile's keys are seen from, over one chunk."""
    if m.causal:
        return 1, 1, 1
    unit = max(min(m.W0, m.T) + m.K, _CHUNK_TOKENS)  # >= a LOD0 tile's range: LOD0 tiles stay one program
    r1 = m.T if m.W1 is None else min(m.W1 * m.K + m.K * m.K, m.T)
    return 1, max(1, r1 // unit), max(1, m.T // unit) if m.W1 is not None else 1


def _scalars(q, k, m, foc, mu, rope_heads):
    B, N, H, D = q.shape
    nf, nqb = (foc.shape[2], foc.shape[1]) if foc is not None else (0, 1)
    w0 = 0 if m.causal else min(m.W0, m.T + m.K)  # clamps keep the int32 band arithmetic far from overflow
    w1 = _BIG // m.K if (m.causal or m.W1 is None) else min(m.W1, m.T // m.K + 2)
    return (N, m.T, m.N1, m.N2, B, H, k.shape[2], rope_heads, w0, w1, nf, m.FB if foc is not None else 1 << 20, nqb,
            triton.next_power_of_2(N), mu.stride(0), m.scale * math.log2(math.e), m.scale)


def _consts(q, m, foc):
    return dict(KB=m.K, CAUSAL=m.causal, HAS_FOCUS=foc is not None, D=q.shape[3],
                LOWP=q.dtype != torch.float32 and not INTERPRET,  # interpreter: bf16 arithmetic is broken
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _positions(mu, sigma, B, N):
    """fp32 [B, N] mu and sigma sharing one batch stride (0 when both are one row for the batch): no copies then."""
    mu, sigma = as_bn(mu, B, N, "mu").float(), as_bn(sigma, B, N, "sigma").float()
    if mu.stride(0) != sigma.stride(0) or mu.stride(1) != 1 or sigma.stride(1) != 1:
        mu, sigma = mu.contiguous(), sigma.contiguous()
    return mu, sigma


def _fwd_grid(m, programs_per_tile, focus):
    return lambda META: (triton.cdiv(m.T, tile_tokens(META["BLOCK_M"], m.K, m.causal, focus)) * programs_per_tile,)


def _lod_attn_fwd(qr, kr, v, mu, sigma, freqs, foc, m, heads):
    """o, lse of the rotated qr, kr."""
    B, N, H, D = qr.shape
    o = torch.empty_like(qr)
    lse = torch.empty((B, N, H), device=qr.device, dtype=torch.float32)
    dummy = _dummy(qr.device)
    grid = _fwd_grid(m, B * H, foc is not None)
    launch(_TUNED["fwd"], grid, DEFAULT_CFG, qr, kr, v, mu, sigma, freqs, foc if foc is not None else dummy,
           o, lse, dummy, dummy, dummy, dummy, dummy, *_scalars(qr, kr, m, foc, mu, heads[0] or H), BWD=False,
           **_consts(qr, m, foc))
    return o, lse


def _lod_attn_bwd(qr, kr, v, mu, sigma, freqs, foc, o, lse, do, m, heads):
    """(dq, dk, dv) in the inputs' dtypes, un-rotated in the kernels' epilogues; rows of split levels (and with focus
    all rows) accumulate in fp32 first."""
    q = qr
    B, N, H, D = q.shape
    HK = kr.shape[2]
    do = do.contiguous()
    nch = _chunks(m)
    delta = torch.empty((B, N, H), device=q.device, dtype=torch.float32)
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(kr), torch.empty_like(v)
    ranges = [(0, m.T), (m.T, m.T + m.N1), (m.T + m.N1, N)]
    split = [r for r, c in zip(ranges, nch) if c > 1]
    r0 = 0 if foc is not None else split[0][0] if split else N
    dka = dva = _dummy(q.device)
    if r0 < N:
        dka = torch.zeros((B, N - r0, HK, D), device=q.device, dtype=torch.float32)
        dva = torch.zeros_like(dka)
    args, consts = _scalars(q, kr, m, foc, mu, heads[0] or H), _consts(q, m, foc)
    fo = foc if foc is not None else delta
    grid = _fwd_grid(m, B * H, foc is not None)
    launch(_TUNED["dq"], grid, DEFAULT_CFG, qr, kr, v, mu, sigma, freqs, fo, o, lse, do, delta, dq, dka, dva,
           *args, BWD=True, **consts)
    grid_kv = lambda META: ((sum(triton.cdiv(n, META["BLOCK_N"]) * c for n, c in zip((m.T, m.N1, m.N2), nch)))  # noqa
                            * B * HK,)
    args_kv = list(args)
    args_kv[7] = heads[1] or HK
    launch(_TUNED["dkdv"], grid_kv, DEFAULT_CFG, qr, kr, v, mu, sigma, freqs, fo, do, lse, delta, dk, dv, dka, dva,
           *args_kv, nch[1], nch[2], r0, **consts)
    for a, z in split:
        dk[:, a:z] = dka[:, a - r0:z - r0]
        dv[:, a:z] = dva[:, a - r0:z - r0]
    return dq, dk, dv


def _meta(q, start, end, lod, focus, K, W0, W1, focus_block, scale, validate=True):
    """(_Meta, deduplicated focus lists or None) of a call; validate=False: the backward's (checked in forward)."""
    B, N = q.shape[:2]
    if W0 is None:
        return _Meta(N, 0, 0, K, None, W1, focus_block, scale, True), None
    T, N1, N2 = training_layout(start, end, lod, B, N, K, W0, W1, validate=validate)
    foc = None if focus is None else focus_lists(focus, B, T, N1, N2, K, focus_block, q.device, validate=validate)
    return _Meta(T, N1, N2, K, W0, W1, focus_block, scale, False), foc


def _forward(q, k, v, mu, sigma, foc, m, rope):
    """(o, lse, qr, kr): the RoPE pre-pass (q and k in one launch), then the forward kernel; rope = (base, bands,
    heads)."""
    B, N, H, D = q.shape
    freqs = cached_freqs(D, rope[0], rope[1], q.device)
    heads = _kv_heads(H, k.shape[2], rope[2])
    qr, kr = _gauss_rope_launch(q, k, mu, sigma, freqs, False, heads=heads)
    o, lse = _lod_attn_fwd(qr, kr, v, mu, sigma, freqs, foc, m, heads)
    return o, lse, qr, kr


def _backward(do, qr, kr, v, o, lse, mu, sigma, foc, m, rope):
    freqs = cached_freqs(qr.shape[3], rope[0], rope[1], qr.device)
    return _lod_attn_bwd(qr, kr, v, mu, sigma, freqs, foc, o, lse, do, m, _kv_heads(qr.shape[2], kr.shape[2], rope[2]))


class LodAttentionFn(torch.autograd.Function):
    """q, k, v -> o (eager calls): the RoPE pre-pass and the forward kernel; the dq pass and the dk/dv pass backward,
    with the RoPE adjoint in their epilogues; mu, sigma, metadata are constants."""

    @staticmethod
    def forward(ctx, q, k, v, mu, sigma, foc, m, rope):
        o, lse, qr, kr = _forward(q, k, v, mu, sigma, foc, m, rope)
        ctx.save_for_backward(qr, kr, v, mu, sigma, foc, o, lse)
        ctx.m, ctx.rope = m, rope
        return o

    @staticmethod
    def backward(ctx, do):
        qr, kr, v, mu, sigma, foc, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, qr, kr, v, o, lse, mu, sigma, foc, ctx.m, ctx.rope)
        return dq, dk, dv, None, None, None, None, None


# the same launches as custom ops, for torch.compile (opaque to dynamo: no tracing into the autotuner or the metadata
# checks, which run in the op at call time)
@torch.library.custom_op("megacontext::lod_attention", mutates_args=())
def _lod_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor,
                      start: torch.Tensor | None, end: torch.Tensor | None, lod: torch.Tensor | None,
                      focus: torch.Tensor | None, K: int, W0: int | None, W1: int | None, focus_block: int,
                      scale: float, rope_base: float, rope_bands: int, rope_heads: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, foc = _meta(q, start, end, lod, focus, K, W0, W1, focus_block, scale)
    mu, sigma = _positions(mu, sigma, *q.shape[:2])
    return _forward(q.contiguous(), k.contiguous(), v.contiguous(), mu, sigma, foc, m,
                    (rope_base, rope_bands, rope_heads))


@_lod_attention_op.register_fake
def _lod_attention_fake(q, k, v, mu, sigma, start, end, lod, focus, K, W0, W1, focus_block, scale, rope_base,
                        rope_bands, rope_heads):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), q.new_empty(q.shape), k.new_empty(
        k.shape)


@torch.library.custom_op("megacontext::lod_attention_bwd", mutates_args=())
def _lod_attention_bwd_op(do: torch.Tensor, qr: torch.Tensor, kr: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, start: torch.Tensor | None,
                          end: torch.Tensor | None, lod: torch.Tensor | None, focus: torch.Tensor | None, K: int,
                          W0: int | None, W1: int | None, focus_block: int, scale: float, rope_base: float,
                          rope_bands: int, rope_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, foc = _meta(qr, start, end, lod, focus, K, W0, W1, focus_block, scale, validate=False)
    mu, sigma = _positions(mu, sigma, *qr.shape[:2])
    return _backward(do, qr, kr, v.contiguous(), o, lse, mu, sigma, foc, m, (rope_base, rope_bands, rope_heads))


@_lod_attention_bwd_op.register_fake
def _lod_attention_bwd_fake(do, qr, kr, v, o, lse, *args):
    return qr.new_empty(qr.shape), kr.new_empty(kr.shape), v.new_empty(v.shape)


def _lod_attention_setup(ctx, inputs, output):
    q, k, v, mu, sigma, start, end, lod, focus = inputs[:9]
    o, lse, qr, kr = output
    ctx.save_for_backward(qr, kr, v, o, lse, mu, sigma, start, end, lod, focus)
    ctx.args = inputs[9:]


def _lod_attention_backward(ctx, do, dlse, dqr, dkr):
    grads = torch.ops.megacontext.lod_attention_bwd(do.contiguous(), *ctx.saved_tensors, *ctx.args)
    return (*grads, *([None] * 14))


_lod_attention_op.register_autograd(_lod_attention_backward, setup_context=_lod_attention_setup)


def lod_attention(q, k, v, mu, sigma, start=None, end=None, lod=None, *, K=32, W0=None, W1=0, focus=None,
                  focus_block=128, rope_base=10000.0, scale=None, rope_bands=0, rope_heads=0):
    """Pyramidal attention with Gaussian RoPE (see the module docstring). Returns [B, N, H, D] in q.dtype.

    q: [B, N, H, D]; k, v: [B, N, Hk, D], H % Hk == 0; mu, sigma: [B, N] or [N] float (RoPE mean and spread, no
    grads); start, end, lod: [N] or [B, N] int (unused, may be None, when W0 is None); K: block size, a power of two;
    W0: LOD0 window in tokens (None: plain causal over entries); W1: LOD1 window in blocks (None: no LOD2 band);
    focus: [B, NQB, F, 2] or [NQB, F, 2] int (lod, index) per block of focus_block token positions, lod < 0 pads;
    scale: softmax scale, default 1/sqrt(D); rope_bands, rope_heads: p-RoPE's rotating bands and the rotated query
    heads (0: all; see kernels/rope.py). Triton path: D a power of two in [32, 256], the training layout when W0 is
    given, focus_block a multiple of 32; otherwise ValueError (lod_attention_ref takes any layout). Metadata from
    kernels.pyramid.layout_tensors costs nothing; other metadata on the host, or on the GPU in make_gists' layout,
    costs no host sync (kernels/pyramid.py).
    """
    check(q.dim() == 4 and k.dim() == 4 and v.shape == k.shape and q.shape[:2] == k.shape[:2]
          and q.shape[3] == k.shape[3], f"lod_attention: q {tuple(q.shape)} must be [B, N, H, D] and k, v "
          f"{tuple(k.shape)}, {tuple(v.shape)} [B, N, Hk, D]")
    B, N, H, D = q.shape
    check(k.shape[2] > 0 and H % k.shape[2] == 0, f"lod_attention: H={H} must be a multiple of Hk={k.shape[2]}")
    check(q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype and v.dtype == q.dtype,
          f"lod_attention: q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(D % 2 == 0, f"lod_attention: head dim must be even, got {D}")
    check(isinstance(K, int) and K >= 2 and K & (K - 1) == 0, f"lod_attention: K must be a power of two >= 2, got {K}")
    check(W0 is None or (int(W0) == W0 and W0 >= 0), f"lod_attention: W0 must be None or an int >= 0, got {W0}")
    check(W1 is None or (int(W1) == W1 and W1 >= 0), f"lod_attention: W1 must be None or an int >= 0, got {W1}")
    check(mu.is_floating_point() and sigma.is_floating_point(), "lod_attention: mu and sigma must be float tensors")
    check(0 <= rope_bands <= D // 2 and 0 <= rope_heads <= H and (rope_heads * k.shape[2]) % H == 0,
          f"lod_attention: rope_bands={rope_bands} must be in 0..D/2, rope_heads={rope_heads} in 0..H, whole groups")
    mu, sigma = as_bn(mu, B, N, "mu"), as_bn(sigma, B, N, "sigma")
    if W0 is not None:
        check(start is not None and end is not None and lod is not None, "lod_attention: W0 needs start, end, lod")
        for x, n in ((start, "start"), (end, "end"), (lod, "lod")):
            check(not x.is_floating_point(), f"lod_attention: {n} must be an integer tensor, got {x.dtype}")
            as_bn(x, B, N, n)
    check(focus is None or W0 is not None, "lod_attention: focus lists need the pyramid (W0 is not None)")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    rope = (float(rope_base), int(rope_bands), int(rope_heads))
    if not use_triton(q, k, v):
        return lod_attention_ref(q, k, v, mu, sigma, start, end, lod, K=K, W0=W0, W1=W1, focus=focus,
                                 focus_block=focus_block, rope_base=rope_base, scale=scale, rope_bands=rope_bands,
                                 rope_heads=rope_heads)
    check(32 <= D <= 256 and D & (D - 1) == 0,
          f"lod_attention (triton): D must be a power of two in [32, 256], got {D}")
    if N == 0:
        return torch.empty_like(q)
    if torch.compiler.is_compiling():  # the custom op: checks and launches at call time, opaque to dynamo
        return torch.ops.megacontext.lod_attention(q, k, v, mu, sigma, start, end, lod, focus, K, W0, W1,
                                                   focus_block, scale, *rope)[0]
    m, foc = _meta(q, start, end, lod, focus, K, W0, W1, focus_block, scale)
    if SHORT_DENSE and not m.causal and m.T <= m.W0 + K:  # every token sees its whole past: causal SDPA is the same
        return _dense_equivalent(q, k, v, mu, sigma, m.T, m.N1, K, scale, *rope)
    mu, sigma = _positions(mu, sigma, B, N)
    return LodAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), mu, sigma, foc, m, rope)
