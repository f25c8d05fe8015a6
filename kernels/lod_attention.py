"""Pyramidal (LOD-aware) attention, "MegaAttention" (DESIGN §8.3), with Gaussian RoPE fused into the tile loads.

N entries: tokens (lod 0, span [p, p+1)), LOD1 gists (K tokens) and LOD2 gists (K*K tokens). Query i, with cursor
c = start_i, sees itself plus an exact tiling of the past [0, c) by the pyramid (floor division, clamped at 0):

    b0 = max(0, (c - W0) // K * K)    b1 = max(0, (b0 - W1*K) // K**2 * K**2)
    LOD0 keys in [b0, c)      LOD1 keys in [b1, b0)      LOD2 keys in [0, b1)     (a key is [start, end))

W0=None: plain causal attention over entries in sequence order (working contexts); metadata is then unused.
W1=None: no LOD2 band (b1 = 0). Focus lists (token queries only; gists keep their own pyramid): token query at
position p uses list p // focus_block of (lod, index) nodes; a listed gist that the pyramid shows to the query is
hidden and its K**lod tokens are shown instead. Gaussian RoPE (kernels/rope.py) rotates q and k by mu and damps band
j by exp(-0.5 (w_j sigma)^2); o = softmax(scale * rope(q) rope(k)^T + mask) v. mu, sigma are constants (no grads).

Layouts: q [B, N, H, D], k, v [B, N, Hk, D] (H % Hk == 0: GQA), mu, sigma [B, N] (or [N]) float, start, end, lod
[N] or [B, N] int, focus [B, NQB, F, 2] or [NQB, F, 2] int (lod, index), lod < 0 = padding. The reference takes any
entry order; the kernels need a canonical layout: W0=None (any metadata), or the training layout (all T tokens in
order, then the first N1 LOD1 gists in order, then the first N2 LOD2 gists), checked with a ValueError.
Grid: fwd and dq kernels: one program per (query tile of one level section, b*H), looping over the key ranges that
the pyramid gives the tile (ranges are arithmetic in the level indices, so the cost per query is ~W0 + W1 + T/K**2);
masks only on boundary tiles. dk/dv kernel: one program per (key tile of one level, b*Hk), looping over the query
ranges that see it (the inverse pyramid) and the H/Hk query heads. Focus-shown token keys are the only keys not found
by the inverse pyramid: the dq kernel adds their dk/dv with fp32 atomics. dtype policy: loads upcast to fp32, dots in
the input dtype on GPU (fp32 inputs: IEEE dots), output and grads in the input dtype, lse and delta fp32.
"""
import math

import torch
import torch.nn.functional as F

from kernels._util import INTERPRET, check, pick, tl, triton, use_triton
from kernels.rope import gauss_rope_ref, rope_freqs

_BIG = 1 << 30  # stands in for W0 / W1 = infinity in integer arithmetic


def _as_bn(x, B, N, name):
    check(x.dim() in (1, 2) and x.shape[-1] == N and (x.dim() == 1 or x.shape[0] in (1, B)),
          f"lod_attention: {name} must be [N] or [B, N] with N={N}, B={B}, got {tuple(x.shape)}")
    return x.expand(B, N) if x.dim() == 2 else x[None].expand(B, N)


def _bands(c, K, W0, W1):
    """b0, b1 of cursors c (torch ints); W1=None -> no LOD2 band."""
    b0 = ((c - W0).div(K, rounding_mode="floor") * K).clamp_min(0)
    if W1 is None:
        return b0, torch.zeros_like(b0)
    return b0, ((b0 - W1 * K).div(K * K, rounding_mode="floor") * K * K).clamp_min(0)


