"""Schedule model of the pyramid kernels (kernels/lod_attention.py): the work of every program (CTA) in the order the
grid dispatches them, and the makespan of that order on a GPU, checkable without one.

Work unit: one inner-loop tile, a [BLOCK_M, BLOCK_N] block of (query, key) pairs with its two (fwd) or four (bwd)
matrix products. A program's cost is the tiles its loops visit (masked boundary tiles weighted by `masked`, the extra
mask arithmetic) plus `overhead` tiles for its prologue and epilogue (q load and rotation, stores). The ranges mirror
the kernels' arithmetic exactly (tests/test_schedule.py checks them against the visibility mask).

Dispatch: the hardware hands programs to SMs in linear grid order (x fastest) as slots free up, so the makespan is
greedy list scheduling onto `sms * ctas_per_sm` slots; busy = ideal / makespan with ideal = all work / all slots (the
share of slot-time doing work, what Nsight's "SM active cycles / elapsed cycles" approaches at one CTA per SM).

Kernels: "fwd_v1" is the forward of main a0f2966 (query tiles of each level section, grid (tiles, B*H), gist query
tiles whose cursors span BLOCK_M * K**lod tokens visit that whole LOD0 range); "fwd" is the forward now (token tiles
only, each also serving the <= BLOCK_M/K + BLOCK_M/K**2 gists whose cursors fall in it, longest tiles first, heads
fastest); "dkdv_v1" / "dkdv": the dk/dv pass before and now (same ranges; now heads fastest and the longest programs
first). The dq pass is the forward's grid (BWD=True) and has its schedule.
"""
import heapq
import math

import numpy as np

SMS = 132  # H100 SXM and H200: 132 SMs


