"""The dk/dv pass of pyramidal attention (kernels/lod_attention.py has the rest): the inverse pyramid.

One program per (key tile, chunk, b*Hk) in _dkdv_section's order (LOD1 chunks, LOD0 tiles, LOD2 chunks: longest
first; heads fastest), looping over the query tiles of every level that see the key tile: for keys starting at s
(span K**L), the cursors c that see some key form [cmin, cmax) and those that see every key [fmin, fmax) (the bands
b0(c), b1(c) inverted), so interior query tiles run unmasked and only boundary tiles compute the mask. A gist tile's
query range grows with T: it is split into `nch` chunks (every nch-th query tile) that meet in fp32 atomics. The
epilogue un-rotates dk (dk = R^T dk_rot with the keys' own positions), so no RoPE adjoint pass follows.

Layouts and arguments as in lod_attention.py; QR is the rotated q that the forward's RoPE pre-pass wrote.
"""
from kernels._util import tl, triton
from kernels.pyramid import _bands_tl, _dkdv_section, _focus_hidden, _level, _stages, _vis
from kernels.rope import _rotate_rows

_NOSPEC = ["N", "T", "N1", "N2", "B", "H", "HK", "RH", "W0", "W1", "NF", "FB", "NQB", "NB"]  # no recompiles per value


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
def _kv_tile(dk, dv, k, v, kk, q0, nq, qrow0, qspan, QL, L, h, H, QR, DO, LSE, DELTA, FOC, fbase, NF, W0, W1,
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
        q = tl.load(QR + qofs, mask=qok[:, None], other=0.0).to(k.dtype)
        do = tl.load(DO + qofs, mask=qok[:, None], other=0.0).to(k.dtype)
        lse = tl.load(LSE + rofs, mask=qok, other=0.0)
        delta = tl.load(DELTA + rofs, mask=qok, other=0.0)
    else:
        q = tl.load(QR + qofs).to(k.dtype)
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


@triton.jit(do_not_specialize=_NOSPEC + ["NCH1", "NCH2", "R0"])
def _lod_attn_dkdv_kernel(
    QR, KR, V,  # rotated q, rotated k, v: as in _lod_attn_fwd_kernel
    MU, SIGMA, FREQ, FOC,  # as in _lod_attn_fwd_kernel
    DO, LSE, DELTA,  # [B, N, H, D] upstream grad; [B, N, H] fp32 x2 (forward; dq pass)
    DK, DV,  # [B, N, HK, D] in k's and v's dtypes (rows of split levels are written by the launcher)
    DKA, DVA,  # [B, N - R0, HK, D] fp32 from entry R0 on: split levels' dk, dv (atomics; zeroed) and, with focus, the
    # dq pass's contributions to token keys (rotated frame)
    N, T, N1, N2, B, H, HK, RH, W0, W1, NF, FB, NQB, NB, SMB, qk_scale, sm_scale,  # as in _lod_attn_fwd_kernel (RH:
    # rotated kv heads)
    NCH1, NCH2, R0,  # programs per LOD1 / LOD2 key tile (chunks of its query range; > 1: atomics); first DKA entry
    KB: tl.constexpr, CAUSAL: tl.constexpr, HAS_FOCUS: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    bhk = pid % (B * HK)  # heads fastest, work items longest first (_dkdv_section)
    b = bhk // HK
    hk = bhk % HK
    bN = b.to(tl.int64) * N
    L, kt, ch, nch = _dkdv_section(pid // (B * HK), T, N1, N2, NCH1, NCH2, BLOCK_N, CAUSAL)
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
                                      QR, DO, LSE, DELTA, FOC, fbase, NF, W0, W1, qk_scale,
                                      KB, CAUSAL, HAS_FOCUS, stage != 1, PREC, D, BLOCK_M)
    sofs = ((b.to(tl.int64) * (N - R0) + koff + kk - R0) * HK + hk)[:, None] * D + tl.arange(0, D)[None, :]
    dk = dk * sm_scale
    if HAS_FOCUS:  # the dq pass's contributions to unsplit rows (rotated frame)
        own = kok & (nch == 1)
        dk += tl.load(DKA + sofs, mask=own[:, None], other=0.0)
        dv += tl.load(DVA + sofs, mask=own[:, None], other=0.0)
    rot = (hk < RH).to(tl.float32)
    mu = tl.load(MU + b * SMB + koff + kk, mask=kok, other=0.0).to(tl.float32) * rot
    sg = tl.load(SIGMA + b * SMB + koff + kk, mask=kok, other=0.0).to(tl.float32) * rot
    dk = _rotate_rows(dk, mu, sg, FREQ, True)  # dk = R^T dk_rot
    if nch > 1:
        tl.atomic_add(DKA + sofs, dk, mask=kok[:, None])
        tl.atomic_add(DVA + sofs, dv, mask=kok[:, None])
    else:
        tl.store(DK + kofs, dk.to(DK.dtype.element_ty), mask=kok[:, None])
        tl.store(DV + kofs, dv.to(DV.dtype.element_ty), mask=kok[:, None])
