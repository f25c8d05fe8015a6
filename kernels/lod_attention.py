"""Pyramidal (LOD-aware) attention, "MegaAttention" (DESIGN §8.3), over q and k rotated once by Gaussian RoPE.

N entries: tokens (lod 0), LOD1 gists (K tokens) and LOD2 gists (K*K tokens). Each query sees itself plus the exact
tiling of its past that kernels/pyramid.py defines (bands b0, b1 from W0, W1; optional focus lists; W0=None: plain
causal). With R the Gaussian rotation of kernels/rope.py: o = softmax(scale * R(q) R(k)^T + mask) v. mu, sigma are
constants (no grads).

Layouts: q [B, N, H, D], k, v [B, N, Hk, D] (H % Hk == 0: GQA), mu, sigma [B, N] (or [N]) float, start, end, lod
[N] or [B, N] int, focus [B, NQB, F, 2] or [NQB, F, 2] int (lod, index), lod < 0 = padding. The reference takes any
entry order; the kernels need W0=None or the training layout (tokens, then LOD1, then LOD2 gists; ValueError else).

RoPE once: one pass of the RoPE kernel rotates q and k before attention, and its adjoint un-rotates dq, dk after.
Chosen by sm_90 instructions per inner-loop tile (bench/compile_sm90.py's probe: the forward loop, 128x64 tile, D=128,
bf16): pre-rotated keys 350, cos/sin tables per entry 518 (+64 KB shared memory for the extra loads), rotation
recomputed from positions 3,237 (exp, sin, cos per pair, as the old kernel did in fwd, dq and dk/dv alike). A key tile
is visited from ~W0/BM query tiles (hundreds for a gist), so any per-tile rotation is paid that often; angle addition
would still rotate per tile. The pre-pass is memory-bound (read q, k; write them rotated), shares each angle across
heads and computes sin/cos to ~1 ulp up to |angle| ~ 3e9 (kernels/rope.py), so positions to 1e9 stay precise.

Grid: fwd and dq: one program per (query tile of one level section, b*H), looping over the key ranges of the tile's
pyramid (arithmetic in the level indices: ~W0 + W1 + T/K**2 keys per query); masks only on each range's boundary
tiles. The dq kernel computes delta = rowsum(dO * O) of its rows first (the fused pre-pass) and adds the dk/dv of
focus-shown token keys (the only keys the inverse pyramid misses) with fp32 atomics. dk/dv: one program per (key
tile, chunk, b*Hk), looping over the query tiles that see the tile (the inverse pyramid), boundary tiles masked. A
gist tile's query range grows with T, so it is split into chunks of ~_CHUNK_TOKENS query rows: every program does
similar work, and the chunks meet in fp32 atomics (so gist dk/dv may differ in the last bits run to run). dtypes: bf16
and fp16 dots on tensor cores, fp32 inputs IEEE dots; softmax, lse, delta, dq_rot, dk_rot fp32; o and grads in the
input dtype. Autotune keys bucket N (next power of two), and lengths are not specialized, so any context length
reuses the tuned, compiled kernels.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels._util import INTERPRET, SMEM_LIMIT, check, launch, tl, triton, use_triton
from kernels.pyramid import _BIG, as_bn, focus_lists, lod_visibility, training_layout
from kernels.rope import _gauss_rope_launch, gauss_rope_ref, rope_freqs

__all__ = ["lod_attention", "lod_attention_ref", "lod_visibility"]


def lod_attention_ref(q, k, v, mu, sigma, start=None, end=None, lod=None, *, K=32, W0=None, W1=0, focus=None,
                      focus_block=128, rope_base=10000.0, scale=None):
    """Reference and CPU fallback: Gaussian RoPE, the mask of lod_visibility, SDPA in fp32. Any entry order."""
    B, N, H, D = q.shape
    mu, sigma = as_bn(mu, B, N, "mu"), as_bn(sigma, B, N, "sigma")
    qr = gauss_rope_ref(q.float(), mu, sigma, rope_base).transpose(1, 2)  # (B, H, N, D)
    kr = gauss_rope_ref(k.float(), mu, sigma, rope_base).transpose(1, 2)  # (B, Hk, N, D)
    vf = v.float().transpose(1, 2)
    if k.shape[2] != H:
        kr, vf = kr.repeat_interleave(H // k.shape[2], 1), vf.repeat_interleave(H // k.shape[2], 1)
    if W0 is None:
        o = F.scaled_dot_product_attention(qr, kr, vf, is_causal=True, scale=scale)
    else:
        mask = lod_visibility(start, end, lod, K=K, W0=W0, W1=W1, focus=focus, focus_block=focus_block, B=B)
        o = F.scaled_dot_product_attention(qr, kr, vf, attn_mask=mask[:, None].to(q.device), scale=scale)
    return o.transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _bands_tl(c, W0, W1, KB: tl.constexpr):
    b0 = tl.maximum((c - W0) // KB * KB, 0)  # truncating // is harmless: negatives clamp to 0 either way
    b1 = tl.maximum((b0 - W1 * KB) // (KB * KB) * (KB * KB), 0)
    return b0, b1


@triton.jit
def _vis(qi, cq, b0q, b1q, QL, kj, L, KB: tl.constexpr, CAUSAL: tl.constexpr):
    """Pyramid visibility of keys kj (indices in level L) for queries qi (level QL, cursors cq, bands b0q, b1q);
    operands broadcast ([BM, 1] x [1, BN] for a query tile, [1, BM] x [BN, 1] for a key tile). The level picks the
    query-side bounds first, so the tile-sized work is five compares: lo <= start, end <= hi, or the query itself."""
    if CAUSAL:
        m = kj <= qi
    else:
        span = tl.where(L == 0, 1, tl.where(L == 1, KB, KB * KB))
        s = kj * span
        lo = tl.where(L == 0, b0q, tl.where(L == 1, b1q, 0))  # LOD0 [b0, c), LOD1 [b1, b0), LOD2 [0, b1)
        hi = tl.where(L == 0, cq, tl.where(L == 1, b0q, b1q))
        m = ((lo <= s) & (s + span <= hi)) | ((kj == qi) & (QL == L))
    return m


@triton.jit
def _focus_hidden(FOC, fbase, NF, kk, L):
    """[BN] keys (level L) named in the focus list at FOC + fbase (NF (lod, index) pairs)."""
    hid = kk < 0
    for f in range(NF):
        hid = hid | ((tl.load(FOC + fbase + 2 * f) == L) & (kk == tl.load(FOC + fbase + 2 * f + 1)))
    return hid


@triton.jit
def _level(L, T, N1, N2, N, KB: tl.constexpr, CAUSAL: tl.constexpr):
    """(entries, sequence offset, token span) of level L's section; CAUSAL: one section of N entries."""
    if CAUSAL:
        n, off, span = N + 0 * L, 0 * L, 1 + 0 * L
    else:
        n = tl.where(L == 0, T, tl.where(L == 1, N1, N2))
        off = tl.where(L == 0, 0, tl.where(L == 1, T, T + N1))
        span = tl.where(L == 0, 1, tl.where(L == 1, KB, KB * KB))
    return n, off, span


