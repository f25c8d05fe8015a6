"""Tilings of a history by tree nodes (DESIGN §2), as plain integer arithmetic: how many working-context entries a
history needs at the coarsest (the capacity of a budget) and where the levels of the recency pyramid start. Split
from megacontext.py by concept: the working context, the allocator and the session call these; nothing here knows
tensors or networks. Node (lod, k) covers tokens [k*K**lod, (k+1)*K**lod) (tree.py).

The coarsest legal tiling of a history of c tokens is the protected tail (recent tokens, raw) and, before it, the
largest aligned nodes: m = c - recent written in base K, digit l = its number of LOD l nodes. Its size is a digit
sum, about depth*(K-1), so a budget of tail + r*(K-1) + 1 entries holds at least K**r tokens once the depth can
grow.
"""


def pyramid_bounds(cursor: int, K: int, recent: int, budget: int) -> list[int]:
    """Level boundaries [b0, b1, .., b_{L-1}] (all > 0) of the finest recency pyramid of <= budget entries: LOD0
    covers [b0, cursor), LOD l covers [b_l, b_{l-1}), and the top level L = len(bounds) covers [0, b_{L-1}). b_l is a
    multiple of K**(l+1) (every node aligned); LOD0 holds w0 >= recent tokens and each coarser band about w0 - recent
    entries, so the pyramid is as deep as the history needs. Raises ValueError when even the coarsest tiling is over."""
    def bounds(w0):
        out, b, span = [], cursor - w0, K  # span: tokens per node of the band below the boundary
        while (b := b // span * span) > 0:
            out.append(b)
            b -= (w0 - recent) * span
            span *= K
        return out

    def count(w0):  # entries: each band's tokens over its node span
        edges = [cursor] + bounds(w0) + [0]
        return sum((edges[l] - edges[l + 1]) // K**l for l in range(len(edges) - 1))

    if count(recent) > budget:
        raise ValueError(f"a history of {cursor:,} tokens needs at least {count(recent)} entries (protected tail "
                         f"{recent} + the coarsest tiling) but the budget leaves {budget}; raise the budget or K")
    lo, hi = recent, max(recent, cursor)  # count() is non-decreasing in w0 (each token's level can only drop)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= budget else (lo, mid - 1)
    return bounds(lo)


def max_digit_sum(n: int, K: int) -> int:
    """The largest base-K digit sum of any integer in [0, n]: the most entries a coarsest tiling of [0, m), m <= n,
    needs (m's base-K digit l is its number of LOD l nodes)."""
    digits = []
    while n:
        n, r = divmod(n, K)
        digits.append(r)  # least significant first
    best = sum(digits)
    for i, d in enumerate(digits):  # or: digit i one lower, every digit below it K - 1
        if d:
            best = max(best, sum(digits[i + 1:]) + d - 1 + i * (K - 1))
    return best


def check_capacity(cursor: int, K: int, recent: int, budget: int):
    """ValueError unless every history of up to `cursor` tokens has a legal tiling within `budget` entries: the
    protected tail plus the coarsest tiling of the history before it, whose size (a digit sum, about depth*(K-1)) is
    not monotone in the history length, so the maximum over all shorter histories is checked. As the depth grows
    with the history, a budget of tail + r*(K-1) + 1 entries holds at least K**r tokens."""
    worst = cursor if cursor <= recent else recent + max_digit_sum(cursor - recent, K)
    if worst > budget:
        if budget < recent:
            longest = budget
        else:  # the smallest history whose coarsest tiling needs one entry more than the budget leaves, minus one
            q, r = divmod(budget - recent + 1, K - 1)
            longest = recent + (r + 1) * K**q - 2
        raise ValueError(f"a history of {cursor:,} tokens may need {worst} working-context entries (protected tail "
                         f"{recent} + coarsest tiling) but the budget leaves {budget}: this budget holds "
                         f"{longest:,} tokens at K={K}; raise the budget or K")


def zoom_entries(cursor: int, K: int, recent: int, spans: int = 1) -> int:
    """An upper bound on the entries a working context needs to hold `spans` spans of at most K tokens each anywhere
    in a history of `cursor` tokens at LOD0 (needles zoomed down level by level): the protected tail, the coarsest
    tiling of the rest, and K - 1 more per level of the path down from each tiling node that holds part of a span (two
    per span at most: a span that straddles a node boundary is zoomed on both sides). ~ tail + (1 + 2 spans) * depth
    * (K - 1)."""
    if cursor <= recent:
        return cursor
    m, depth = cursor - recent, 0
    while K ** (depth + 1) <= m:
        depth += 1
    return recent + max_digit_sum(m, K) + 2 * spans * (K - 1) * depth


def coarsest_runs(end: int, K: int, top: int) -> list[tuple[int, int, int]]:
    """The coarsest tiling of [0, end) by nodes of level <= top, oldest first, as runs (lod, first index, count)."""
    runs, a = [], 0
    for l in range(top, -1, -1):
        n = (end - a) // K**l
        if n:
            runs.append((l, a // K**l, n))
            a += n * K**l
    return runs