def lod_visibility(start, end, lod, *, K=32, W0=None, W1=0, focus=None, focus_block=128, B=None, check_tiling=True):
    """Boolean visibility mask [B, Nq=N, Nk=N] (True = query may attend to key), any entry order.

    With check_tiling, raise ValueError unless every query sees itself plus an exact tiling of [0, cursor).
    """
    N = start.shape[-1]
    B = B or (start.shape[0] if start.dim() == 2 else 1)
    if W0 is None:
        return torch.ones(N, N, dtype=torch.bool, device=start.device).tril()[None].expand(B, N, N)
    s, e, l = (_as_bn(x, B, N, n).long() for x, n in ((start, "start"), (end, "end"), (lod, "lod")))
    check(bool(((l >= 0) & (l <= 2)).all()), "lod_attention: lod must be 0, 1 or 2")
    span = K ** l
    check(bool(((e - s) == span).all() and (s % span == 0).all() and (s >= 0).all()),
          "lod_attention: every entry must span [k*K**lod, (k+1)*K**lod) (aligned, complete nodes)")
    b0, b1 = _bands(s, K, W0, W1)  # the query's cursor is its start
    sq, b0q, b1q = s[:, :, None], b0[:, :, None], b1[:, :, None]  # (B, N, 1) query side
    sk, ek, lk = s[:, None, :], e[:, None, :], l[:, None, :]  # (B, 1, N) key side
    vis = (((lk == 0) & (b0q <= sk) & (ek <= sq)) | ((lk == 1) & (b1q <= sk) & (ek <= b0q))
           | ((lk == 2) & (ek <= b1q)))
    if focus is not None:
        foc = focus.long()
        foc = foc[None].expand(B, *foc.shape) if foc.dim() == 3 else foc
        check(foc.dim() == 4 and foc.shape[0] == B and foc.shape[-1] == 2,
              f"lod_attention: focus must be [B, NQB, F, 2] or [NQB, F, 2], got {tuple(focus.shape)}")
        fl_all, fi_all = foc[..., 0], foc[..., 1]
        check(bool(((fl_all < 0) | (fl_all == 1) | (fl_all == 2)).all() and (fi_all >= 0).all()),
              "lod_attention: focus nodes must be (lod 1 or 2, index >= 0), or lod < 0 for padding")
        qb = s.div(focus_block, rounding_mode="floor")
        tokq = l == 0
        check(bool((qb[tokq] < foc.shape[1]).all()), f"lod_attention: focus has {foc.shape[1]} query blocks, "
              f"token positions need {int(qb[tokq].max()) + 1 if tokq.any() else 0} (focus_block={focus_block})")
        lists = torch.gather(foc, 1, qb.clamp_max(foc.shape[1] - 1)[:, :, None, None].expand(-1, -1, *foc.shape[2:]))
        hide = torch.zeros_like(vis)
        show = torch.zeros_like(vis)
        for f in range(foc.shape[2]):
            fl, fi = lists[:, :, f, 0], lists[:, :, f, 1]  # (B, N) per query
            fspan = K ** fl.clamp_min(1)
            fa, fe = fi * fspan, (fi + 1) * fspan
            gvis = tokq & (((fl == 1) & (b1 <= fa) & (fe <= b0)) | ((fl == 2) & (fe <= b1)))  # the gist was visible
            g, fa, fe, fl = gvis[:, :, None], fa[:, :, None], fe[:, :, None], fl[:, :, None]
            hide |= g & (lk == fl) & (sk == fa)
            show |= g & (lk == 0) & (fa <= sk) & (sk < fe)
        vis = (vis & ~hide) | show
    if check_tiling:  # disjoint by construction once nodes are unique, so exact iff the visible lengths sum to c
        key = (l * (1 << 40) + s).sort(dim=1).values
        check(bool((key[:, 1:] != key[:, :-1]).all()), "lod_attention: duplicate (lod, start) entries")
        covered = vis.float() @ (e - s).float()[:, :, None]  # exact in fp32 below 2**24 tokens
        bad = covered[..., 0] != s.float()
        if bad.any():
            i = bad.nonzero()[0].tolist()
            raise ValueError(f"lod_attention: metadata does not tile the past of query {i[1]} (batch {i[0]}, lod "
                             f"{int(l[i[0], i[1]])}, cursor {int(s[i[0], i[1]])}): visible keys cover "
                             f"{int(covered[i[0], i[1], 0])} tokens; missing gists or tokens?")
    return vis | torch.eye(N, dtype=torch.bool, device=vis.device)