def _bands(c, K, W0, W1):
    """b0, b1 of cursors c (numpy ints), as the kernels compute them; W1 None: no LOD2 band (b1 = 0)."""
    b0 = np.maximum((c - W0) // K * K, 0)
    if W1 is None:
        return b0, np.zeros_like(b0)
    return b0, np.maximum((b0 - W1 * K) // (K * K) * (K * K), 0)


def _tiles(lo, ilo, ihi, hi, block):
    """(visited, masked) tiles of the kernels' three-stage split of [lo, hi) (_stages): unmasked only inside
    [ilo, ihi), aligned to lo."""
    n = np.where(hi > lo, -(-(hi - lo) // block), 0)
    ta = np.maximum(-(-(np.maximum(ilo, lo) - lo) // block), 0)
    tb = np.maximum(np.minimum(ihi, hi) - lo, 0) // block
    inner = np.where(tb > ta, tb - ta, 0)
    return n, n - inner


def fwd_costs(T, K, W0, W1, BM, BN, kernel="fwd", masked=1.5, overhead=1.0):
    """Costs (tiles) of one (batch row, head)'s forward programs, in dispatch order within that row and head.

    "fwd_v1": a program per BM queries of one level; "fwd": a program per tile_tokens(BM, K) tokens (its gists ride
    along in the same BM rows), the last tile first."""
    w0 = min(W0, T + K)
    n = [T, T // K, T // (K * K)]
    costs = []
    for QL in range(3) if kernel == "fwd_v1" else range(1):
        span, step = K ** QL, BM if kernel == "fwd_v1" else tile_tokens(BM, K)
        first = np.arange(0, n[QL], step)
        if len(first) == 0:
            continue
        last = np.minimum(first + step, n[QL]) - 1
        b0f, b1f = _bands(first * span, K, w0, W1)
        b0l, b1l = _bands(last * span, K, w0, W1)
        visited = np.zeros(len(first))
        for L in range(3):
            lo = [b0f, b1f // K, np.zeros_like(b1f)][L]
            ilo = [b0l, b1l // K, np.zeros_like(b1l)][L]
            ihi = [first * span, b0f // K, b1f // (K * K)][L]
            hi = [last * span + (QL == 0), b0l // K, b1l // (K * K)][L]
            if QL == L and L > 0:  # v1's gist query tiles also see themselves
                lo, hi = np.minimum(lo, first), np.maximum(hi, last + 1)
            hi = np.minimum(hi, n[L])
            tiles, mask = _tiles(lo, ilo, ihi, hi, BN)
            visited += tiles - mask + masked * mask
        costs.append(visited + overhead)
    c = np.concatenate(costs)
    return c[::-1] if kernel == "fwd" else c  # fwd: longest (last) token tiles first


def tile_tokens(BM, K, causal=False, focus=False):
    """Tokens t of one forward tile of BM rows (the kernel's BMT): the other G = ceil(BM (K+1) / (K^2+K+1)) + 1 rows
    hold the gists whose cursors lie among the tokens, at most ceil(t/K) + ceil(t/K^2) < t (K+1)/K^2 + 2 <= G + 1;
    with focus lists half the rows, so that one list (a power-of-two block of tokens) serves the tile."""
    if causal:
        return BM
    if focus:
        return BM // 2
    return BM - ((BM * (K + 1) + K * K + K) // (K * K + K + 1) + 1)


def dkdv_costs(T, K, W0, W1, BM, BN, groups=1, chunk_tokens=1024, kernel="dkdv", masked=1.5, overhead=1.0):
    """Costs (query tiles x GQA groups) of one (batch row, kv head)'s dk/dv programs, in dispatch order."""
    w0 = min(W0, T + K)
    w1 = (1 << 30) // K if W1 is None else min(W1, T // K + 2)
    n = [T, T // K, T // (K * K)]
    unit = max(min(W0, T) + K, chunk_tokens)
    r1 = T if W1 is None else min(W1 * K + K * K, T)
    nch = [1, max(1, r1 // unit), max(1, T // unit) if W1 is not None else 1]
    K2, w01 = K * K, w0 + w1 * K
    per_level = []
    for L in range(3):
        span = K ** L
        kt = np.arange(-(-n[L] // BN))
        if len(kt) == 0:
            per_level.append(np.zeros(0))
            continue
        first = kt * BN
        last = np.minimum(first + BN, n[L]) - 1
        sa, sb = first * span, last * span
        cmin = [sa + 1, w0 + sa + K, w01 + sa + K2][L]
        fmin = [sb + 1, w0 + sb + K, w01 + sb + K2][L]
        big = np.full_like(sa, 1 << 30)
        cmax = [w0 + (sb // K + 1) * K, w01 + (sb // K2 + 1) * K2, big][L]
        fmax = [w0 + (sa // K + 1) * K, w01 + (sa // K2 + 1) * K2, big][L]
        tiles = np.zeros((len(kt), nch[L]))
        for QL in range(3):
            qspan = K ** QL
            qlo, qhi = -(-cmin // qspan), -(-cmax // qspan)
            ilo, ihi = -(-fmin // qspan), -(-fmax // qspan)
            if L == QL:
                qlo, qhi = np.minimum(qlo, first), np.maximum(qhi, last + 1)
            qhi = np.minimum(qhi, n[QL])
            qlo = qlo // BM * BM
            t, m = _tiles(qlo, ilo, ihi, qhi, BM)
            w = t - m + masked * m  # the chunks take every nch-th tile: share the weighted count
            for ch in range(nch[L]):
                share = np.maximum((t - ch + nch[L] - 1) // nch[L], 0)
                tiles[:, ch] += np.where(t > 0, w * share / np.maximum(t, 1), 0)
        per_level.append(tiles.reshape(-1) * groups + overhead)
    order = (0, 1, 2) if kernel == "dkdv_v1" else (1, 0, 2)  # now: LOD1 chunks (the longest), LOD0 tiles, LOD2 chunks
    return np.concatenate([per_level[L] for L in order])


def makespan(costs, rows, slots, heads_fastest):
    """(makespan, ideal) of `rows` (batch x heads) copies of one row's program costs, dispatched in grid order onto
    `slots` program slots, greedily (each program to the slot that frees first)."""
    order = np.repeat(costs, rows) if heads_fastest else np.tile(costs, rows)
    free = [0.0] * min(slots, len(order))
    heapq.heapify(free)
    end = 0.0
    for c in order:
        t = heapq.heappop(free) + float(c)
        end = max(end, t)
        heapq.heappush(free, t)
    return end, float(order.sum()) / slots


def ctas_per_sm(registers, warps, smem_bytes, sms_regs=65536, sms_smem=228 * 1024, max_warps=64):
    """Resident programs per SM (sm_90): registers are allocated per warp in units of 256, shared memory per block
    plus 1 KB the driver reserves."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_regs = sms_regs // (per_warp * warps) if registers else 32
    by_smem = sms_smem // (smem_bytes + 1024)
    return max(0, min(by_regs, by_smem, max_warps // warps, 32))


def busy(kernel, T, H, K=32, W0=1024, W1=256, BM=128, BN=64, ctas=1, B=1, groups=1, sms=SMS, **kw):
    """Busy fraction (ideal / makespan) of one pyramid kernel's grid, and the two times, in tile units."""
    if kernel.startswith("fwd"):
        costs = fwd_costs(T, K, W0, W1, BM, BN, kernel, **kw)
    else:
        costs = dkdv_costs(T, K, W0, W1, BM, BN, groups, kernel=kernel, **kw)
    span, ideal = makespan(costs, B * H, sms * ctas, heads_fastest=not kernel.endswith("_v1"))
    return ideal / span, span, ideal


def useful_pairs(T, K, W0, W1):
    """(query, key) pairs the pyramid's mask holds, per batch row and head: each query's visible keys (its tiling of
    the past) plus itself, over T tokens and their T//K LOD1 and T//K**2 LOD2 gists."""
    total = 0
    for L, n in enumerate((T, T // K, T // (K * K))):
        c = np.arange(n, dtype=np.int64) * K ** L  # cursors
        b0, b1 = _bands(c, K, W0, W1)
        total += int(((c - b0) + (b0 - b1) // K + b1 // (K * K) + 1).sum())
    return total