@triton.jit
def _section(pid, T, N1, N2, NCH0, NCH1, NCH2, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """Program pid -> (level, tile in the level, chunk, chunks per tile); level L holds cdiv(n_L, BLOCK) * NCH_L."""
    if CAUSAL:
        L, tile, ch, nch = 0 * pid, pid, 0 * pid, 1 + 0 * pid
    else:
        u0 = tl.cdiv(T, BLOCK) * NCH0
        u1 = u0 + tl.cdiv(N1, BLOCK) * NCH1
        L = tl.where(pid < u0, 0, tl.where(pid < u1, 1, 2))
        nch = tl.where(L == 0, NCH0, tl.where(L == 1, NCH1, NCH2))
        u = pid - tl.where(L == 0, 0, tl.where(L == 1, u0, u1))
        tile, ch = u // nch, u % nch
    return L, tile, ch, nch


@triton.jit
def _stages(lo, ilo, ihi, hi, BLOCK: tl.constexpr):
    """Split [lo, hi) in tiles of BLOCK from lo: masked [lo, e1), full [e1, s2) (inside [ilo, ihi)), masked [s2, hi)."""
    ta = (tl.maximum(ilo, lo) - lo + BLOCK - 1) // BLOCK
    tb = tl.maximum(tl.minimum(ihi, hi) - lo, 0) // BLOCK
    return tl.where(tb > ta, lo + ta * BLOCK, hi), tl.where(tb > ta, lo + tb * BLOCK, hi)


@triton.jit
def _stage(stage: tl.constexpr, lo, e1, s2, hi):
    """[a, z) of stage 0 (masked head), 1 (unmasked interior) or 2 (masked tail) of _stages' split."""
    if stage == 0:
        a, z = lo, e1
    elif stage == 1:
        a, z = e1, s2
    else:
        a, z = s2, hi
    return a, z


@triton.jit
def _q_tile(st0, st1, st2, q, do, lse, delta, mask, krow, kok, hk, HK, KR, V, DK, DVA, qk_scale, sm_scale,
            MASKED: tl.constexpr, BWD: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """One key tile (rows krow..) for a query tile. fwd: online softmax into (acc, m, l). BWD: dq into st0, and with
    ATOMIC the tile's dk_rot, dv (focus-shown token keys) added to DK, DVA."""
    # an int64 scalar base and int32 tile offsets: 64-bit arithmetic per element would cost registers in every stage
    kofs = (krow * HK + hk) * D + (tl.arange(0, BLOCK_N)[:, None] * HK * D + tl.arange(0, D)[None, :])
    if MASKED:
        k = tl.load(KR + kofs, mask=kok[:, None], other=0.0).to(q.dtype)
        v = tl.load(V + kofs, mask=kok[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(KR + kofs).to(q.dtype)
        v = tl.load(V + kofs).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    if BWD:
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(mask, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
        st0 += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        if ATOMIC:
            dkt = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC) * sm_scale
            tl.atomic_add(DK + kofs, dkt, mask=kok[:, None])
            tl.atomic_add(DVA + kofs, tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC), mask=kok[:, None])
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
    return st0, st1, st2


_NOSPEC = ["N", "T", "N1", "N2", "H", "HK", "W0", "W1", "NF", "FB", "NQB", "NB"]  # lengths: no recompiles per value


@triton.jit(do_not_specialize=_NOSPEC)
def _lod_attn_fwd_kernel(
    Q, KR, V,  # [B, N, H, D] rotated q; [B, N, HK, D] rotated k, v; contiguous, one float dtype
    FOC,  # [B, NQB, NF, 2] int32 focus lists (deduplicated), or a dummy
    O, LSE,  # [B, N, H, D] in q.dtype; [B, N, H] fp32 log2-domain logsumexp (fwd: written; BWD: read)
    DO, DELTA, DQ,  # BWD: [B, N, H, D] upstream grad; [B, N, H] fp32 rowsum(dO*O), written; [B, N, H, D] fp32 dq_rot
    DK, DVA,  # BWD with focus: [B, N, HK, D] fp32, zeroed: dk_rot and dv of focus-shown token keys (atomics)
    N, T, N1, N2,  # entries, tokens, LOD1 gists, LOD2 gists (training layout; CAUSAL: one section of N)
    H, HK, W0, W1,  # heads, kv heads; windows (tokens; LOD1 blocks), clamped to < 2**30
    NF, FB, NQB,  # focus entries per list, focus_block (a multiple of BLOCK_M), lists per batch row
    NB,  # next power of two >= N: only read by the autotuner's key
    qk_scale, sm_scale,  # scale * log2(e); scale
    KB: tl.constexpr, CAUSAL: tl.constexpr, HAS_FOCUS: tl.constexpr, BWD: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)
    bN = b.to(tl.int64) * N  # row offsets pass 2**31 at long N
    QL, qt, _, _ = _section(pid, T, N1, N2, 1, 1, 1, BLOCK_M, CAUSAL)
    nq, qoff, qspan = _level(QL, T, N1, N2, N, KB, CAUSAL)
    qk = qt * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices within level QL
    qok = qk < nq
    q_last = tl.minimum(qt * BLOCK_M + BLOCK_M, nq) - 1
    cq = qk * qspan
    b0q, b1q = _bands_tl(cq, W0, W1, KB)
    b0f, b1f = _bands_tl(qt * BLOCK_M * qspan, W0, W1, KB)  # cursors grow along the tile: first and last bound it
    b0l, b1l = _bands_tl(q_last * qspan, W0, W1, KB)
    rows = bN + qoff + qk
    qofs = (rows * H + h)[:, None] * D + tl.arange(0, D)[None, :]
    q = tl.load(Q + qofs, mask=qok[:, None], other=0.0)
    if not LOWP:
        q = q.to(tl.float32)
    fbase = ((b * NQB + (qt * BLOCK_M) // FB) * NF * 2).to(tl.int64)
    if BWD:
        do = tl.load(DO + qofs, mask=qok[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * tl.load(O + qofs, mask=qok[:, None], other=0.0).to(tl.float32), 1)
        tl.store(DELTA + rows * H + h, delta, mask=qok)
        lse = tl.load(LSE + rows * H + h, mask=qok, other=0.0)
        do = do.to(q.dtype)
        st0 = tl.zeros([BLOCK_M, D], tl.float32)
        st1 = tl.zeros([BLOCK_M], tl.float32)
    else:
        do = q
        lse = tl.zeros([BLOCK_M], tl.float32)
        delta = lse
        st0 = tl.zeros([BLOCK_M, D], tl.float32)
        st1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    st2 = tl.zeros([BLOCK_M], tl.float32)
    for L in range(1 if CAUSAL else 3):
        nk, koff, _ = _level(L, T, N1, N2, N, KB, CAUSAL)
        if CAUSAL:  # entries [0, i]: keys before the tile's first query are seen by all of it
            lo, ilo, ihi, hi = 0 * L, 0 * L, qt * BLOCK_M + 0 * L, q_last + 1 + 0 * L
        else:  # tokens [b0, c) (+ itself), LOD1 blocks [b1, b0), LOD2 [0, b1); [ilo, ihi) is seen by every query
            lo = tl.where(L == 0, b0f, tl.where(L == 1, b1f // KB, 0))
            ilo = tl.where(L == 0, b0l, tl.where(L == 1, b1l // KB, 0))
            ihi = tl.where(L == 0, qt * BLOCK_M * qspan, tl.where(L == 1, b0f // KB, b1f // (KB * KB)))
            hi = tl.where(L == 0, q_last * qspan + (QL == 0).to(tl.int32),
                          tl.where(L == 1, b0l // KB, b1l // (KB * KB)))
            own = (QL == L) & (L > 0)  # gist queries also see themselves
            lo = tl.where(own, tl.minimum(lo, qt * BLOCK_M), lo)
            hi = tl.where(own, tl.maximum(hi, q_last + 1), hi)
            if HAS_FOCUS:  # listed gists are hidden per token tile: no unmasked interior
                ihi = tl.where((QL == 0) & (L > 0), ilo, ihi)
        hi = tl.minimum(hi, nk)
        e1, s2 = _stages(lo, ilo, ihi, hi, BLOCK_N)
        for stage in tl.static_range(3):
            a, z = _stage(stage, lo, e1, s2, hi)
            for start in range(a, z, BLOCK_N):
                kk = start + tl.arange(0, BLOCK_N)
                kok = kk < hi
                mask = kok[None, :]
                if stage != 1:
                    mask = mask & _vis(qk[:, None], cq[:, None], b0q[:, None], b1q[:, None], QL, kk[None, :], L,
                                       KB, CAUSAL)
                    if HAS_FOCUS:
                        mask = mask & ~(_focus_hidden(FOC, fbase, NF, kk, L)[None, :] & (L > 0) & (QL == 0))
                st0, st1, st2 = _q_tile(st0, st1, st2, q, do, lse, delta, mask, bN + koff + start, kok, hk, HK,
                                        KR, V, DK, DVA, qk_scale, sm_scale, stage != 1, BWD, False, PREC, D, BLOCK_N)
    if HAS_FOCUS:  # token tiles: tokens of each listed gist that the pyramid shows a query of the tile
        for f in range(tl.where(QL == 0, NF, 0)):
            fl = tl.load(FOC + fbase + 2 * f)
            fspan = tl.where(fl == 1, KB, KB * KB)
            fa = tl.load(FOC + fbase + 2 * f + 1) * fspan
            fe = fa + fspan
            gvis = tl.where(fl == 1, (b1q <= fa) & (fe <= b0q), fe <= b1q) & (fl > 0) & qok
            fhi = tl.where(tl.max(gvis.to(tl.int32), 0) > 0, tl.minimum(fe, T), fa)
            for start in range(fa, fhi, BLOCK_N):
                kk = start + tl.arange(0, BLOCK_N)
                kok = kk < fhi
                st0, st1, st2 = _q_tile(st0, st1, st2, q, do, lse, delta, gvis[:, None] & kok[None, :], bN + start,
                                        kok, hk, HK, KR, V, DK, DVA, qk_scale, sm_scale, True, BWD, BWD, PREC, D,
                                        BLOCK_N)
    if BWD:  # dq_rot = scale * ds @ k_rot; the RoPE adjoint turns it into dq
        tl.store(DQ + qofs, st0 * sm_scale, mask=qok[:, None])
    else:
        l_i = tl.where(st2 == 0.0, 1.0, st2)
        tl.store(O + qofs, (st0 / l_i[:, None]).to(O.dtype.element_ty), mask=qok[:, None])
        tl.store(LSE + rows * H + h, st1 + tl.math.log2(l_i), mask=qok)


@triton.jit
def _kv_tile(dk, dv, k, v, kk, q0, nq, qrow0, qspan, QL, L, h, H, Q, DO, LSE, DELTA, FOC, fbase, NF, W0, W1,
             qk_scale, KB: tl.constexpr, CAUSAL: tl.constexpr, HAS_FOCUS: tl.constexpr, MASKED: tl.constexpr,
             PREC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    """One query tile (level QL, indices q0..) for a key tile: dk_rot (unscaled) and dv. Scores are [BM, BN] (q @ k^T),
    not FA2's transposed [BN, BM]: k and v then stay in shared memory as the B operands instead of being held, and
    duplicated per warpgroup, in registers as A operands (no spills at 64-row key tiles, 30% fewer instructions)."""
    qk = q0 + tl.arange(0, BLOCK_M)
    qok = qk < nq
    row0 = (qrow0 + q0) * H + h  # int64 scalar; int32 offsets within the tile
    qofs = row0 * D + (tl.arange(0, BLOCK_M)[:, None] * H * D + tl.arange(0, D)[None, :])
    rofs = row0 + tl.arange(0, BLOCK_M) * H
    if MASKED:
        q = tl.load(Q + qofs, mask=qok[:, None], other=0.0).to(k.dtype)
        do = tl.load(DO + qofs, mask=qok[:, None], other=0.0).to(k.dtype)
        lse = tl.load(LSE + rofs, mask=qok, other=0.0)
        delta = tl.load(DELTA + rofs, mask=qok, other=0.0)
    else:
        q = tl.load(Q + qofs).to(k.dtype)
        do = tl.load(DO + qofs).to(k.dtype)
        lse = tl.load(LSE + rofs)
        delta = tl.load(DELTA + rofs)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])  # [BM, BN]
    if MASKED:
        cq = qk * qspan
        b0q, b1q = _bands_tl(cq, W0, W1, KB)
        m = _vis(qk[:, None], cq[:, None], b0q[:, None], b1q[:, None], QL, kk[None, :], L, KB, CAUSAL) & qok[:, None]
        if HAS_FOCUS:
            m = m & ~(_focus_hidden(FOC, fbase, NF, kk, L)[None, :] & (L > 0) & (QL == 0))
        p = tl.where(m, p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=PREC) - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit(do_not_specialize=_NOSPEC + ["NCH0", "NCH1", "NCH2"])
def _lod_attn_dkdv_kernel(
    Q, KR, V, FOC,  # as in _lod_attn_fwd_kernel
    DO, LSE, DELTA,  # [B, N, H, D] upstream grad; [B, N, H] fp32 x2 (forward; dq kernel)
    DK, DV, DVA,  # [B, N, HK, D]: fp32 dk_rot; dv in v.dtype; fp32 dv of split levels and focus rows (atomics)
    N, T, N1, N2, H, HK, W0, W1, NF, FB, NQB, NB, qk_scale, sm_scale,  # as in _lod_attn_fwd_kernel
    NCH0, NCH1, NCH2,  # programs per key tile of each level (chunks of its query range); > 1: atomics, zeroed rows
    KB: tl.constexpr, CAUSAL: tl.constexpr, HAS_FOCUS: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    bN = b.to(tl.int64) * N
    L, kt, ch, nch = _section(pid, T, N1, N2, NCH0, NCH1, NCH2, BLOCK_N, CAUSAL)
    nk, koff, kspan = _level(L, T, N1, N2, N, KB, CAUSAL)
    kk = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    kok = kk < nk
    k_first = kt * BLOCK_N
    k_last = tl.minimum(k_first + BLOCK_N, nk) - 1
    kofs = ((bN + koff + kk) * HK + hk)[:, None] * D + tl.arange(0, D)[None, :]
    k = tl.load(KR + kofs, mask=kok[:, None], other=0.0)
    v = tl.load(V + kofs, mask=kok[:, None], other=0.0)
    if not LOWP:
        k, v = k.to(tl.float32), v.to(tl.float32)
    # cursors that see some key of the tile, [cmin, cmax), and every key, [fmin, fmax): the bands inverted
    # (b0(c) <= x <=> c < W0 + (x // K + 1) K;  b0(c) >= x > 0 <=> c >= W0 + x for x a multiple of K)
    s_a = k_first * kspan
    s_b = k_last * kspan
    KK2: tl.constexpr = KB * KB
    w01 = W0 + W1 * KB
    cmin = tl.where(L == 0, s_a + 1, tl.where(L == 1, W0 + s_a + KB, w01 + s_a + KK2))
    fmin = tl.where(L == 0, s_b + 1, tl.where(L == 1, W0 + s_b + KB, w01 + s_b + KK2))
    cmax = tl.where(L == 0, W0 + (s_b // KB + 1) * KB, tl.where(L == 1, w01 + (s_b // KK2 + 1) * KK2, 1 << 30))
    fmax = tl.where(L == 0, W0 + (s_a // KB + 1) * KB, tl.where(L == 1, w01 + (s_a // KK2 + 1) * KK2, 1 << 30))
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for QL in range(1 if CAUSAL else 3):
        nq, qoff, qspan = _level(QL, T, N1, N2, N, KB, CAUSAL)
        if CAUSAL:
            qlo, ilo, ihi, qhi = k_first + 0 * QL, k_last + 0 * QL, N + 0 * QL, N + 0 * QL
        else:
            qlo = (cmin + qspan - 1) // qspan
            qhi = (cmax + qspan - 1) // qspan
            ilo = (fmin + qspan - 1) // qspan
            ihi = (fmax + qspan - 1) // qspan
            qlo = tl.where(L == QL, tl.minimum(qlo, k_first), qlo)  # the keys' own queries (self)
            qhi = tl.where(L == QL, tl.maximum(qhi, k_last + 1), qhi)
            if HAS_FOCUS:
                ihi = tl.where((QL == 0) & (L > 0), ilo, ihi)
        qhi = tl.minimum(qhi, nq)
        qlo = qlo // BLOCK_M * BLOCK_M  # tiles aligned like the forward's (one focus list per tile)
        e1, s2 = _stages(qlo, ilo, ihi, qhi, BLOCK_M)
        for stage in tl.static_range(3):
            a, z = _stage(stage, qlo, e1, s2, qhi)
            a += ((ch - ((a - qlo) // BLOCK_M) % nch + nch) % nch) * BLOCK_M  # this chunk's tiles: index = ch mod nch
            for g in range(H // HK):
                for q0 in range(a, z, nch * BLOCK_M):
                    fbase = ((b * NQB + q0 // FB) * NF * 2).to(tl.int64)
                    dk, dv = _kv_tile(dk, dv, k, v, kk, q0, nq, bN + qoff, qspan, QL, L, hk * (H // HK) + g, H,
                                      Q, DO, LSE, DELTA, FOC, fbase, NF, W0, W1, qk_scale,
                                      KB, CAUSAL, HAS_FOCUS, stage != 1, PREC, D, BLOCK_M)
    dk *= sm_scale
    if nch > 1:
        tl.atomic_add(DK + kofs, dk, mask=kok[:, None])
        tl.atomic_add(DVA + kofs, dv, mask=kok[:, None])
    else:
        if HAS_FOCUS:  # the dq pass's focus-shown contributions
            dk += tl.load(DK + kofs, mask=kok[:, None], other=0.0)
            dv += tl.load(DVA + kofs, mask=kok[:, None], other=0.0)
        tl.store(DK + kofs, dk, mask=kok[:, None])
        tl.store(DV + kofs, dv.to(DV.dtype.element_ty), mask=kok[:, None])


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


def registers_ok(kernel, cfg, D):
    """16-bit configs that compile without spills, by fp32 elements per thread: fwd holds a [BM, D] accumulator and
    two [BM, BN] score tiles (<= 96, or 128 with 8 warps); dq its accumulator (<= 64) and scores (<= 32); dk/dv two
    [BN, D] accumulators and three [BM, BN] tiles per pipeline stage (<= 88). Fitted to sm_90 compiles at D = 64 and
    128 (bench/results/compile_sm90.md), which check every kept config."""
    bm, bn, threads = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], 32 * cfg.num_warps
    if kernel == "fwd":
        return bm * (D + 2 * bn) // threads <= (128 if cfg.num_warps == 8 else 96)
    if kernel == "dkdv":
        return (2 * bn * D + 3 * bm * bn * cfg.num_stages) // threads <= 88
    return bm * D // threads <= 64 and bm * bn // threads <= 32


def _prune(kernel):
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}  # the autotuner passes positional arguments in named_args, keywords in kwargs
        D, elt = a["D"], a["Q"].element_size()
        keep = [c for c in configs if a["FB"] % c.kwargs["BLOCK_M"] == 0  # one focus list per query tile
                and smem_bytes(kernel, c, D, elt) <= SMEM_LIMIT
                and (registers_ok(kernel, c, D) if elt == 2  # fp32: IEEE dots on FMAs; small tiles, short compiles
                     else c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048)]
        return keep or configs[-1:]
    return prune


def _cfgs(*tiles):
    return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s) for bm, bn, w, s in tiles]


CONFIGS = dict(  # (BLOCK_M, BLOCK_N, warps, stages), pruned per shape by _prune; the last one fits every shape
    fwd=_cfgs((128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)),
    dq=_cfgs((128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (32, 32, 4, 2)),
    dkdv=_cfgs((32, 64, 8, 2), (16, 64, 8, 2), (32, 64, 8, 1), (32, 32, 4, 1)),
)
_KEY = ["NB", "H", "HK", "D", "KB", "CAUSAL", "HAS_FOCUS", "LOWP"]  # NB buckets the length; dtypes join the key
_TUNED = dict(
    fwd=triton.autotune(CONFIGS["fwd"], key=_KEY + ["BWD"], prune_configs_by=dict(early_config_prune=_prune("fwd")))(
        _lod_attn_fwd_kernel),
    dq=triton.autotune(CONFIGS["dq"], key=_KEY + ["BWD"], prune_configs_by=dict(early_config_prune=_prune("dq")),
                       restore_value=["DK", "DVA"])(_lod_attn_fwd_kernel),
    dkdv=triton.autotune(CONFIGS["dkdv"], key=_KEY, prune_configs_by=dict(early_config_prune=_prune("dkdv")),
                         restore_value=["DK", "DVA"])(_lod_attn_dkdv_kernel),
)
DEFAULT_CFG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)  # interpreter: small tiles keep masked work cheap
_CHUNK_TOKENS = 1024  # query rows per dk/dv program, at least: a gist key tile's range is split into chunks of this


def _chunks(m):
    """dk/dv programs per key tile of each level: query rows a tile's keys are seen from, over one chunk."""
    if m.causal:
        return 1, 1, 1
    unit = max(min(m.W0, m.T) + m.K, _CHUNK_TOKENS)  # >= a LOD0 tile's range: LOD0 tiles stay one program
    r1 = m.T if m.W1 is None else min(m.W1 * m.K + m.K * m.K, m.T)
    return 1, max(1, r1 // unit), max(1, m.T // unit) if m.W1 is not None else 1


def _grid(m, B, heads, key, nch=(1, 1, 1)):
    if m.causal:
        return lambda META: (triton.cdiv(m.T, META[key]), B * heads)
    return lambda META: (sum(triton.cdiv(n, META[key]) * c for n, c in zip((m.T, m.N1, m.N2), nch)), B * heads)


def _scalars(q, k, m, foc):
    B, N, H, D = q.shape
    nf, nqb = (foc.shape[2], foc.shape[1]) if foc is not None else (0, 1)
    w0 = 0 if m.causal else min(m.W0, m.T + m.K)  # clamps keep the int32 band arithmetic far from overflow
    w1 = _BIG // m.K if (m.causal or m.W1 is None) else min(m.W1, m.T // m.K + 2)
    return (N, m.T, m.N1, m.N2, H, k.shape[2], w0, w1, nf, m.FB if foc is not None else 1 << 20, nqb,
            triton.next_power_of_2(N), m.scale * math.log2(math.e), m.scale)


def _consts(q, m, foc):
    return dict(KB=m.K, CAUSAL=m.causal, HAS_FOCUS=foc is not None, D=q.shape[3],
                LOWP=q.dtype != torch.float32 and not INTERPRET,  # interpreter: bf16 arithmetic is broken
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _lod_attn_fwd(qr, kr, v, foc, m):
    B, N, H, D = qr.shape
    o = torch.empty_like(qr)
    lse = torch.empty((B, N, H), device=qr.device, dtype=torch.float32)
    dummy = torch.zeros(1, device=qr.device, dtype=torch.float32)
    launch(_TUNED["fwd"], _grid(m, B, H, "BLOCK_M"), DEFAULT_CFG, qr, kr, v, foc if foc is not None else dummy,
           o, lse, dummy, dummy, dummy, dummy, dummy, *_scalars(qr, kr, m, foc), BWD=False, **_consts(qr, m, foc))
    return o, lse


def _lod_attn_bwd(qr, kr, v, foc, o, lse, do, m):
    """(dq_rot fp32, dk_rot fp32, dv in v.dtype); rows of split levels (and all rows with focus) go through atomics."""
    B, N, H, D = qr.shape
    do = do.contiguous()
    nch = _chunks(m)
    delta = torch.empty((B, N, H), device=qr.device, dtype=torch.float32)
    dqr = torch.empty(qr.shape, device=qr.device, dtype=torch.float32)
    dkr = torch.empty(kr.shape, device=kr.device, dtype=torch.float32)
    dva = torch.empty(v.shape, device=v.device, dtype=torch.float32)
    dv = torch.empty_like(v)
    ranges = [(0, m.T), (m.T, m.T + m.N1), (m.T + m.N1, N)]
    atomic = [r for r, c in zip(ranges, nch) if c > 1]
    for a, z in ranges if foc is not None else atomic:
        dkr[:, a:z].zero_()
        dva[:, a:z].zero_()
    args, consts = _scalars(qr, kr, m, foc), _consts(qr, m, foc)
    fo = foc if foc is not None else delta
    launch(_TUNED["dq"], _grid(m, B, H, "BLOCK_M"), DEFAULT_CFG, qr, kr, v, fo, o, lse, do, delta, dqr, dkr, dva,
           *args, BWD=True, **consts)
    launch(_TUNED["dkdv"], _grid(m, B, kr.shape[2], "BLOCK_N", nch), DEFAULT_CFG, qr, kr, v, fo, do, lse, delta,
           dkr, dv, dva, *args, *nch, **consts)
    for a, z in atomic:
        dv[:, a:z] = dva[:, a:z]
    return dqr, dkr, dv


class LodAttentionFn(torch.autograd.Function):
    """q, k, v -> o: RoPE pre-pass, Triton forward and backward, RoPE adjoint; mu, sigma, metadata are constants."""

    @staticmethod
    def forward(ctx, q, k, v, mu, sigma, foc, m, base):
        freqs = rope_freqs(q.shape[3], base, q.device)
        qr, kr = _gauss_rope_launch(q, k, mu, sigma, freqs, backward=False)
        o, lse = _lod_attn_fwd(qr, kr, v, foc, m)
        ctx.save_for_backward(qr, kr, v, mu, sigma, freqs, foc, o, lse)
        ctx.m = m
        return o

    @staticmethod
    def backward(ctx, do):
        qr, kr, v, mu, sigma, freqs, foc, o, lse = ctx.saved_tensors
        dqr, dkr, dv = _lod_attn_bwd(qr, kr, v, foc, o, lse, do, ctx.m)
        dq, dk = _gauss_rope_launch(dqr, dkr, mu, sigma, freqs, backward=True, dtypes=(qr.dtype, kr.dtype))
        return dq, dk, dv, None, None, None, None, None


def lod_attention(q, k, v, mu, sigma, start=None, end=None, lod=None, *, K=32, W0=None, W1=0, focus=None,
                  focus_block=128, rope_base=10000.0, scale=None):
    """Pyramidal attention with Gaussian RoPE (see the module docstring). Returns [B, N, H, D] in q.dtype.

    q: [B, N, H, D]; k, v: [B, N, Hk, D], H % Hk == 0; mu, sigma: [B, N] or [N] float (RoPE mean and spread, no
    grads); start, end, lod: [N] or [B, N] int (unused, may be None, when W0 is None); K: block size, a power of two;
    W0: LOD0 window in tokens (None: plain causal over entries); W1: LOD1 window in blocks (None: no LOD2 band);
    focus: [B, NQB, F, 2] or [NQB, F, 2] int (lod, index) per block of focus_block token positions, lod < 0 pads;
    scale: softmax scale, default 1/sqrt(D). Triton path: D a power of two in [32, 256], the training layout when W0
    is given, focus_block a multiple of 32; otherwise ValueError (lod_attention_ref takes any layout). Metadata on
    the host, or on the GPU in make_gists' layout, costs no host sync (kernels/pyramid.py).
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
    mu, sigma = as_bn(mu, B, N, "mu"), as_bn(sigma, B, N, "sigma")
    if W0 is not None:
        check(start is not None and end is not None and lod is not None, "lod_attention: W0 needs start, end, lod")
        for x, n in ((start, "start"), (end, "end"), (lod, "lod")):
            check(not x.is_floating_point(), f"lod_attention: {n} must be an integer tensor, got {x.dtype}")
            as_bn(x, B, N, n)
    check(focus is None or W0 is not None, "lod_attention: focus lists need the pyramid (W0 is not None)")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not use_triton(q, k, v):
        return lod_attention_ref(q, k, v, mu, sigma, start, end, lod, K=K, W0=W0, W1=W1, focus=focus,
                                 focus_block=focus_block, rope_base=rope_base, scale=scale)
    check(32 <= D <= 256 and D & (D - 1) == 0,
          f"lod_attention (triton): D must be a power of two in [32, 256], got {D}")
    if N == 0:
        return torch.empty_like(q)
    if W0 is None:
        T, N1, N2, foc = N, 0, 0, None
    else:
        T, N1, N2 = training_layout(start, end, lod, B, N, K, W0, W1)
        foc = None if focus is None else focus_lists(focus, B, T, N1, N2, K, focus_block, q.device)
    m = _Meta(T, N1, N2, K, W0, W1, focus_block, scale, W0 is None)
    mu, sigma = mu.float().contiguous(), sigma.float().contiguous()
    return LodAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), mu, sigma, foc, m, float(rope_base))
