"""The pyramid's geometry (DESIGN §8.3): level bands, the visibility mask, the metadata checks of the kernel path, and
the same band and range arithmetic in Triton for the kernels (kernels/lod_attention.py).

Query i, with cursor c = start_i, sees itself plus an exact tiling of the past [0, c) (floor division, clamped at 0):

    b0 = max(0, (c - W0) // K * K)    b1 = max(0, (b0 - W1*K) // K**2 * K**2)
    LOD0 keys in [b0, c)      LOD1 keys in [b1, b0)      LOD2 keys in [0, b1)     (a key is [start, end))

W0=None: plain causal attention over entries in sequence order. W1=None: no LOD2 band (b1 = 0). Focus lists (token
queries only) hide a listed gist that the pyramid shows and show its K**lod tokens instead.

`lod_visibility` builds the boolean mask for any entry order (the reference's mask and the tests' oracle check).
The Triton kernels need the training layout (all T tokens in order, then N1 LOD1 gists, then N2 LOD2 gists):
`training_layout` returns (T, N1, N2). The layouts `layout_tensors` hands out (stages.py builds its metadata with it)
are recognised by their storage and cost nothing; other metadata on the host is checked there (ValueError), on a
GPU in make_gists' counts (N1 = T//K, N2 = T//K**2) with torch._assert_async (no host sync, CUDA-graph capturable);
any other device layout costs one host sync.
"""
import functools

import torch

from kernels._util import check, tl, triton

_BIG = 1 << 30  # stands in for W0 / W1 = infinity in the kernels' int32 arithmetic


def as_bn(x, B, N, name):
    check(x.dim() in (1, 2) and x.shape[-1] == N and (x.dim() == 1 or x.shape[0] in (1, B)),
          f"lod_attention: {name} must be [N] or [B, N] with N={N}, B={B}, got {tuple(x.shape)}")
    return x.expand(B, N) if x.dim() == 2 else x[None].expand(B, N)