def lod_attention_ref(q, k, v, mu, sigma, start=None, end=None, lod=None, *, K=32, W0=None, W1=0, focus=None,
                      focus_block=128, rope_base=10000.0, scale=None):
    """Reference and CPU fallback: Gaussian RoPE, the mask of lod_visibility, SDPA in fp32. Any entry order."""
    B, N, H, D = q.shape
    mu, sigma = _as_bn(mu, B, N, "mu"), _as_bn(sigma, B, N, "sigma")
    qr = gauss_rope_ref(q.float(), mu, sigma, rope_base).transpose(1, 2)  # (B, H, N, D)
    kr = gauss_rope_ref(k.float(), mu, sigma, rope_base).transpose(1, 2)  # (B, Hk, N, D)
    vf = v.float().transpose(1, 2)
    if k.shape[2] != H:
        kr, vf = kr.repeat_interleave(H // k.shape[2], 1), vf.repeat_interleave(H // k.shape[2], 1)
    if W0 is None:
        o = F.scaled_dot_product_attention(qr, kr, vf, is_causal=True, scale=scale)
    else:
        mask = lod_visibility(start, end, lod, K=K, W0=W0, W1=W1, focus=focus, focus_block=focus_block, B=B)
        o = F.scaled_dot_product_attention(qr, kr, vf, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rope(x1, x2, mu, sg, FRQ, HALF: tl.constexpr, INVERSE: tl.constexpr):
    """Gaussian RoPE of half-split rows x1, x2 [R, HALF]; INVERSE applies the transpose (for gradients)."""
    w = tl.load(FRQ + tl.arange(0, HALF))
    ang = mu[:, None] * w[None, :]
    sw = sg[:, None] * w[None, :]
    att = tl.exp(-0.5 * sw * sw)
    c = tl.cos(ang) * att
    s = tl.sin(ang) * att
    if INVERSE:
        return x1 * c + x2 * s, x2 * c - x1 * s
    return x1 * c - x2 * s, x1 * s + x2 * c


@triton.jit
def _load_rows(X, MU, SG, FRQ, rows, rmask, bN, h, NH, D: tl.constexpr, HALF: tl.constexpr):
    """Rows `rows` (sequence indices) of head h of X [B, N, NH, D], Gaussian-rotated, as fp32 halves + row offsets."""
    base = ((bN + rows) * NH + h) * D  # (R,) int64
    off = base[:, None] + tl.arange(0, HALF)[None, :]
    x1 = tl.load(X + off, mask=rmask[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(X + off + HALF, mask=rmask[:, None], other=0.0).to(tl.float32)
    mu = tl.load(MU + bN + rows, mask=rmask, other=0.0).to(tl.float32)
    sg = tl.load(SG + bN + rows, mask=rmask, other=0.0).to(tl.float32)
    x1, x2 = _rope(x1, x2, mu, sg, FRQ, HALF, False)
    return x1, x2, base


@triton.jit
def _bands_tl(c, W0, W1, KB: tl.constexpr):
    b0 = tl.maximum((c - W0) // KB * KB, 0)  # truncating // is harmless: negatives clamp to 0 either way
    b1 = tl.maximum((b0 - W1 * KB) // (KB * KB) * (KB * KB), 0)
    return b0, b1


@triton.jit
def _vis(qk, cq, b0q, b1q, QL, kk, L, KB: tl.constexpr, CAUSAL: tl.constexpr):
    """[BM, BN] pyramid visibility of keys kk (indices in level L) for queries qk (indices in level QL)."""
    if CAUSAL:
        return kk[None, :] <= qk[:, None]
    span = tl.where(L == 0, 1, tl.where(L == 1, KB, KB * KB))
    s = (kk * span)[None, :]
    e = s + span
    m0 = (b0q[:, None] <= s) & (e <= cq[:, None])
    m1 = (b1q[:, None] <= s) & (e <= b0q[:, None])
    m2 = e <= b1q[:, None]
    m = tl.where(L == 0, m0, tl.where(L == 1, m1, m2))
    return m | ((kk[None, :] == qk[:, None]) & (QL == L))


@triton.jit
def _focus_hidden(FOC, fbase, NF, kk, L):
    """[BN] keys (level L) named in the focus list at FOC + fbase (NF (lod, index) pairs)."""
    hid = kk < 0
    for f in range(NF):
        fl = tl.load(FOC + fbase + 2 * f)
        fi = tl.load(FOC + fbase + 2 * f + 1)
        hid = hid | ((fl == L) & (kk == fi))
    return hid


@triton.jit
def _section(pid, T, N1, N2, BLOCK: tl.constexpr, KB: tl.constexpr, CAUSAL: tl.constexpr, N):
    """Tile pid of the concatenated level sections -> (level, tile in level, level size, sequence offset, span)."""
    if CAUSAL:
        return pid * 0, pid, N, pid * 0, pid * 0 + 1
    t0 = tl.cdiv(T, BLOCK)
    t1 = tl.cdiv(N1, BLOCK)
    L = tl.where(pid < t0, 0, tl.where(pid < t0 + t1, 1, 2))
    tile = pid - tl.where(L == 0, 0, tl.where(L == 1, t0, t0 + t1))
    n = tl.where(L == 0, T, tl.where(L == 1, N1, N2))
    off = tl.where(L == 0, 0, tl.where(L == 1, T, T + N1))
    span = tl.where(L == 0, 1, tl.where(L == 1, KB, KB * KB))
    return L, tile, n, off, span


@triton.jit
def _q_tile(st0, st1, st2, q1, q2, do, lse, delta, qrow_ok, mask, kk, kok, koff, bN, hk, HK,
            KP, VP, MU, SG, FRQ, DKA, DVA, qk_scale, sm_scale,
            MASKED: tl.constexpr, BWD: tl.constexpr, ATOMIC: tl.constexpr, LOWP: tl.constexpr,
            PREC: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
    """One key tile for a query tile. fwd: online softmax into (acc, m, l). BWD: (dq1, dq2, _) (+ dk/dv atomics)."""
    k1, k2, koffs = _load_rows(KP, MU, SG, FRQ, koff + kk, kok, bN, hk, HK, D, HALF)
    vr = tl.load(VP + koffs[:, None] + tl.arange(0, D)[None, :], mask=kok[:, None], other=0.0)
    v = vr.to(tl.float32)
    if LOWP:  # tensor-core dots in the input dtype; softmax stays fp32
        s = tl.dot(q1.to(vr.dtype), tl.trans(k1.to(vr.dtype))) + tl.dot(q2.to(vr.dtype), tl.trans(k2.to(vr.dtype)))
    else:
        s = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
    if not BWD:
        s = s * qk_scale
        if MASKED:
            s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(st1, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(st1 - m_use)
        if LOWP:
            pv = tl.dot(p.to(vr.dtype), vr)
        else:
            pv = tl.dot(p, v, input_precision=PREC)
        return st0 * alpha[:, None] + pv, m_new, st2 * alpha + tl.sum(p, 1)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(mask, p, 0.0)
    if LOWP:
        dp = tl.dot(do.to(vr.dtype), tl.trans(vr))
        ds = (p * (dp - delta[:, None])).to(vr.dtype)
        st0 += tl.dot(ds, k1.to(vr.dtype))
        st1 += tl.dot(ds, k2.to(vr.dtype))
    else:
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        st0 += tl.dot(ds, k1, input_precision=PREC)
        st1 += tl.dot(ds, k2, input_precision=PREC)
    if ATOMIC:  # focus-shown token keys: dk (rotated frame, scaled) and dv accumulate in fp32
        ds32 = tl.where(qrow_ok[:, None], ds.to(tl.float32), 0.0)
        p = tl.where(qrow_ok[:, None], p, 0.0)
        dk1 = tl.dot(tl.trans(ds32), q1, input_precision=PREC) * sm_scale
        dk2 = tl.dot(tl.trans(ds32), q2, input_precision=PREC) * sm_scale
        dv = tl.dot(tl.trans(p), do, input_precision=PREC)
        hoff = koffs[:, None] + tl.arange(0, HALF)[None, :]
        tl.atomic_add(DKA + hoff, dk1, mask=kok[:, None])
        tl.atomic_add(DKA + hoff + HALF, dk2, mask=kok[:, None])
        tl.atomic_add(DVA + koffs[:, None] + tl.arange(0, D)[None, :], dv, mask=kok[:, None])
    return st0, st1, st2


@triton.jit
def _lod_attn_fwd_kernel(
    Q, KP, V,  # [B, N, H, D], [B, N, HK, D] x2, contiguous, one float dtype
    MU, SG,  # [B, N] fp32 RoPE mean and spread
    FRQ,  # [D/2] fp32 rope_freqs
    FOC,  # [B, NQB, NF, 2] int32 focus lists (deduplicated), or a dummy
    O, LSE,  # fwd out: [B, N, H, D] q.dtype; [B, N, H] fp32 log2-domain logsumexp. BWD in: o unused, lse read
    DO, DELTA, DQ,  # BWD: [B, N, H, D] upstream grad; [B, N, H] fp32 rowsum(dO*O); [B, N, H, D] q.dtype dq out
    DKA, DVA,  # BWD with focus: [B, N, HK, D] fp32 atomics for focus-shown token keys (zeroed)
    N, T, N1, N2,  # entries, tokens, LOD1 gists, LOD2 gists (training layout; CAUSAL: one section of N)
    H, HK, W0, W1,  # heads, kv heads; windows (tokens; LOD1 blocks), clamped to < 2**30
    NF, FB, NQB,  # focus entries per list, focus_block (multiple of BLOCK_M), lists per batch row
    qk_scale, sm_scale,  # scale * log2(e); scale
    KB: tl.constexpr, CAUSAL: tl.constexpr, HAS_FOCUS: tl.constexpr, BWD: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // HK)
    bN = b.to(tl.int64) * N  # row offsets pass 2**31 at long N
    QL, qt, nq, qoff, qspan = _section(pid, T, N1, N2, BLOCK_M, KB, CAUSAL, N)
    qk = qt * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices within level QL
    qok = qk < nq
    q_last = tl.minimum(qt * BLOCK_M + BLOCK_M, nq) - 1
    cq = qk * qspan
    b0q, b1q = _bands_tl(cq, W0, W1, KB)
    b0f, b1f = _bands_tl(qt * BLOCK_M * qspan, W0, W1, KB)  # cursors grow along the tile: first and last bound it
    b0l, b1l = _bands_tl(q_last * qspan, W0, W1, KB)
    q1, q2, qoffs = _load_rows(Q, MU, SG, FRQ, qoff + qk, qok, bN, h, H, D, HALF)
    fbase = ((b * NQB + (qt * BLOCK_M) // FB) * NF * 2).to(tl.int64)
    if BWD:
        do = tl.load(DO + qoffs[:, None] + tl.arange(0, D)[None, :], mask=qok[:, None], other=0.0).to(tl.float32)
        lse = tl.load(LSE + (bN + qoff + qk) * H + h, mask=qok, other=0.0)
        delta = tl.load(DELTA + (bN + qoff + qk) * H + h, mask=qok, other=0.0)
        st0 = tl.zeros([BLOCK_M, HALF], tl.float32)
        st1 = tl.zeros([BLOCK_M, HALF], tl.float32)
        st2 = tl.zeros([BLOCK_M], tl.float32)
    else:
        do = q1
        lse = cq.to(tl.float32)
        delta = lse
        st0 = tl.zeros([BLOCK_M, D], tl.float32)
        st1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        st2 = tl.zeros([BLOCK_M], tl.float32)
    for L in tl.static_range(1 if CAUSAL else 3):
        if CAUSAL:  # entries [0, i]: keys before the tile's first query are seen by all of it
            lo, ilo, ihi, hi, nk, koff = qt * 0, qt * 0, qt * BLOCK_M, q_last + 1, N, 0
        elif L == 0:  # tokens [b0, c) (+ itself)
            lo, ilo, ihi, hi, nk, koff = b0f, b0l, qt * BLOCK_M * qspan, q_last * qspan + (QL == 0), T, 0
        elif L == 1:  # LOD1 blocks [b1, b0) (+ itself)
            lo, ilo, ihi, hi, nk, koff = b1f // KB, b1l // KB, b0f // KB, b0l // KB, N1, T
        else:  # LOD2 [0, b1) (+ itself)
            lo, ilo, ihi, hi, nk, koff = qt * 0, qt * 0, b1f // (KB * KB), b1l // (KB * KB), N2, T + N1
        if not CAUSAL and L > 0:
            lo = tl.where(QL == L, tl.minimum(lo, qt * BLOCK_M), lo)
            hi = tl.where(QL == L, tl.maximum(hi, q_last + 1), hi)
            if HAS_FOCUS:  # listed gists are hidden per token tile: no unmasked interior
                ihi = tl.where(QL == 0, ilo, ihi)
        hi = tl.minimum(hi, nk)
        lo = tl.maximum(lo, 0)
        ilo = tl.maximum(ilo, lo)
        ihi = tl.minimum(ihi, hi)
        ta = (ilo - lo + BLOCK_N - 1) // BLOCK_N
        tb = tl.maximum(ihi - lo, 0) // BLOCK_N
        e1 = tl.where(tb > ta, lo + ta * BLOCK_N, hi)  # masked [lo, e1), full [e1, s2), masked [s2, hi)
        s2 = tl.where(tb > ta, lo + tb * BLOCK_N, hi)
        for stage in tl.static_range(3):
            if stage == 0:
                a, z = lo, e1
            elif stage == 1:
                a, z = e1, s2
            else:
                a, z = s2, hi
            for start in range(a, z, BLOCK_N):
                kk = start + tl.arange(0, BLOCK_N)
                kok = kk < hi
                if stage != 1:
                    lvl = qt * 0 + L  # a runtime level keeps _vis one code path for both kernels
                    mask = _vis(qk, cq, b0q, b1q, QL, kk, lvl, KB, CAUSAL) & kok[None, :]
                    if HAS_FOCUS and L > 0:
                        mask = mask & ~(_focus_hidden(FOC, fbase, NF, kk, lvl)[None, :] & (QL == 0))
                else:
                    mask = qok
                st0, st1, st2 = _q_tile(st0, st1, st2, q1, q2, do, lse, delta, qok, mask, kk, kok, koff, bN, hk, HK,
                                        KP, V, MU, SG, FRQ, DKA, DVA, qk_scale, sm_scale,
                                        stage != 1, BWD, False, LOWP, PREC, D, HALF)
    if HAS_FOCUS:  # token tiles: tokens of each listed gist that the pyramid shows a query of the tile
        nfl = tl.where(QL == 0, NF, 0)
        for f in range(nfl):
            fl = tl.load(FOC + fbase + 2 * f)
            fi = tl.load(FOC + fbase + 2 * f + 1)
            fspan = tl.where(fl == 1, KB, KB * KB)
            fa = fi * fspan
            fe = fa + fspan
            gvis = tl.where(fl == 1, (b1q <= fa) & (fe <= b0q), fe <= b1q) & (fl > 0) & qok
            fhi = tl.where(tl.max(gvis.to(tl.int32), 0) > 0, tl.minimum(fe, T), fa)
            for start in range(fa, fhi, BLOCK_N):
                kk = start + tl.arange(0, BLOCK_N)
                kok = kk < fhi
                mask = gvis[:, None] & kok[None, :]
                st0, st1, st2 = _q_tile(st0, st1, st2, q1, q2, do, lse, delta, qok, mask, kk, kok, 0, bN, hk, HK,
                                        KP, V, MU, SG, FRQ, DKA, DVA, qk_scale, sm_scale,
                                        True, BWD, BWD, LOWP, PREC, D, HALF)
    out_offs = qoffs[:, None] + tl.arange(0, D)[None, :]
    if BWD:  # dq = scale * R^T (ds @ k_rot), R the query's Gaussian rotation
        mu = tl.load(MU + bN + qoff + qk, mask=qok, other=0.0)
        sg = tl.load(SG + bN + qoff + qk, mask=qok, other=0.0)
        dq1, dq2 = _rope(st0 * sm_scale, st1 * sm_scale, mu, sg, FRQ, HALF, True)
        hoff = qoffs[:, None] + tl.arange(0, HALF)[None, :]
        tl.store(DQ + hoff, dq1.to(DQ.dtype.element_ty), mask=qok[:, None])
        tl.store(DQ + hoff + HALF, dq2.to(DQ.dtype.element_ty), mask=qok[:, None])
    else:
        l_i = tl.where(st2 == 0.0, 1.0, st2)
        tl.store(O + out_offs, (st0 / l_i[:, None]).to(O.dtype.element_ty), mask=qok[:, None])
        tl.store(LSE + (bN + qoff + qk) * H + h, st1 + tl.math.log2(l_i), mask=qok)


@triton.jit
def _lod_attn_bwd_dkdv_kernel(
    Q, KP, V, MU, SG, FRQ, FOC,  # as in _lod_attn_fwd_kernel
    DO, LSE, DELTA,  # [B, N, H, D] upstream grad; [B, N, H] fp32 x2 from forward / preprocess
    DK, DV,  # [B, N, HK, D] outputs in k.dtype / v.dtype
    DKA, DVA,  # [B, N, HK, D] fp32 focus contributions from the dq pass (read when HAS_FOCUS)
    N, T, N1, N2, H, HK, W0, W1, NF, FB, NQB, qk_scale, sm_scale,  # as in _lod_attn_fwd_kernel
    KB: tl.constexpr, CAUSAL: tl.constexpr, HAS_FOCUS: tl.constexpr,
    LOWP: tl.constexpr, PREC: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    pid = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HK
    hk = bhk % HK
    G = H // HK
    bN = b.to(tl.int64) * N
    L, kt, nk, koff, kspan = _section(pid, T, N1, N2, BLOCK_N, KB, CAUSAL, N)
    kk = kt * BLOCK_N + tl.arange(0, BLOCK_N)
    kok = kk < nk
    k_first = kt * BLOCK_N
    k_last = tl.minimum(k_first + BLOCK_N, nk) - 1
    k1, k2, koffs = _load_rows(KP, MU, SG, FRQ, koff + kk, kok, bN, hk, HK, D, HALF)
    vr = tl.load(V + koffs[:, None] + tl.arange(0, D)[None, :], mask=kok[:, None], other=0.0)
    v = vr.to(tl.float32)
    # cursors that see some key of the tile (inverse pyramid; b0(c) >= x > 0 <=> c >= W0 + ceil(x / K) * K)
    s_a = k_first * kspan
    s_b = k_last * kspan
    KK2 = KB * KB
    cmin = tl.where(L == 0, s_a + 1, tl.where(L == 1, W0 + s_a + KB, W0 + W1 * KB + s_a + KK2))
    cmax = tl.where(L == 0, W0 + (s_b + KB) // KB * KB,
                    tl.where(L == 1, W0 + W1 * KB + (s_b + KK2) // KK2 * KK2, T + 1))
    dk1 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dk2 = tl.zeros([BLOCK_N, HALF], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for QL in tl.static_range(1 if CAUSAL else 3):
        if CAUSAL:
            qlo, qhi, nq, qoff, qspan = k_first, N, N, 0, 1
        else:
            if QL == 0:
                qspan, nq, qoff = 1, T, 0
            elif QL == 1:
                qspan, nq, qoff = KB, N1, T
            else:
                qspan, nq, qoff = KK2, N2, T + N1
            qlo = (cmin + qspan - 1) // qspan
            qhi = (cmax + qspan - 1) // qspan
            qlo = tl.where(L == QL, tl.minimum(qlo, k_first), qlo)  # the gists themselves (self)
            qhi = tl.where(L == QL, tl.maximum(qhi, k_last + 1), qhi)
            qhi = tl.minimum(qhi, nq)
        qlo = qlo // BLOCK_M * BLOCK_M  # tiles aligned like the forward's (one focus list per tile)
        for g in range(G):
            h = hk * G + g
            for q0 in range(qlo, qhi, BLOCK_M):
                qk = q0 + tl.arange(0, BLOCK_M)
                qok = qk < nq
                q1, q2, qoffs = _load_rows(Q, MU, SG, FRQ, qoff + qk, qok, bN, h, H, D, HALF)
                do = tl.load(DO + qoffs[:, None] + tl.arange(0, D)[None, :], mask=qok[:, None], other=0.0)
                do = do.to(tl.float32)
                lse = tl.load(LSE + (bN + qoff + qk) * H + h, mask=qok, other=0.0)
                delta = tl.load(DELTA + (bN + qoff + qk) * H + h, mask=qok, other=0.0)
                cq = qk * qspan
                b0q, b1q = _bands_tl(cq, W0, W1, KB)
                mask = _vis(qk, cq, b0q, b1q, QL, kk, L, KB, CAUSAL) & kok[None, :] & qok[:, None]
                if HAS_FOCUS and QL == 0 and not CAUSAL:
                    fbase = ((b * NQB + q0 // FB) * NF * 2).to(tl.int64)
                    mask = mask & ~(_focus_hidden(FOC, fbase, NF, kk, L)[None, :] & (L > 0))
                if LOWP:
                    s = (tl.dot(q1.to(vr.dtype), tl.trans(k1.to(vr.dtype)))
                         + tl.dot(q2.to(vr.dtype), tl.trans(k2.to(vr.dtype))))
                else:
                    s = tl.dot(q1, tl.trans(k1), input_precision=PREC) + tl.dot(q2, tl.trans(k2), input_precision=PREC)
                p = tl.where(mask, tl.math.exp2(s * qk_scale - lse[:, None]), 0.0)
                if LOWP:
                    dv += tl.dot(tl.trans(p.to(vr.dtype)), do.to(vr.dtype))
                    dp = tl.dot(do.to(vr.dtype), tl.trans(vr))
                    dsT = tl.trans((p * (dp - delta[:, None])).to(vr.dtype))
                    dk1 += tl.dot(dsT, q1.to(vr.dtype))
                    dk2 += tl.dot(dsT, q2.to(vr.dtype))
                else:
                    dv += tl.dot(tl.trans(p), do, input_precision=PREC)
                    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                    dsT = tl.trans(p * (dp - delta[:, None]))
                    dk1 += tl.dot(dsT, q1, input_precision=PREC)
                    dk2 += tl.dot(dsT, q2, input_precision=PREC)
    dk1 *= sm_scale
    dk2 *= sm_scale
    dvo = koffs[:, None] + tl.arange(0, D)[None, :]
    hoff = koffs[:, None] + tl.arange(0, HALF)[None, :]
    if HAS_FOCUS:
        dk1 += tl.load(DKA + hoff, mask=kok[:, None], other=0.0)
        dk2 += tl.load(DKA + hoff + HALF, mask=kok[:, None], other=0.0)
        dv += tl.load(DVA + dvo, mask=kok[:, None], other=0.0)
    mu = tl.load(MU + bN + koff + kk, mask=kok, other=0.0)
    sg = tl.load(SG + bN + koff + kk, mask=kok, other=0.0)
    dk1, dk2 = _rope(dk1, dk2, mu, sg, FRQ, HALF, True)
    tl.store(DK + hoff, dk1.to(DK.dtype.element_ty), mask=kok[:, None])
    tl.store(DK + hoff + HALF, dk2.to(DK.dtype.element_ty), mask=kok[:, None])
    tl.store(DV + dvo, dv.to(DV.dtype.element_ty), mask=kok[:, None])


# ---------------------------------------------------------------------------------------------------------- launchers
def _prune(configs, named_args, **kwargs):  # a query tile must sit inside one focus block
    fb = named_args["FB"]
    return [c for c in configs if fb % c.kwargs["BLOCK_M"] == 0] or configs[-1:]


_CFGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
         for bm, bn, w, s in ((128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2))]
_KEY = ["N", "T", "H", "HK", "D", "KB", "CAUSAL", "HAS_FOCUS", "LOWP"]
_fwd_tuned = triton.autotune(configs=_CFGS, key=_KEY + ["BWD"], prune_configs_by=dict(early_config_prune=_prune),
                             reset_to_zero=["DKA", "DVA"])(_lod_attn_fwd_kernel)
_dkdv_tuned = triton.autotune(configs=_CFGS, key=_KEY, prune_configs_by=dict(early_config_prune=_prune))(
    _lod_attn_bwd_dkdv_kernel)
DEFAULT_CFG = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4)  # interpreter: small tiles keep masked work cheap


def _grid(B, H, causal, N, T, N1, N2, key):
    if causal:
        return lambda META: (triton.cdiv(N, META[key]), B * H)
    return lambda META: (triton.cdiv(T, META[key]) + triton.cdiv(N1, META[key]) + triton.cdiv(N2, META[key]), B * H)


def _args(q, k, meta, foc):
    T, N1, N2, K, W0, W1, FB, scale, causal = meta
    B, N, H, D = q.shape
    nf, nqb = (foc.shape[2], foc.shape[1]) if foc is not None else (0, 1)
    w0 = 0 if causal else min(W0, T + K)  # clamps keep the int32 band arithmetic far from overflow
    w1 = _BIG // K if (causal or W1 is None) else min(W1, T // K + 2)
    return (N, T, N1, N2, H, k.shape[2], w0, w1, nf, FB if foc is not None else 1 << 20, nqb,
            scale * math.log2(math.e), scale)


def _consts(q, meta, foc):
    lowp = q.dtype != torch.float32 and not INTERPRET  # interpreter: bf16 arithmetic is broken, dots stay fp32
    return dict(KB=meta[3], CAUSAL=meta[8], HAS_FOCUS=foc is not None, LOWP=lowp,
                PREC="ieee" if q.dtype == torch.float32 else "tf32", D=q.shape[3],
                **(DEFAULT_CFG if INTERPRET else {}))


def _lod_attn_fwd(q, k, v, mu, sigma, foc, meta, base):
    B, N, H, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, N, H), device=q.device, dtype=torch.float32)
    frq = rope_freqs(D, base, q.device)
    dummy = torch.zeros(1, device=q.device, dtype=torch.float32)
    grid = _grid(B, H, meta[8], N, *meta[:3], "BLOCK_M")
    pick(_fwd_tuned, _lod_attn_fwd_kernel)[grid](
        q, k, v, mu, sigma, frq, foc if foc is not None else dummy, o, lse, dummy, dummy, dummy, dummy, dummy,
        *_args(q, k, meta, foc), BWD=False, **_consts(q, meta, foc))
    return o, lse


def _lod_attn_bwd(q, k, v, mu, sigma, foc, o, lse, do, meta, base):
    B, N, H, D = q.shape
    Hk = k.shape[2]
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # (B, N, H) fp32: the FA2 preprocess, memory-bound, left to torch
    frq = rope_freqs(D, base, q.device)
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    if foc is not None:
        dka = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dva = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    else:
        dka = dva = torch.zeros(1, device=q.device, dtype=torch.float32)
    fo = foc if foc is not None else dka
    args, consts = _args(q, k, meta, foc), _consts(q, meta, foc)
    pick(_fwd_tuned, _lod_attn_fwd_kernel)[_grid(B, H, meta[8], N, *meta[:3], "BLOCK_M")](
        q, k, v, mu, sigma, frq, fo, o, lse, do, delta, dq, dka, dva, *args, BWD=True, **consts)
    pick(_dkdv_tuned, _lod_attn_bwd_dkdv_kernel)[_grid(B, Hk, meta[8], N, *meta[:3], "BLOCK_N")](
        q, k, v, mu, sigma, frq, fo, do, lse, delta, dk, dv, dka, dva, *args, **consts)
    return dq, dk, dv


class LodAttentionFn(torch.autograd.Function):
    """q, k, v -> o with Triton forward and backward; mu, sigma, metadata and focus are constants."""

    @staticmethod
    def forward(ctx, q, k, v, mu, sigma, foc, meta, base):
        o, lse = _lod_attn_fwd(q, k, v, mu, sigma, foc, meta, base)
        ctx.save_for_backward(q, k, v, mu, sigma, foc, o, lse)
        ctx.meta, ctx.base = meta, base
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, mu, sigma, foc, o, lse = ctx.saved_tensors
        dq, dk, dv = _lod_attn_bwd(q, k, v, mu, sigma, foc, o, lse, do, ctx.meta, ctx.base)
        return dq, dk, dv, None, None, None, None, None


def _training_layout(start, end, lod, B, N, K, W0, W1):
    """(T, N1, N2) when the metadata is the training layout and tiles every query's past; else ValueError."""
    s, e, l = (_as_bn(x, B, N, n).long() for x, n in ((start, "start"), (end, "end"), (lod, "lod")))
    check(bool((s == s[:1]).all() and (e == e[:1]).all() and (l == l[:1]).all()),
          "lod_attention (triton): metadata must be the same for every batch row")
    s, e, l = s[0], e[0], l[0]
    T, N1 = int((l == 0).sum()), int((l == 1).sum())
    N2 = N - T - N1
    i = torch.arange(N, device=s.device)
    cl = (i >= T).long() + (i >= T + N1).long()
    cs = torch.where(i < T, i, torch.where(i < T + N1, (i - T) * K, (i - T - N1) * K * K))
    ok = torch.equal(l, cl) and torch.equal(s, cs) and torch.equal(e, cs + K ** cl) and N1 * K <= T and N2 * K * K <= T
    check(ok, "lod_attention (triton): metadata must be the training layout (tokens 0..T-1 in order, then LOD1 "
          "gists 0..N1-1, then LOD2 gists 0..N2-1, complete spans); use W0=None for a working context, or "
          "lod_attention_ref for any other order")
    b0, b1 = _bands(s, K, W0, W1)  # each query's bands must lie inside the entries present
    need = ((b0 < s) & (s > T)) | ((b1 < b0) & (b0 > N1 * K)) | (b1 > N2 * K * K)
    check(not bool(need.any()), f"lod_attention (triton): the sequence lacks nodes the pyramid needs "
          f"(T={T}, N1={N1}, N2={N2}, K={K}, W0={W0}, W1={W1}): the past does not tile")
    return T, N1, N2


def _focus_lists(focus, B, T, N1, N2, K, focus_block, device):
    """[B, NQB, F, 2] int32, (lod, index), duplicates and padding as (-1, 0); ValueError on bad nodes."""
    foc = focus.long()
    foc = foc[None].expand(B, *foc.shape) if foc.dim() == 3 else foc
    check(foc.dim() == 4 and foc.shape[0] == B and foc.shape[-1] == 2,
          f"lod_attention: focus must be [B, NQB, F, 2] or [NQB, F, 2], got {tuple(focus.shape)}")
    check(foc.shape[1] >= triton.cdiv(T, focus_block), f"lod_attention: focus needs {triton.cdiv(T, focus_block)} "
          f"query blocks of {focus_block} tokens, got {foc.shape[1]}")
    check(focus_block % 32 == 0, f"lod_attention (triton): focus_block must be a multiple of 32, got {focus_block}")
    fl, fi = foc[..., 0], foc[..., 1]
    real = fl >= 0
    check(bool(((~real) | (((fl == 1) & (fi >= 0) & (fi < N1)) | ((fl == 2) & (fi >= 0) & (fi < N2)))).all()),
          f"lod_attention: focus nodes must be existing gists (lod 1 with index < {N1}, lod 2 with index < {N2}) "
          "or lod < 0 for padding")
    key = torch.where(real, fl * (1 << 40) + fi, -1).sort(dim=-1).values
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[..., 1:] = key[..., 1:] == key[..., :-1]
    keep = (key >= 0) & ~dup
    out = torch.stack([torch.where(keep, key >> 40, -1), torch.where(keep, key & ((1 << 40) - 1), 0)], -1)
    return out.to(device=device, dtype=torch.int32).contiguous()


def lod_attention(q, k, v, mu, sigma, start=None, end=None, lod=None, *, K=32, W0=None, W1=0, focus=None,
                  focus_block=128, rope_base=10000.0, scale=None):
    """Pyramidal attention with fused Gaussian RoPE (see the module docstring). Returns [B, N, H, D] in q.dtype.

    q: [B, N, H, D]; k, v: [B, N, Hk, D], H % Hk == 0; mu, sigma: [B, N] or [N] float (RoPE mean and spread, no
    grads); start, end, lod: [N] or [B, N] int (unused, may be None, when W0 is None); K: block size, a power of two;
    W0: LOD0 window in tokens (None: plain causal over entries); W1: LOD1 window in blocks (None: no LOD2 band);
    focus: [B, NQB, F, 2] or [NQB, F, 2] int (lod, index) per block of focus_block token positions, lod < 0 pads;
    scale: softmax scale, default 1/sqrt(D). Triton path: D a power of two in [32, 256], the training layout when W0
    is given, focus_block a multiple of 32; otherwise ValueError (lod_attention_ref takes any layout).
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
    mu, sigma = _as_bn(mu, B, N, "mu"), _as_bn(sigma, B, N, "sigma")
    if W0 is not None:
        check(start is not None and end is not None and lod is not None, "lod_attention: W0 needs start, end, lod")
        for x, n in ((start, "start"), (end, "end"), (lod, "lod")):
            check(not x.is_floating_point(), f"lod_attention: {n} must be an integer tensor, got {x.dtype}")
            _as_bn(x, B, N, n)
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
        T, N1, N2 = _training_layout(start, end, lod, B, N, K, W0, W1)
        foc = None if focus is None else _focus_lists(focus, B, T, N1, N2, K, focus_block, q.device)
    meta = (T, N1, N2, K, W0, W1, focus_block, scale, W0 is None)
    mu, sigma = mu.float().contiguous(), sigma.float().contiguous()
    return LodAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), mu, sigma, foc, meta, float(rope_base))
