"""The pyramid's geometry (DESIGN §8.3): level bands, the visibility mask, and the metadata checks of the kernel path.

Query i, with cursor c = start_i, sees itself plus an exact tiling of the past [0, c) (floor division, clamped at 0):

    b0 = max(0, (c - W0) // K * K)    b1 = max(0, (b0 - W1*K) // K**2 * K**2)
    LOD0 keys in [b0, c)      LOD1 keys in [b1, b0)      LOD2 keys in [0, b1)     (a key is [start, end))

W0=None: plain causal attention over entries in sequence order. W1=None: no LOD2 band (b1 = 0). Focus lists (token
queries only) hide a listed gist that the pyramid shows and show its K**lod tokens instead.

`lod_visibility` builds the boolean mask for any entry order (the reference's mask and the tests' oracle check).
The Triton kernels need the training layout (all T tokens in order, then N1 LOD1 gists, then N2 LOD2 gists):
`training_layout` returns (T, N1, N2) from host arithmetic. Metadata on the host is checked there (ValueError);
metadata on a GPU in the canonical layout of make_gists (N1 = T//K, N2 = T//K**2) is checked on the device with
torch._assert_async, so the training path never waits for the device (CUDA-graph capturable); any other device
layout costs one host sync.
"""
import functools

import torch

from kernels._util import check

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

    With check_tiling, raise ValueError unless every query sees itself plus an exact tiling of [0, cursor).
    """
    N = start.shape[-1]
    B = B or (start.shape[0] if start.dim() == 2 else 1)
    if W0 is None:
        return torch.ones(N, N, dtype=torch.bool, device=start.device).tril()[None].expand(B, N, N)
    s, e, l = (as_bn(x, B, N, n).long() for x, n in ((start, "start"), (end, "end"), (lod, "lod")))
    check(bool(((l >= 0) & (l <= 2)).all()), "lod_attention: lod must be 0, 1 or 2")
    span = K ** l
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


@functools.lru_cache(maxsize=16)  # every layer of a forward asks for the same layout: build it once
def _canonical(T, n1, n2, K, device):
    """start, end, lod (N,) of the training layout with n1 LOD1 and n2 LOD2 gists."""
    i = torch.arange(T + n1 + n2, device=device)
    lod = (i >= T).long() + (i >= T + n1).long()
    start = torch.where(i < T, i, torch.where(i < T + n1, (i - T) * K, (i - T - n1) * K * K))
    return start, start + K ** lod, lod


def _complete_T(N, K):
    """T with T + T//K + T//K**2 == N (make_gists' counts), or None."""
    T = N * K * K // (K * K + K + 1)
    return next((t for t in range(max(0, T - 2), T + 3) if t + t // K + t // (K * K) == N), None)


def training_layout(start, end, lod, B, N, K, W0, W1, asynchronous=None):
    """(T, N1, N2) when the metadata is the training layout and tiles every query's past; else ValueError.
    asynchronous (default: metadata on a GPU): check make_gists' layout with torch._assert_async, no host sync."""
    s, e, l = (as_bn(x, B, N, n) for x, n in ((start, "start"), (end, "end"), (lod, "lod")))
    T = _complete_T(N, K) if (s.is_cuda if asynchronous is None else asynchronous) else None
    if T is not None:  # checked on the device, asynchronously: a mismatch is a device-side assert
        N1, N2 = T // K, T // (K * K)
        cs, ce, cl = _canonical(T, N1, N2, K, s.device)
        torch._assert_async(((s == cs) & (e == ce) & (l == cl)).all())
    else:
        s, e, l = (x.cpu().long() for x in (s, e, l))  # host metadata: free; device metadata: a sync
        check(bool((s == s[:1]).all() and (e == e[:1]).all() and (l == l[:1]).all()),
              "lod_attention (triton): metadata must be the same for every batch row")
        T, N1 = int((l[0] == 0).sum()), int((l[0] == 1).sum())
        N2 = N - T - N1
        ok = N1 * K <= T and N2 * K * K <= T and all(torch.equal(a[0], b) for a, b in
                                                     zip((s, e, l), _canonical(T, N1, N2, K, "cpu")))
        check(ok, "lod_attention (triton): metadata must be the training layout (tokens 0..T-1 in order, then LOD1 "
              "gists 0..N1-1, then LOD2 gists 0..N2-1, complete spans); use W0=None for a working context, or "
              "lod_attention_ref for any other order")
    b0, b1 = bands(max(T - 1, 0), K, W0, W1)  # the last token has the widest bands; they must lie inside the entries
    check(not ((b1 < b0 and b0 > N1 * K) or b1 > N2 * K * K), f"lod_attention (triton): the sequence lacks nodes "
          f"the pyramid needs (T={T}, N1={N1}, N2={N2}, K={K}, W0={W0}, W1={W1}): the past does not tile")
    return T, N1, N2


def focus_lists(focus, B, T, N1, N2, K, focus_block, device):
    """[B, NQB, F, 2] int32, (lod, index), duplicates and padding as (-1, 0); ValueError on bad nodes."""
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
    check(bool(((~real) | (((fl == 1) & (fi >= 0) & (fi < N1)) | ((fl == 2) & (fi >= 0) & (fi < N2)))).all()),
          f"lod_attention: focus nodes must be existing gists (lod 1 with index < {N1}, lod 2 with index < {N2}) "
          "or lod < 0 for padding")
    key = torch.where(real, fl * (1 << 40) + fi, -1).sort(dim=-1).values
    dup = torch.zeros_like(key, dtype=torch.bool)
    dup[..., 1:] = key[..., 1:] == key[..., :-1]
    keep = (key >= 0) & ~dup
    out = torch.stack([torch.where(keep, key >> 40, -1), torch.where(keep, key & ((1 << 40) - 1), 0)], -1)
    return out.to(device=device, dtype=torch.int32).contiguous()