def bands(c, K, W0, W1):
    """b0, b1 of cursors c (torch ints or Python ints); W1=None -> no LOD2 band."""
    if isinstance(c, int):
        b0 = max(0, (c - W0) // K * K)
        return b0, 0 if W1 is None else max(0, (b0 - W1 * K) // (K * K) * K * K)
    b0 = ((c - W0).div(K, rounding_mode="floor") * K).clamp_min(0)
    if W1 is None:
        return b0, torch.zeros_like(b0)
    return b0, ((b0 - W1 * K).div(K * K, rounding_mode="floor") * K * K).clamp_min(0)


def lod_visibility(start, end, lod, *, K=32, W0=None, W1=0, focus=None, focus_block=128, B=None, check_tiling=True):
    """Boolean visibility mask [B, Nq=N, Nk=N] (True = query may attend to key), any entry order.

    With check_tiling, raise ValueError unless every query sees itself plus an exact tiling of [0, cursor). Under
    torch.compile the data-dependent checks are skipped (they would break the graph); eager calls check.
    """
    checking = not torch.compiler.is_compiling()
    check_tiling = check_tiling and checking
    N = start.shape[-1]
    B = B or (start.shape[0] if start.dim() == 2 else 1)
    if W0 is None:
        return torch.ones(N, N, dtype=torch.bool, device=start.device).tril()[None].expand(B, N, N)
    s, e, l = (as_bn(x, B, N, n).long() for x, n in ((start, "start"), (end, "end"), (lod, "lod")))
    span = K ** l
    if checking:
        check(bool(((l >= 0) & (l <= 2)).all()), "lod_attention: lod must be 0, 1 or 2")
        check(bool(((e - s) == span).all() and (s % span == 0).all() and (s >= 0).all()),
              "lod_attention: every entry must span [k*K**lod, (k+1)*K**lod) (aligned, complete nodes)")
    b0, b1 = bands(s, K, W0, W1)  # the query's cursor is its start
    sq, b0q, b1q = s[:, :, None], b0[:, :, None], b1[:, :, None]  # (B, N, 1) query side
    sk, ek, lk = s[:, None, :], e[:, None, :], l[:, None, :]  # (B, 1, N) key side
    vis = (((lk == 0) & (b0q <= sk) & (ek <= sq)) | ((lk == 1) & (b1q <= sk) & (ek <= b0q))
           | ((lk == 2) & (ek <= b1q)))
    if focus is not None:
        foc = focus.long().to(s.device)
        foc = foc[None].expand(B, *foc.shape) if foc.dim() == 3 else foc
        check(foc.dim() == 4 and foc.shape[0] == B and foc.shape[-1] == 2,
              f"lod_attention: focus must be [B, NQB, F, 2] or [NQB, F, 2], got {tuple(focus.shape)}")
        fl_all, fi_all = foc[..., 0], foc[..., 1]
        qb = s.div(focus_block, rounding_mode="floor")
        tokq = l == 0
        if checking:
            check(bool(((fl_all < 0) | (fl_all == 1) | (fl_all == 2)).all() and (fi_all >= 0).all()),
                  "lod_attention: focus nodes must be (lod 1 or 2, index >= 0), or lod < 0 for padding")
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


@functools.lru_cache(maxsize=16)  # every layer of a forward asks for the same layout: build it once
def _canonical(T, n1, n2, K, device):
    """start, end, lod (N,) of the training layout with n1 LOD1 and n2 LOD2 gists."""
    i = torch.arange(T + n1 + n2, device=device)
    lod = (i >= T).long() + (i >= T + n1).long()
    start = torch.where(i < T, i, torch.where(i < T + n1, (i - T) * K, (i - T - n1) * K * K))
    return start, start + K ** lod, lod


_HANDED_OUT = {}  # (T, K, device) -> layout_tensors' tensors, kept alive, so their storages identify them
_KNOWN = {}  # (start, end, lod data_ptr) -> (T, N1, N2, K)


def layout_tensors(T: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """start, end, lod (N,) int64 of make_gists' training layout (N1 = T//K, N2 = T//K**2), built once per (T, K,
    device) and never freed: lod_attention recognises them by their storage and skips every metadata check."""
    key = (T, K, str(torch.device(device)))
    if key not in _HANDED_OUT:
        start, end, lod = (x.clone() for x in _canonical(T, T // K, T // (K * K), K, torch.device(device)))
        _HANDED_OUT[key] = (start, end, lod)
        _KNOWN[(start.data_ptr(), end.data_ptr(), lod.data_ptr())] = (T, T // K, T // (K * K), K)
    return _HANDED_OUT[key]


def _known(s, e, l, N, K):
    """(T, N1, N2) when s, e, l (views of) tensors handed out by layout_tensors for this K and N, else None."""
    hit = _KNOWN.get((s.data_ptr(), e.data_ptr(), l.data_ptr()))
    if hit is None or hit[3] != K or sum(hit[:3]) != N or any(x.stride(-1) != 1 for x in (s, e, l)):
        return None
    return hit[:3]


def _complete_T(N, K):
    """T with T + T//K + T//K**2 == N (make_gists' counts), or None."""
    T = N * K * K // (K * K + K + 1)
    return next((t for t in range(max(0, T - 2), T + 3) if t + t // K + t // (K * K) == N), None)


def training_layout(start, end, lod, B, N, K, W0, W1, asynchronous=None, validate=True):
    """(T, N1, N2) when the metadata is the training layout and tiles every query's past; else ValueError.
    layout_tensors' own tensors: no check at all. asynchronous (default: metadata on a GPU): check make_gists' layout
    with torch._assert_async, no host sync. validate=False: counts only (the backward of a checked forward)."""
    s, e, l = (as_bn(x, B, N, n) for x, n in ((start, "start"), (end, "end"), (lod, "lod")))
    known = _known(s, e, l, N, K)
    T = _complete_T(N, K) if (s.is_cuda if asynchronous is None else asynchronous) else None
    if known is not None:  # handed out by layout_tensors: nothing to check, no kernel launched
        T, N1, N2 = known
    elif T is not None:  # checked on the device, asynchronously: a mismatch is a device-side assert
        N1, N2 = T // K, T // (K * K)
        if validate:
            cs, ce, cl = _canonical(T, N1, N2, K, s.device)
            torch._assert_async(((s == cs) & (e == ce) & (l == cl)).all())
    else:
        s, e, l = (x.cpu().long() for x in (s, e, l))  # host metadata: free; device metadata: a sync
        T, N1 = int((l[0] == 0).sum()), int((l[0] == 1).sum())
        N2 = N - T - N1
        if validate:
            check(bool((s == s[:1]).all() and (e == e[:1]).all() and (l == l[:1]).all()),
                  "lod_attention (triton): metadata must be the same for every batch row")
            ok = N1 * K <= T and N2 * K * K <= T and all(torch.equal(a[0], b) for a, b in
                                                         zip((s, e, l), _canonical(T, N1, N2, K, "cpu")))
            check(ok, "lod_attention (triton): metadata must be the training layout (tokens 0..T-1 in order, then "
                  "LOD1 gists 0..N1-1, then LOD2 gists 0..N2-1, complete spans); use W0=None for a working context, "
                  "or lod_attention_ref for any other order")
    b0, b1 = bands(max(T - 1, 0), K, W0, W1)  # the last token has the widest bands; they must lie inside the entries
    check(not ((b1 < b0 and b0 > N1 * K) or b1 > N2 * K * K), f"lod_attention (triton): the sequence lacks nodes "
          f"the pyramid needs (T={T}, N1={N1}, N2={N2}, K={K}, W0={W0}, W1={W1}): the past does not tile")
    return T, N1, N2


def focus_lists(focus, B, T, N1, N2, K, focus_block, device, validate=True):
    """[B, NQB, F, 2] int32, (lod, index), duplicates and padding as (-1, 0); ValueError on bad nodes (validate)."""
    foc = focus.long()
    foc = foc[None].expand(B, *foc.shape) if foc.dim() == 3 else foc
    check(foc.dim() == 4 and foc.shape[0] == B and foc.shape[-1] == 2,
          f"lod_attention: focus must be [B, NQB, F, 2] or [NQB, F, 2], got {tuple(focus.shape)}")
    nqb = -(-T // focus_block)
    check(foc.shape[1] >= nqb, f"lod_attention: focus needs {nqb} query blocks of {focus_block} tokens, "
          f"got {foc.shape[1]}")
    check(focus_block % 32 == 0, f"lod_attention (triton): focus_block must be a multiple of 32, got {focus_block}")
    fl, fi = foc[..., 0], foc[..., 1]
    real = fl >= 0
    check(not validate or bool(((~real) | (((fl == 1) & (fi >= 0) & (fi < N1)) | ((fl == 2) & (fi >= 0) & (fi < N2))
                                          )).all()),
          f"lod_attention: focus nodes must be existing gists (lod 1 with index < {N1}, lod 2 with index < {N2}) "
          "or lod < 0 for padding")
    key = torch.where(real, fl * (1 << 40) + fi, -1).sort(dim=-1).values
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[..., 1:] = key[..., 1:] == key[..., :-1]
    keep = (key >= 0) & ~dup
    out = torch.stack([torch.where(keep, key >> 40, -1), torch.where(keep, key & ((1 << 40) - 1), 0)], -1)
    return out.to(device=device, dtype=torch.int32).contiguous()


# ------------------------------------------------------------------------------------------- the same, in Triton
@triton.jit
def _bands_tl(c, W0, W1, KB: tl.constexpr):
    b0 = tl.maximum((c - W0) // KB * KB, 0)  # truncating // is harmless: negatives clamp to 0 either way
    b1 = tl.maximum((b0 - W1 * KB) // (KB * KB) * (KB * KB), 0)
    return b0, b1


@triton.jit
def _vis(qi, cq, b0q, b1q, QL, kj, L, KB: tl.constexpr, CAUSAL: tl.constexpr):
    """Pyramid visibility of keys kj (indices in level L) for queries qi (level QL, cursors cq, bands b0q, b1q);
    operands broadcast ([BM, 1] x [1, BN] for a query tile, [1, BM] x [BN, 1] for a key tile). The level picks the
    query-side bounds first, so the tile-sized work is five compares: lo <= start, end <= hi, or the query itself
    (qi = -1: never; the forward adds a gist's own key separately)."""
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
def _stages(lo, ilo, ihi, hi, BLOCK: tl.constexpr):
    """Split [lo, hi) in tiles of BLOCK from lo: masked [lo, e1), full [e1, s2) (inside [ilo, ihi)), masked [s2, hi)."""
    ta = (tl.maximum(ilo, lo) - lo + BLOCK - 1) // BLOCK
    tb = tl.maximum(tl.minimum(ihi, hi) - lo, 0) // BLOCK
    return tl.where(tb > ta, lo + ta * BLOCK, hi), tl.where(tb > ta, lo + tb * BLOCK, hi)


@triton.jit
def _key_range(L: tl.constexpr, q0, q_last, T, N1, N2, W0, W1, KB: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_FOCUS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(section offset, lo, e1, s2, hi) of the level-L keys that token queries [q0, q_last] visit: tokens [b0, c]
    (itself included), LOD1 blocks [b1, b0), LOD2 [0, b1), with cursors growing along the tile, so the first and last
    query bound it; [e1, s2) is seen by every query of the tile (unmasked), [lo, e1) and [s2, hi) are masked. A gist
    whose cursor lies in the tile sees a subset of these ranges, and all of [e1, s2). CAUSAL: entries [0, q_last]."""
    z = 0 * q0  # int32 zero (tensor operands keep every branch's types alike)
    if CAUSAL:
        if L == 0:
            off, lo, ilo, ihi, hi = z, z, z, q0, q_last + 1
        else:
            off, lo, ilo, ihi, hi = z, z, z, z, z
    else:
        b0f, b1f = _bands_tl(q0, W0, W1, KB)
        b0l, b1l = _bands_tl(q_last, W0, W1, KB)
        if L == 0:
            off, lo, ilo, ihi, hi = z, b0f, b0l, q0, q_last + 1
        elif L == 1:
            off, lo, ilo, ihi, hi = z + T, b1f // KB, b1l // KB, b0f // KB, tl.minimum(b0l // KB, N1)
        else:
            off, lo, ilo, ihi, hi = z + T + N1, z, z, b1f // (KB * KB), tl.minimum(b1l // (KB * KB), N2)
        if HAS_FOCUS and L > 0:  # listed gists are hidden per token tile: no unmasked interior
            ihi = ilo
    e1, s2 = _stages(lo, ilo, ihi, hi, BLOCK_N)
    return off, lo, e1, s2, hi


@triton.jit
def _dkdv_section(w, T, N1, N2, NCH1, NCH2, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """dk/dv work item w -> (level, key tile, chunk, chunks per tile). Longest first: LOD1 chunks (their query range
    is the widest), then LOD0 tiles, then LOD2 chunks (kernels/schedule.py models this order)."""
    if CAUSAL:
        L, tile, ch, nch = 0 * w, w, 0 * w, 1 + 0 * w
    else:
        u1 = tl.cdiv(N1, BLOCK) * NCH1
        u0 = u1 + tl.cdiv(T, BLOCK)
        L = tl.where(w < u1, 1, tl.where(w < u0, 0, 2))
        nch = tl.where(L == 1, NCH1, tl.where(L == 0, 1, NCH2))
        u = w - tl.where(L == 1, 0, tl.where(L == 0, u1, u0))
        tile, ch = u // nch, u % nch
    return L, tile, ch, nch
