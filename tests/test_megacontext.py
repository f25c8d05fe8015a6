"""megacontext.py: working-context invariants under random edits, the allocator (budget, anti-ping-pong, telemetry),
GistNet, LensNet, Gaussian positions, the streaming session (KV reuse == from scratch, save -> open -> continue),
bad input, and sample.py --mc end to end."""
import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_close

import kernels
from megacontext import (FocusAllocator, GistNet, InvariantError, LensNet, MegaContextConfig, MegaContextModel,
                         WorkingContext, check_capacity, level_sigma, preview_nodes, pyramid_bounds, recency_scores)
from model import GPT, GPTConfig
from session import Session
from tiling import coarsest_runs
from tree import TreeError, depth_of


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run on one thread


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=97, block_size=64, n_layer=2, n_head=3, n_embd=48), **kw})).eval()


def mc_config(**kw):
    base = dict(block_k=8, w_max=64, recent_tokens=12, gist_heads=3, lens_width=32, lens_heads=2, lens_tail=8)
    return MegaContextConfig(**{**base, **kw})


def mc_model(gpt=None, **kw):
    torch.manual_seed(1)
    return MegaContextModel(gpt or tiny_gpt(), mc_config(**kw)).eval()


# ----------------------------------------------------------------------------------------------------------------
# working context and allocator, no model: a seeded fuzzer


def legal_collapse(wc, i):
    """Independent oracle for collapse(i), written with Python lists."""
    K, lod, idx = wc.K, wc.lod.tolist(), wc.index.tolist()
    if not 0 <= i <= len(lod) - K:
        return False
    l, k = lod[i], idx[i]
    siblings = all(lod[i + j] == l and idx[i + j] == k + j for j in range(K))
    return siblings and k % K == 0 and (k // K + 1) * K ** (l + 1) <= max(0, wc.cursor - wc.recent)


def snapshot(wc):
    return [t.clone() for t in (wc.lod, wc.index, wc.born, wc.born_by)] + [wc.cursor]


def same(a, b):
    return all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b))


def fuzz_sequence(rng, K, depth, n_ops=8):
    """One random sequence of ingests, expands, collapses and allocator steps over a history of up to `depth` levels
    (cursor < K**(depth+1)); invariants after every edit."""
    R = rng.choice([0, 1, K - 1, K, 2 * K + 3])
    refocus = rng.choice([1, K // 2, K])
    levels = rng.randrange(2, depth + 2)  # budgets from the least valid to one that holds every level's digits
    w_max = R + levels * (K - 1) + 1 + refocus + rng.randrange(0, 3 * K)
    cfg = MegaContextConfig(block_k=K, w_max=w_max, recent_tokens=R, refocus_every=refocus,
                            max_edits=rng.randrange(0, 5), cooldown=rng.randrange(0, 3),
                            hysteresis=rng.choice([0.0, 0.1]), tau_collapse=rng.choice([0.5, 100.0])).validate()
    cursor = int(K ** rng.uniform(0, depth + 1))  # log-uniform: every depth up to `depth` is as likely
    try:
        check_capacity(cursor, K, R, cfg.target)
        wc = WorkingContext.pyramid(K, R, w_max, cursor, cfg.target)
    except ValueError:
        wc = WorkingContext(K, R, w_max)
    wc.check_invariants(cfg.target)
    alloc = FocusAllocator(cfg)
    for _ in range(n_ops):
        op, n = rng.random(), len(wc)
        if op < 0.25:  # ingest, making room with budget steps as Session.ingest does
            left = rng.randrange(1, 2 * K)
            try:
                check_capacity(wc.cursor + left, K, R, cfg.target)
            except ValueError:
                continue
            while left:
                if len(wc) >= w_max:
                    alloc.step(wc, torch.randn(len(wc)), budget_only=True)
                    assert len(wc) <= cfg.target
                take = min(left, w_max - len(wc))
                wc.append(take, alloc.steps)
                left -= take
                wc.check_invariants()
        elif op < 0.45 and n:  # expand a random entry: legal iff it is a gist
            i, before = rng.randrange(n), snapshot(wc)
            if wc.lod[i] > 0:
                wc.expand(i)
                assert len(wc) == n + K - 1
            else:
                with pytest.raises(ValueError):
                    wc.expand(i)
                assert same(before, snapshot(wc))
            wc.check_invariants(budget=10**9)  # a manual expand may pass the budget; the allocator restores it
        elif op < 0.7 and n:  # collapse: a legal group half the time, a random index otherwise
            groups = wc.group_starts().tolist()
            i = rng.choice(groups) if groups and rng.random() < 0.5 else rng.randrange(-1, n + 1)
            legal, before = legal_collapse(wc, i), snapshot(wc)
            assert (i in groups) == legal
            if legal:
                wc.collapse(i)
                assert len(wc) == n - K + 1
            else:
                with pytest.raises(ValueError):
                    wc.collapse(i)
                assert same(before, snapshot(wc))
            wc.check_invariants(budget=10**9)
        else:  # an allocator step with random (sometimes heavy-tailed) scores
            scores = torch.randn(n) * rng.choice([0.05, 1.0, 10.0])
            alloc.step(wc, scores)
            wc.check_invariants(cfg.target)


@pytest.mark.parametrize("K", [2, 4, 8, 32])
def test_wc_fuzz_invariants(K):
    """2,500 random sequences per K (10,000 over the four) over histories of depth 0..8: no edit or allocator step
    breaks an invariant; every illegal edit raises and leaves the working context unchanged."""
    rng = random.Random(K)
    for _ in range(2500):
        fuzz_sequence(rng, K, depth=8)


@pytest.mark.slow
@pytest.mark.parametrize("K", [2, 4, 8, 16, 32, 64])
def test_wc_fuzz_invariants_long(K):
    """The same fuzzer, 20,000 more sequences per K (another seed), depths up to 8 (10 for K = 2)."""
    rng = random.Random(1000 + K)
    for _ in range(20000):
        fuzz_sequence(rng, K, depth=10 if K == 2 else 8)


def test_wc_invariant_checker_catches_each_breakage():
    K = 4
    broken = {
        "tiling: gap at entry": lambda w: w.index.__setitem__(-1, w.index[-1] + 1),
        "tiling: overlap at entry": lambda w: w.index.__setitem__(-2, w.index[-2] - 1),
        "tiling: entry 0 starts at token": lambda w: w._splice(0, 1, [], [], [], []),
        "the cursor is": lambda w: setattr(w, "cursor", w.cursor + 1),
        r"alignment: levels must be in 0..3 \(the depth of 100 tokens\)": lambda w: w.lod.__setitem__(0, 4),
        "budget: 28 entries > 27": lambda w: None,
        "protected tail: entry": lambda w: setattr(w, "recent", 40),
    }
    for message, breakage in broken.items():
        w = WorkingContext.pyramid(K, 4, 40, 100, 30)  # LOD2 [0, 48), LOD1 [48, 84), LOD0 [84, 100): 28 entries
        w.check_invariants(budget=28)
        breakage(w)
        with pytest.raises(InvariantError, match=message):
            w.check_invariants(budget=27 if message.startswith("budget") else None)


def test_wc_illegal_edits_raise_with_reason():
    K = 4
    wc = WorkingContext.pyramid(K, 4, 40, 100, 30)  # LOD2 [0, 48), LOD1 [48, 84), LOD0 [84, 100)
    lod = wc.lod.tolist()
    with pytest.raises(ValueError, match="LOD0 token and has no finer level"):
        wc.expand(len(wc) - 1)
    with pytest.raises(ValueError, match="not the K siblings"):
        wc.collapse(0)  # three LOD2 gists and a LOD1 gist
    with pytest.raises(ValueError, match="no entry"):
        wc.expand(len(wc))
    with pytest.raises(ValueError, match="not the K siblings"):
        wc.collapse(lod.index(0) - 2)  # two LOD1 gists and two tokens
    with pytest.raises(ValueError, match="not the K siblings"):
        wc.collapse(lod.index(1) + 1)  # four LOD1 gists, but not the children of one parent
    wc.expand(0)  # LOD2 node 0 -> 4 LOD1 nodes: collapsible again
    wc.collapse(0)
    tail = WorkingContext(K, 8, 40)
    tail.append(12)  # the newest 8 tokens, 4..11, are protected
    with pytest.raises(ValueError, match=r"protected tail \(tokens >= 4 stay LOD0\)"):
        tail.collapse(4)
    tail.collapse(0)


def test_wc_top_level_never_collapses():
    """The tree's top level holds fewer than K nodes, so no sibling group of it exists in any working context: at the
    coarsest tiling of 100 tokens (K=4: LOD3 node 0, LOD2 nodes 4 and 5, then the tail) nothing can collapse."""
    K = 4
    wc = WorkingContext.pyramid(K, 4, 40, 100, 7)
    assert wc.lod.tolist() == [3, 2, 2, 0, 0, 0, 0] and wc.index[:3].tolist() == [0, 4, 5]
    assert wc.group_starts().numel() == 0 and not wc.legal_directions()[1].any()
    for i in range(3):  # the gists: never K siblings (the tail's tokens are protected as well)
        with pytest.raises(ValueError, match="not the K siblings"):
            wc.collapse(i)
    wc.expand(0)  # LOD3 node 0 -> LOD2 nodes 0..3, which can collapse back
    assert wc.group_starts().tolist() == [0]
    wc.collapse(0)
    wc.check_invariants()


def test_wc_pyramid_is_monotone_and_fits():
    rng = random.Random(0)
    for _ in range(300):
        K = rng.choice([2, 4, 8, 32])
        R, cursor = rng.randrange(0, 3 * K), int(K ** rng.uniform(0, 9))
        budget = R + rng.randrange(2, 10) * (K - 1) + 1 + rng.randrange(0, 400)
        try:
            check_capacity(cursor, K, R, budget)
        except ValueError:
            continue
        wc = WorkingContext.pyramid(K, R, budget, cursor, budget)
        wc.check_invariants()
        assert bool((wc.lod[1:] <= wc.lod[:-1]).all()), "older entries must be at least as coarse"
        bounds = pyramid_bounds(cursor, K, R, budget)
        assert int(wc.lod.max()) == len(bounds) <= depth_of(cursor, K)
        assert all(b % K ** (l + 1) == 0 for l, b in enumerate(bounds)) and bounds == sorted(bounds, reverse=True)
        assert not bounds or (cursor - bounds[0] >= min(R, cursor) and bounds[-1] > 0)
        # the finest that fits: one more LOD0 token moves each boundary by at most one node of its level (K-1 more
        # entries each, and maybe a new level), so less than that is left
        assert not bounds or len(wc) > budget - (len(bounds) + 2) * (K - 1), f"{len(wc)} of {budget}, {bounds}"


def test_capacity_is_exact_for_every_history():
    """check_capacity accepts a history iff every history up to it has a coarsest tiling (the tail, then the greedy
    largest aligned nodes) within the budget, and the longest it names is the last it accepts; the cold-start pyramid
    exists exactly down to the coarsest tiling's size."""
    for K in (2, 4, 8):
        for recent in (0, 5):
            need = [min(recent, c) + sum(n for _, _, n in coarsest_runs(max(0, c - recent), K, 64)) for c in range(700)]
            for budget in range(recent, recent + 3 * (K - 1) + 2):
                for c in range(700):
                    fits = max(need[:c + 1]) <= budget
                    try:
                        check_capacity(c, K, recent, budget)
                        assert fits, (K, recent, budget, c)
                    except ValueError as e:
                        assert not fits, (K, recent, budget, c)
                        assert f"holds {c - 1:,} tokens" in str(e)  # the first refused history, minus one
                        break
            for c in range(0, 700, 7):
                assert len(WorkingContext.pyramid(K, recent, 10**6, c, need[c])) == need[c]
                with pytest.raises(ValueError, match="needs at least"):
                    WorkingContext.pyramid(K, recent, 10**6, c, need[c] - 1)


def test_allocator_budget_error_when_no_legal_collapse():
    cfg = MegaContextConfig(block_k=4, w_max=40, recent_tokens=4, refocus_every=4)
    wc = WorkingContext(4, 36, 40)  # its own tail protects everything
    wc.append(40)
    with pytest.raises(ValueError, match="cannot meet the budget legally"):
        FocusAllocator(cfg).step(wc, torch.zeros(40))


def full_pyramid(K=4, R=4, w_max=48, cursor=200, refocus=4, **kw):
    """A working context at (not below) its target, so any expansion needs a paired collapse."""
    kw = {"tau_expand": 0.0, **kw}  # any positive score may expand: these tests drive the mechanics by hand
    cfg = MegaContextConfig(block_k=K, w_max=w_max, recent_tokens=R, refocus_every=refocus, **kw).validate()
    wc = WorkingContext.pyramid(K, R, w_max, cursor, cfg.target)
    assert cfg.target - len(wc) < K - 1
    return cfg, wc


def test_allocator_pairs_expansion_with_collapse_and_reports_telemetry():
    cfg, wc = full_pyramid(max_edits=2, tau_collapse=100.0)
    K, n = wc.K, len(wc)
    alloc = FocusAllocator(cfg)
    for _ in range(3):
        assert alloc.step(wc, torch.zeros(n))["edits"] == 0  # nothing scores: nothing moves
    e = int((wc.lod == 1).nonzero()[-1])  # the newest LOD1 gist
    g = int(wc.group_starts()[0])  # the oldest legal group
    scores = torch.zeros(n)
    scores[e], scores[g:g + K] = 1.0, -1.0
    node = (int(wc.lod[e]), int(wc.index[e]))
    t = alloc.step(wc, scores)
    assert (t["expands"], t["collapses"], t["forced"], t["edits"]) == (1, 1, 0, 2)
    assert t["entries"] == n and t["utilisation"] == n / cfg.w_max
    assert t["swap_rate"] == pytest.approx((K + 1) / n)
    assert t["residency"] == 3.0  # every removed entry had kept its level for the 3 idle steps
    assert node not in set(zip(wc.lod.tolist(), wc.index.tolist()))
    s = alloc.summary()
    assert s["steps"] == 4 and s["expands"] == 1 and s["collapses"] == 1 and s["residency"] == 3.0
    # the same pair with gain - loss below the margin is refused
    cfg2, wc2 = full_pyramid(max_edits=2, hysteresis=2.5, tau_collapse=100.0)
    assert FocusAllocator(cfg2).step(wc2, scores)["edits"] == 0


def run_adversary(cooldown, hysteresis, steps=40, noise=None, keep_since=None):
    """Scores that always favour undoing the previous step: the children of the last expansion score -5 (collapse
    them), the parent made by the last collapse scores +5 (expand it); otherwise one gist +1 and one group -1.
    Returns the list of (step, direction, node) edits."""
    cfg, wc = full_pyramid(max_edits=2, cooldown=cooldown, hysteresis=hysteresis, tau_collapse=100.0)
    K, alloc, edits = wc.K, FocusAllocator(cfg), []
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        if noise is not None:
            scores = (torch.rand(len(wc), generator=gen) * 2 - 1) * noise
        else:
            scores = torch.zeros(len(wc))
            fresh = wc.born == step - 1
            scores[fresh & (wc.born_by == 1)] = -5.0
            scores[fresh & (wc.born_by == -1)] = 5.0
            if not fresh.any():  # the newest gist (once collapses reach LOD3, the LOD1 gists may all be expanded)
                scores[int((wc.lod > 0).nonzero()[-1])] = 1.0
                g = int(wc.group_starts()[0])
                scores[g:g + K] = -1.0
        before = set(zip(wc.lod.tolist(), wc.index.tolist()))
        alloc.step(wc, scores, keep_since=keep_since)
        wc.check_invariants(cfg.target)
        after = set(zip(wc.lod.tolist(), wc.index.tolist()))
        edits += [(step, "expand", node) for node in before - after if node[0] > 0 and
                  all((node[0] - 1, node[1] * K + j) in after for j in range(K))]
        edits += [(step, "collapse", node) for node in after - before if node[0] > 0 and
                  all((node[0] - 1, node[1] * K + j) in before for j in range(K))]
    return edits


def reversals(edits, window):
    """Edits of a node in the opposite direction within `window` steps of the previous edit of that node."""
    last, out = {}, 0
    for step, kind, node in edits:
        if node in last and last[node][1] != kind and step - last[node][0] <= window:
            out += 1
        last[node] = (step, kind)
    return out


def test_allocator_cooldown_and_hysteresis_stop_ping_pong():
    free = run_adversary(cooldown=0, hysteresis=0.0)
    assert reversals(free, window=1) >= 10, "the adversary must make an unprotected allocator ping-pong"
    guarded = run_adversary(cooldown=3, hysteresis=0.0)
    assert reversals(guarded, window=3) == 0 and len(guarded) > 0
    # near-tied noisy scores: gain - loss <= 2 * 0.04 < 0.1, so hysteresis allows no pair at all
    assert len(run_adversary(cooldown=0, hysteresis=0.0, noise=0.04)) > 10
    assert run_adversary(cooldown=0, hysteresis=0.1, noise=0.04) == []
    # keep_since (a question's refocus-until-stable loop): no edit since that step is ever undone, at any distance
    kept = run_adversary(cooldown=0, hysteresis=0.0, keep_since=0)
    assert reversals(kept, window=40) == 0 and len(kept) > 0


def test_recency_policy_converges_to_pyramid():
    cfg = MegaContextConfig(block_k=4, w_max=60, recent_tokens=6, refocus_every=4, tau_collapse=100.0)
    wc = WorkingContext(4, 6, 60)
    wc.append(40)
    alloc = FocusAllocator(cfg)
    for _ in range(800):  # decode: a token at a time, an allocator step every 4 (LOD3 is born at 64 tokens)
        wc.append(1, alloc.steps)
        if wc.cursor % 4 == 0:
            alloc.step(wc, recency_scores(wc, cfg.target))
        wc.check_invariants()
    assert bool((wc.lod[1:] <= wc.lod[:-1]).all()) and (wc.lod == 3).any() and (wc.lod == 1).any()
    assert len(wc) >= cfg.target - 3 * (4 - 1)  # the budget is used, not wasted
    pyramid = WorkingContext.pyramid(4, 6, 60, wc.cursor, cfg.target)
    assert torch.equal(wc.lod, pyramid.lod) and torch.equal(wc.index, pyramid.index)  # it is the cold start's pyramid


# ----------------------------------------------------------------------------------------------------------------
# GistNet and LensNet


@pytest.mark.parametrize("pool", ["mean", "query", "cls"])
@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_gistnet_shape_scale_bidirectional(pool, proj):
    cfg = mc_config(gist_pool=pool, gist_proj=proj)
    net = GistNet(cfg, 48, emb_rms=0.37)
    x = torch.randn(5, 8, 48)
    for lod in (1, 2):
        g = net(lod, x)
        assert g.shape == (5, 48)
        # 1e-3: rms_norm's eps (1.2e-7) is felt when the pooled vector is small (a fresh cls entry has rms ~0.02)
        assert_close("gist rms", torch.full((5,), 0.37), g.pow(2).mean(-1).sqrt(), ratio=1e-3, atol=1e-3)
    # bidirectional: the last entry of a block changes the hidden state (and so the contribution) of the first
    level = net.level(1)
    x2 = x.clone()
    x2[:, -1] += 1.0
    first = 1 if pool == "cls" else 0
    h, h2 = level.hidden(x), level.hidden(x2)
    assert (h[:, first] - h2[:, first]).abs().max() > 1e-4
    assert not torch.allclose(net(1, x), net(1, x2))


def test_gistnet_query_pool_uses_gist_pool_and_starts_as_mean():
    net = GistNet(mc_config(gist_pool="query"), 48, emb_rms=1.0)
    level = net.level(1)
    x = torch.randn(3, 8, 48)
    h = level.hidden(x)

    def finish(y):
        y = level.proj(y) if isinstance(level.proj, torch.nn.Linear) else y + level.proj(y)
        return torch.nn.functional.rms_norm(y, (48,)) * level.gain

    assert_close("query=0 is mean pooling", finish(h.mean(1)), net(1, x), ratio=1e-5)
    with torch.no_grad():
        level.query.normal_()
    pooled = kernels.gist_pool_ref(h.reshape(1, 24, 3, 16), level.query, 8).reshape(3, 48)
    assert_close("learned query pooling", finish(pooled), net(1, x), ratio=1e-5)
    assert (finish(h.mean(1)) - net(1, x)).abs().max() > 1e-3


def test_gistnet_per_level_or_shared_weights():
    shared, split = GistNet(mc_config(gist_shared=True), 48, 1.0), GistNet(mc_config(), 48, 1.0)
    assert shared.level(1) is shared.level(2) and split.level(1) is not split.level(2)
    x = torch.randn(2, 8, 48)
    assert torch.equal(shared(1, x), shared(2, x)) and not torch.allclose(split(1, x), split(2, x))
    # levels past the trained ones reuse the top trained level's weights (or the shared set), and say so
    assert all(split.level(l) is split.level(2) for l in (3, 7)) and shared.level(9) is shared.level(1)
    assert split.describe() == "GistNet: LOD1..LOD2 own weights, LOD3+ reuse LOD2's"
    assert shared.describe() == "GistNet: one set of weights for every level"
    three = GistNet(mc_config(gist_levels=3), 48, 1.0)
    assert len(three.levels) == 3 and three.level(3) is not three.level(2) and three.level(4) is three.level(3)


def test_levels_past_the_trained_ones_reuse_sigma_and_lens_level():
    """sigma_scale has one entry per trained level (learned in gaussian_learned); deeper levels use the last. LensNet's
    level embedding likewise: moving an entry from LOD2 to LOD5 changes its score only through the log-span feature."""
    scale = torch.tensor([0.0, 0.1, 0.3])
    lod = torch.tensor([0, 1, 2, 3, 6])
    span = 8 ** lod
    assert torch.allclose(level_sigma(scale, lod, span), torch.tensor([0, 0.8, 19.2, 153.6, 0.3 * 8**6]))
    m = mc_model(rope="gaussian_learned")
    assert m.sigma_scale.shape == (3,) and isinstance(m.sigma_scale, torch.nn.Parameter)
    lens = LensNet(mc_config(), 48).eval()
    x, dist = torch.randn(1, 20, 48), torch.arange(20, 0, -1)[None] * 64
    lod2, span = torch.full((1, 20), 2), torch.full((1, 20), 64)
    base = lens(x, lod2, dist, span)
    assert torch.equal(lens(x, lod2 + 3, dist, span), base)  # the LOD2 row serves LOD5
    assert not torch.allclose(lens(x, lod2 - 1, dist, span), base)  # but LOD1 has its own


@pytest.mark.parametrize("pool", ["mean", "query", "cls"])
def test_gistnet_and_lensnet_every_parameter_gets_a_gradient(pool):
    """Through the base model's loss, as issue 5's stages will train them (and as the original code did not)."""
    m = mc_model(gist_pool=pool, gist_proj="linear", rope="gaussian_learned").train()
    x = m.gpt.wte(torch.randint(0, 97, (4 * 8 * 8,))).detach()
    gists = m.gistnet(2, m.gistnet(1, x.view(-1, 8, 48)).view(-1, 8, 48))  # (4, 48): LOD1 then LOD2
    mu = torch.arange(4) * 64 + 31.5
    logits, _ = m.gpt(embeds=gists[None], mu=mu, sigma=m.sigma_scale[2] * 64 * torch.ones(4))
    children = m.gistnet(1, x.view(-1, 8, 48)).view(1, 4, 8, 48)  # each LOD2 gist's LOD1 children
    scores = m.lensnet(gists[None], torch.full((1, 4), 2), 256 - (mu[None] + 32.5), torch.full((1, 4), 64), children)
    (logits.logsumexp(-1).mean() + scores.pow(2).mean()).backward()
    params = [*m.gistnet.named_parameters(), *m.lensnet.named_parameters(), ("sigma_scale", m.sigma_scale)]
    for name, p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"


def wc_features(wc, d=48, gen=None):
    x = torch.randn(1, len(wc), d, generator=gen)
    return x, wc.lod[None], (wc.cursor - wc.end)[None], (wc.end - wc.start)[None]


def test_lensnet_legal_directions_and_permutation():
    torch.manual_seed(3)
    wc = WorkingContext.pyramid(8, 12, 64, 900, 56)
    lens = LensNet(mc_config(lens_tail=8), 48).eval()
    x, lod, dist, span = wc_features(wc)
    raw = lens(x, lod, dist, span)[0]
    assert raw.shape == (len(wc),)
    can_expand, can_collapse = wc.legal_directions()
    assert torch.equal(can_expand, wc.lod > 0)
    # 12 LOD2 gists: the first 8 are the children of LOD3 node 0 and may collapse into it, the ragged 4 may not
    assert (wc.lod[:12] == 2).all() and can_collapse[:8].all() and not can_collapse[8:12].any()
    assert can_collapse.sum() % 8 == 0 and not can_collapse[-12:].any()  # whole groups, none in the tail
    # non-causal, no positions beyond the features: permuting the non-tail entries permutes the scores
    perm = torch.cat([torch.randperm(len(wc) - 8), torch.arange(len(wc) - 8, len(wc))])
    out = lens(x[:, perm], lod[:, perm], dist[:, perm], span[:, perm])[0]
    assert_close("permuted scores", raw[perm], out, ratio=1e-5)


def test_preview_nodes():
    """What LensNet previews below each entry: K**depth descendants (tokens at most), repeated to fill the row."""
    lod, index = torch.tensor([2, 1, 0]), torch.tensor([3, 5, 7])
    pl, pi = preview_nodes(lod, index, 4, 2)
    assert pl.tolist() == [[0] * 16] * 3 and pi[0].tolist() == list(range(48, 64))  # LOD2 node 3: tokens 48..63
    assert pi[1].tolist() == [20, 21, 22, 23] * 4 and pi[2].tolist() == [7] * 16  # LOD1 node 5: its 4 tokens
    pl, pi = preview_nodes(lod, index, 4, 1)
    assert pl.tolist() == [[1] * 4, [0] * 4, [0] * 4] and pi.tolist() == [[12, 13, 14, 15], [20, 21, 22, 23], [7] * 4]
    with pytest.raises(ValueError, match="lens_preview"):
        mc_config(lens_preview=4).validate()
    for depth in (1, 2):  # a session feeds LensNet its previews from the tree
        s = Session(mc_model(w_max=96, recent_tokens=16, lens_preview=depth))
        s.ingest(torch.randint(0, 97, (1500,)).tolist())
        assert s.scores().shape == (len(s.wc),) and torch.isfinite(s.scores()).all()


def test_lensnet_type_preview_is_the_max_over_each_span_token_types():
    """lens_types: each gist's preview is the max over the token types of its whole span (type_max, checked against a
    float64 loop), fed by the tree's type index in a session and by the block's ids in the stages, so a rare token
    planted under a deep gist shows in that gist's preview alone and changes its score."""
    from megacontext import type_max
    import stages
    torch.manual_seed(0)
    types = torch.rand(2, 5, 97) < 0.05
    types[0, 3] = False  # an entry with no types gets 0
    table = torch.randn(97, 16)
    ref = torch.zeros(2, 5, 16, dtype=torch.float64)
    for b in range(2):
        for i in range(5):
            if types[b, i].any():
                ref[b, i] = table.double()[types[b, i]].max(0).values
    assert_close("type_max", ref, type_max(types, table).double(), ratio=1e-6)
    m = mc_model(w_max=64, recent_tokens=16, lens_types=True)
    ids = torch.randint(0, 90, (5000,))  # ids 90.. never occur
    s = Session(m)
    s.ingest(ids.tolist())
    before, wc = s.scores(), s.wc
    want = torch.stack([torch.isin(torch.arange(97), ids[a:b]) for a, b in zip(wc.start.tolist(), wc.end.tolist())])
    x = s.tree.node_embeddings(wc.lod, wc.index)[None]
    feats = (x, wc.lod[None], (wc.cursor - wc.end)[None], (wc.end - wc.start)[None])
    assert_close("session scores", m.lensnet(*feats, types=want[None], vocab=m.gpt.wte.weight)[0], before,
                 ratio=1e-6)
    tables = stages.node_tables(m, m.gpt.wte(ids))
    got = stages.lens_features(m, wc, tables, ids)
    assert torch.equal(got[5][0], want) and got[4] is None
    deep = int(wc.lod.argmax())  # the oldest, coarsest gist
    s.tree.rewrite(int(wc.start[deep]) + 100, [95])
    after = s.scores()
    changed = (after - before).abs() > 1e-6
    assert wc.lod[deep] >= 3 and changed[deep]
    marked = torch.from_numpy(s.tree.types(wc.lod.numpy(), wc.index.numpy()))[:, 95]
    assert marked.nonzero().flatten().tolist() == [deep]  # only the gist above the rare token previews it


def test_lensnet_sign_on_constructed_case():
    """The tail repeats one gist's content: after a short fit, that gist scores highest, and the allocator
    expands it (positive = expand). The other gists are labelled -1 (collapse cheaply)."""
    torch.manual_seed(0)
    d, G, T = 16, 6, 4
    cfg = MegaContextConfig(block_k=4, w_max=40, recent_tokens=4, refocus_every=4, lens_width=32, lens_heads=2,
                            lens_layers=2, lens_tail=T, max_edits=1, tau_expand=0.0)
    lens = LensNet(cfg, d)
    lod = torch.tensor([1] * G + [0] * T)
    span = torch.tensor([4] * G + [1] * T)
    dist = torch.tensor([4 * (G - i) + T - 4 for i in range(G)] + list(range(T - 1, -1, -1)))

    def batch(B, gen):
        x = torch.randn(B, G + T, d, generator=gen)
        hot = torch.randint(0, G, (B,), generator=gen)
        x[:, G:] = x[torch.arange(B), hot][:, None] + 0.1 * torch.randn(B, T, d, generator=gen)
        y = torch.full((B, G), -1.0)
        y[torch.arange(B), hot] = 1.0
        return x, y, hot

    opt = torch.optim.Adam(lens.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x, y, _ = batch(32, gen)
        out = lens(x, lod.expand(32, -1), dist.expand(32, -1), span.expand(32, -1))[:, :G]
        loss = (out - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lens.eval()
    x, _, hot = batch(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = lens(x, lod.expand(64, -1), dist.expand(64, -1), span.expand(64, -1))
    assert (s[:, :G].argmax(1) == hot).float().mean() >= 0.9
    # positive means expand: an allocator step expands the gist the tail points at
    b = int((s[:, :G].argmax(1) == hot).nonzero()[0])
    wc = WorkingContext(4, 4, 40)
    wc.append(G * 4 + T)
    for i in range(G):
        wc.collapse(i, now=-10)  # long ago: out of cooldown
    FocusAllocator(cfg).step(wc, s[b])
    assert int((wc.lod == 0).sum()) == T + 4 and int(wc.lod[int(hot[b])]) == 0


# ----------------------------------------------------------------------------------------------------------------
# positions and the session


def test_positions_gaussian_rope_variants():
    wc = WorkingContext.pyramid(8, 12, 200, 1000, 100)
    start, end = wc.start.double(), wc.end.double()
    history, logits = torch.randint(0, 97, (400,)).tolist(), {}
    for rope in ("gaussian", "rope", "gaussian_learned"):
        m = mc_model(rope=rope)  # the same seed: the same GistNet, so only the positions differ
        s = Session(m)
        s.ingest(history)
        logits[rope] = s.logits()
        mu, sigma = wc.positions(m.sigma_scale)
        assert torch.equal(mu, (start + end - 1) / 2)  # span centre; LOD0: mu = p exactly
        assert torch.equal(mu[wc.lod == 0], start[wc.lod == 0]) and (sigma[wc.lod == 0] == 0).all()
        if rope == "rope":
            assert (sigma == 0).all()
        else:
            want = (end - start) / math.sqrt(12)
            assert_close("sigma", want[wc.lod > 0].float(), sigma[wc.lod > 0], ratio=1e-6)
            assert sigma[wc.lod == 2][0] == pytest.approx(64 / math.sqrt(12), rel=1e-6)
        assert isinstance(m.sigma_scale, torch.nn.Parameter) == (rope == "gaussian_learned")
    assert torch.equal(logits["gaussian"], logits["gaussian_learned"])  # equal until sigma_scale is trained
    assert (logits["gaussian"] - logits["rope"]).abs().max() > 1e-4  # the spreads reach the base model


def scratch_logits(s):
    """Next-token logits from one uncached forward over the explicit working context."""
    mu, sigma = s.wc.positions(s.model.sigma_scale)
    x = s.tree.node_embeddings(s.wc.lod, s.wc.index)[None]
    with torch.no_grad():
        return s.model.gpt(embeds=x, mu=mu[None], sigma=sigma[None])[0][0, -1]


@pytest.mark.parametrize("policy", ["recency", "lens"])
def test_session_kv_reuse_equals_from_scratch(policy):
    m = mc_model(policy=policy)
    with torch.no_grad():  # a decisive LensNet, so the lens policy edits too
        m.lensnet.head.weight.mul_(300)
    s = Session(m)
    s.ingest(torch.randint(0, 97, (300,)).tolist())
    partial = 0
    for _ in range(70):
        if s.pending >= s.cfg.refocus_tokens:
            s.refocus()
        partial += 0 < s.wc.dirty < s.cache.length  # an edit in the middle: the prefix before it is reused
        assert_close("logits", scratch_logits(s), s.logits(), ratio=1e-5, atol=1e-4)
        s.ingest([s.step()])  # two tokens per iteration: the sampled one and one more
        s.wc.check_invariants()
    assert partial >= 5, "edits in the middle must have truncated the cache (a reused prefix)"
    assert s.alloc.summary()["collapses"] > 0


def test_session_rebuilds_cache_when_positions_drift(monkeypatch):
    """Positions are relative to the cache's origin; far from it the cache is rebuilt, with the same logits."""
    import session as session_module
    monkeypatch.setattr(session_module, "ORIGIN_DRIFT", 24)
    s = Session(mc_model(policy="recency"))
    s.ingest(torch.randint(0, 97, (100,)).tolist())
    s.logits()
    origins = set()
    for _ in range(60):
        s.step()
        origins.add(float(s.cache.origin[0, 0]))
        assert_close("logits", scratch_logits(s), s.logits(), ratio=1e-5, atol=1e-4)
        assert s.wc.cursor - float(s.cache.origin[0, 0]) <= 24 + 1
    assert len(origins) >= 2
    with pytest.raises(ValueError, match="history is empty"):
        Session(mc_model()).logits()


def test_session_save_open_continue_equals_never_saved(tmp_path):
    m = mc_model()
    with torch.no_grad():
        m.lensnet.head.weight.mul_(300)
    a = Session(m)
    a.ingest(torch.randint(0, 97, (333,)).tolist())
    for _ in range(21):
        a.step()
    path = str(tmp_path / "session")
    a.save(path)
    b = Session.open(m, path)
    assert b.wc.cursor == a.wc.cursor and torch.equal(b.wc.lod, a.wc.lod) and b.pending == a.pending
    ta = [a.step() for _ in range(40)]
    tb = [b.step() for _ in range(40)]
    assert ta == tb and torch.equal(a.wc.index, b.wc.index)
    assert_close("logits after resume", a.logits(), b.logits(), ratio=1e-5, atol=1e-4)
    b.save(path)  # in-place append to the tree it came from
    c = Session.open(m, path)
    assert len(c.tree) == len(a.tree) and torch.equal(c.wc.index, a.wc.index)
    assert [c.step() for _ in range(10)] == [a.step() for _ in range(10)]
    # a differently configured session reopens the same tree with a cold-start pyramid
    m2 = MegaContextModel(m.gpt, dataclasses.replace(m.cfg, w_max=80))
    m2.gistnet.load_state_dict(m.gistnet.state_dict())
    d = Session.open(m2, path)
    d.wc.check_invariants()
    assert d.wc.cursor == len(c.tree) - 10 and len(d.wc) <= 80


def test_session_across_three_level_births_equals_reopened(tmp_path):
    """A session streamed over a history that crosses three level births (K=4: LOD3 at 64 tokens, LOD4 at 256, LOD5
    at 1,024), decoding and saving in between (saves that create lod3.bin .. lod5.bin), equals a fresh session opened
    on the saved tree: every level of the tree, the working context, the allocator state and the next tokens."""
    m = mc_model(block_k=4, w_max=48, recent_tokens=8)
    with torch.no_grad():  # a decisive LensNet, so the allocator edits at every level
        m.lensnet.head.weight.mul_(300)
    history = torch.randint(0, 97, (1110,), generator=torch.Generator().manual_seed(7)).tolist()
    a, path, pos, depths = Session(m), str(tmp_path / "session"), 0, []
    for chunk in (50, 30, 140, 60, 720, 110):  # births inside the 2nd (64), 4th (256) and 5th (1,024) ingests
        a.ingest(history[pos:pos + chunk])
        pos += chunk
        for _ in range(9):
            a.step()
            a.wc.check_invariants(a.cfg.w_max)
        a.save(path)
        depths.append(a.tree.depth)
    assert depths == [2, 3, 3, 4, 5, 5] and a.alloc.summary()["collapses"] > 0
    assert (a.wc.lod >= 3).any()  # the working context reads the new levels
    b = Session.open(m, path)
    assert b.tree.depth == 5 and len(b.tree) == len(a.tree) == 1110 + 6 * 9
    assert b.tree.tokens(0, len(a.tree)).tolist() == a.tree.tokens(0, len(a.tree)).tolist()
    for lod in range(1, 6):
        every = list(range(a.tree.n_nodes(lod)))
        assert b.tree.n_nodes(lod) == len(every) and (b.tree.gists(lod, every) == a.tree.gists(lod, every)).all()
    assert all(torch.equal(getattr(a.wc, k), getattr(b.wc, k)) for k in ("lod", "index", "born", "born_by"))
    assert (b.pending, b.alloc.steps, b.alloc.totals) == (a.pending, a.alloc.steps, a.alloc.totals)
    assert_close("logits", a.logits(), b.logits(), ratio=1e-5, atol=1e-4)
    assert [a.step() for _ in range(30)] == [b.step() for _ in range(30)]
    # the gists do not depend on how the history was chunked, across every birth
    c = Session(m)
    c.ingest(a.tree.tokens(0, len(a.tree)).tolist())
    for lod in range(1, 6):
        every = list(range(a.tree.n_nodes(lod)))
        assert_close(f"LOD{lod} gists", torch.from_numpy(a.tree.gists(lod, every)),
                     torch.from_numpy(c.tree.gists(lod, every)), ratio=1e-5)


def test_session_refuses_tree_of_another_model_or_K(tmp_path):
    m = mc_model()
    s = Session(m)
    s.ingest(list(range(90)))
    path = str(tmp_path / "t")
    s.save(path)
    before = open(os.path.join(path, "meta.json")).read()
    with pytest.raises(TreeError, match="block size K=8, this session uses K=16"):
        Session.open(mc_model(block_k=16, w_max=128), path)
    other = mc_model()
    with torch.no_grad():
        other.gistnet.level(1).gain.mul_(2)  # another GistNet: other gists
    with pytest.raises(TreeError, match="built by another model"):
        Session.open(other, path)
    assert open(os.path.join(path, "meta.json")).read() == before


def test_bad_input_is_a_clear_error_and_changes_nothing():
    with pytest.raises(ValueError, match="power of two"):
        mc_config(block_k=12).validate()
    with pytest.raises(ValueError, match="budget w_max=34 is too small"):
        mc_config(w_max=34).validate()  # tail 12 + coarsest 2 * 7 + 1 + headroom 8 = 35
    mc_config(w_max=35).validate()
    with pytest.raises(ValueError, match="budget w_max=34 is too small"):
        MegaContextModel(tiny_gpt(), mc_config(w_max=34))
    s = Session(mc_model(w_max=35))
    s.ingest(list(range(50)))
    for _ in range(5):
        s.step()
    before = (len(s.tree), s.tree.n_nodes(1), snapshot(s.wc), s.pending)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        s.ingest([3, 97])
    # target 27 = tail 12 + 15 = 2*(K-1) + 1: the coarsest tiling fits until a history needs digit sum 16 (2, 7, 7)
    with pytest.raises(ValueError, match="this budget holds 202 tokens at K=8; raise the budget or K"):
        s.ingest([1] * 200)
    assert before[:2] == (len(s.tree), s.tree.n_nodes(1)) and same(before[2], snapshot(s.wc)) and before[3] == s.pending


def test_session_streams_a_long_history_and_stays_in_budget():
    s = Session(mc_model(w_max=96, recent_tokens=16))
    s.ingest(torch.randint(0, 97, (2500,)).tolist())  # >= w_max at once: the cold-start pyramid
    s.wc.check_invariants()
    assert (s.wc.lod == 2).any() and len(s.wc) <= s.cfg.target
    for _ in range(3):
        s.ingest(torch.randint(0, 97, (40,)).tolist())  # smaller chunks: budget steps make room
        s.wc.check_invariants()
    assert s.tree.depth == 3 and all(s.tree.n_nodes(l) == len(s.tree) // 8**l for l in range(4))
    levels = s.wc.level_map(30)
    assert len(levels) == 30 and levels[0] == str(int(s.wc.lod.max())) and list(levels) == sorted(levels)[::-1]


def test_session_refocus_until_stable_zooms_to_tokens():
    """After a question arrives the session refocuses until nothing changes, at most depth + 1 steps: scores that want
    one old token's detail zoom the gist over it level by level to tokens (a step per level and a check), within the
    budget; one plain step zooms one level only."""
    s = Session(mc_model(w_max=96, recent_tokens=16))
    s.ingest(torch.randint(0, 97, (2500,)).tolist())
    p = 300  # a token deep inside the LOD2 band

    def scorer(wc):  # the recency pyramid's scores, plus a lot for every gist over token p
        return recency_scores(wc, s.cfg.target) + 20.0 * ((wc.lod > 0) & (wc.start <= p) & (wc.end > p))

    def level_at(wc):
        return int(wc.lod[int(((wc.start <= p) & (wc.end > p)).nonzero())])

    top = level_at(s.wc)
    assert top >= 2
    one = Session(mc_model(w_max=96, recent_tokens=16))
    one.ingest(s.tree.tokens(0, 2500).tolist())
    one.refocus(scorer=scorer)
    assert level_at(one.wc) == top - 1  # a single step zooms one level
    t = s.refocus(until_stable=True, scorer=scorer)
    assert level_at(s.wc) == 0 and t["steps"] == top + 1 and t["expands"] == top
    s.wc.check_invariants(s.cfg.target)


# ----------------------------------------------------------------------------------------------------------------
# sample.py --mc end to end


def run(args, **kw):
    env = {**os.environ, "MC_KERNELS": "torch", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "60"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir):
    """A random tiny GPT saved in train.py's checkpoint format, with a synthetic corpus's tokenizer."""
    import prepare
    root = tmp_path_factory.mktemp("mc_sample")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64)
    ckpt = str(root / "ckpt.pt")
    torch.save({"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg),
                "config": {"data_dir": data_dir}, "step": 0}, ckpt)
    enc = prepare.load_tokenizer(data_dir)
    ordinary = enc.n_vocab - len(prepare.SPECIAL_TOKENS)  # special tokens sit at the top of the vocabulary
    ids = [t for t in prepare.load_split(data_dir, "train")[0][:6000].tolist() if t < ordinary]
    book = root / "book.txt"
    book.write_text(enc.decode(ids) + " The end of the book.")
    return ckpt, str(book), root


def test_sample_mc_end_to_end(checkpoint):
    ckpt, book, root = checkpoint
    tree = str(root / "tree")
    common = ["sample.py", "--ckpt", ckpt, "--mc", "--budget", "128", "--block", "8", "--recent", "16"]
    r = run(common + ["--prompt-file", book, "--max-new-tokens", "30", "--temperature", "0", "--tree", tree])
    assert r.returncode == 0, r.stderr
    status = [line for line in r.stderr.splitlines() if line.startswith("[mc] ") and "entries" in line]
    assert len(status) >= 3, r.stderr  # a refocus line every 8 generated tokens
    for line in status:
        levels, used = line.split(" | ")[0][5:], int(line.split(" | ")[1].split("/")[0])
        assert levels.isdigit() and levels[0] == max(levels) > "1" and used <= 160 and "swap" in line
    assert len(r.stdout.strip()) > 0 and "The end of the book" not in r.stdout  # a book is not echoed
    n_first = json.load(open(os.path.join(tree, "meta.json")))["counts"][0]
    assert n_first > 5000
    # resume: the history grows from where it stopped; interactive lines are ingested and answered
    r = run(common + ["--tree", tree, "--interactive", "--max-new-tokens", "5"], input="hello there\nmore\n")
    assert r.returncode == 0, r.stderr
    assert "resumed session" in r.stderr and len(r.stdout.strip().splitlines()) >= 2
    assert json.load(open(os.path.join(tree, "meta.json")))["counts"][0] > n_first
    # bad input: one line on stderr, exit 1, the saved tree untouched
    before = {n: open(os.path.join(tree, n), "rb").read() for n in os.listdir(tree)}
    for extra, message in [(["--block", "12"], "power of two"), (["--budget", "30"], "too small"),
                           (["--block", "16", "--budget", "128"], "block size K=8, this session uses K=16")]:
        r = run(common + ["--tree", tree, "--prompt", "x", "--max-new-tokens", "3"] + extra)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
        assert message in r.stderr
    assert before == {n: open(os.path.join(tree, n), "rb").read() for n in os.listdir(tree)}


def zoomed_size(m: int, K: int, a: int, b: int) -> int:
    """Entries of the coarsest tiling of [0, m) after expanding every node that overlaps [a, b) down to tokens."""
    def size(lod, index):
        lo, hi = index * K**lod, (index + 1) * K**lod
        if lod == 0 or hi <= a or lo >= b:
            return 1
        return sum(size(lod - 1, index * K + j) for j in range(K))
    return sum(size(lod, first + i) for lod, first, n in coarsest_runs(m, K, depth_of(m, K)) for i in range(n))


def test_zoom_entries_bounds_every_needle_zoom_and_is_reached():
    """tiling.zoom_entries holds every span of <= K tokens zoomed to LOD0 anywhere in the history (brute force over
    positions and lengths); it is reached within one entry just below a power of K and loose by at most (K-1) x depth
    elsewhere (it takes the largest coarsest tiling of any shorter history)."""
    from tiling import zoom_entries
    for K in (2, 4, 8):
        for m in (K**3 - 1, K**3 + 5, 3 * K**3 + K**2 + 1, K**4 - 3):
            worst = max(zoomed_size(m, K, p, p + n) for n in (1, K - 1, K) for p in range(0, m - n + 1))
            bound = zoom_entries(m + 5, K, 5)
            assert worst <= bound - 5 <= worst + (K - 1) * depth_of(m, K) + 1, (K, m, worst, bound)
            if m in (K**3 - 1, K**4 - 3):
                assert bound - 5 - worst <= 1


# ----------------------------------------------------------------------------------------------------------------
# the query-conditioned LensNet (issue 17)


def test_sparse_maxima_equal_the_dense_masked_max_forward_and_backward():
    """type_max and masked_max touch only the marked (entry, id) pairs; values and gradients (shared evenly among tied
    maxima, as amax shares them) equal a dense float64 masked max, chunked or not, an unmarked entry giving 0."""
    from megacontext import masked_max, type_max
    torch.manual_seed(3)
    B, n, V, W, T = 3, 9, 37, 5, 4
    types = torch.rand(B, n, V) < 0.2
    types[1, 4] = False
    types[0, 0, :3] = True
    table = torch.randn(V, W, dtype=torch.float64)
    table[1] = table[0]  # a tie inside entry (0, 0)
    table.requires_grad_(True)
    vals = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    neg = torch.tensor(-math.inf, dtype=torch.float64)
    dense_t = torch.where(types[..., None], table, neg).amax(2).nan_to_num(0.0, neginf=0.0)
    dense_m = torch.where(types[:, None], vals[:, :, None], neg).amax(-1).nan_to_num(0.0, neginf=0.0)
    for got, ref, x in [(type_max(types, table), dense_t, table), (masked_max(vals, types, chunk=5), dense_m, vals)]:
        assert got.shape == ref.shape and torch.equal(got, ref)
        w = torch.randn_like(ref)
        g_got, = torch.autograd.grad((got * w).sum(), x)
        g_ref, = torch.autograd.grad((ref * w).sum(), x)
        assert torch.allclose(g_got, g_ref, atol=1e-12)
    assert (type_max(types, table)[1, 4] == 0).all() and (masked_max(vals, types)[1, :, 4] == 0).all()


def test_indexer_matches_a_float64_loop():
    """Indexer: per tail token t and learned kind c, sum_h w_thc ReLU(q_thc . k_ehc) (type kinds: the max over the
    span's ids), and per lexical kind u_tc x [t's id in the span's types / after a marker], summed over kinds and
    maxed over t, against a float64 loop; an entry whose preview marks no id gets 0 there."""
    from megacontext import Indexer, masked_max
    torch.manual_seed(0)
    B, Tq, n, V, d, D, H, dk = 2, 3, 5, 11, 8, 6, 2, 4
    ix = Indexer(D, d, H, dk, 2)
    for p in ix.parameters():
        torch.nn.init.normal_(p, 0.0, 0.5)
    query, x, vocab = torch.randn(B, Tq, D), torch.randn(B, n, d), torch.randn(V, d)
    types = torch.rand(B, n, 2 * V) < 0.3
    types[0, 1] = False
    query_ids = torch.randint(0, V, (B, Tq))
    score, kinds = ix(query, x, types, vocab, query_ids)
    hq = ix.norm(query).double()
    q = (hq @ ix.q.weight.double().T).view(B, Tq, 3, H, dk) / math.sqrt(dk)
    wu = hq @ ix.w.weight.double().T
    w, u = wu[..., :3 * H].view(B, Tq, 3, H), wu[..., 3 * H:]
    keys = [x.double() @ ix.k[0].weight.double().T] + [vocab.double() @ ix.k[c].weight.double().T for c in (1, 2)]
    ref = torch.zeros(B, Tq, n, 5, dtype=torch.float64)
    for b in range(B):
        for t in range(Tq):
            for e in range(n):
                def s(c, key):
                    return sum(w[b, t, c, h] * torch.relu(q[b, t, c, h] @ key.view(H, dk)[h]) for h in range(H))
                ref[b, t, e, 0] = s(0, keys[0][b, e])
                for c in (1, 2):
                    ids = types[b, e, (c - 1) * V:c * V].nonzero().flatten().tolist()
                    ref[b, t, e, c] = max((s(c, keys[c][v]) for v in ids), default=0.0)
                    ref[b, t, e, 2 + c] = u[b, t, c - 1] * float(types[b, e, (c - 1) * V + query_ids[b, t]])
    assert_close("indexer score", ref.sum(-1).amax(1), score.double(), ratio=1e-5)
    assert_close("indexer kinds", ref.amax(1), kinds.double(), ratio=1e-5)
    vals = torch.randn(B, Tq, V)
    got = masked_max(vals, types[..., :V], chunk=7)  # chunked over entries
    assert got.shape == (B, Tq, n) and (got[0, :, 1] == 0).all()
    assert torch.equal(got[1, :, 2], torch.where(types[1, 2, :V], vals[1], -math.inf).amax(-1).nan_to_num(0.0))


def test_query_conditioned_lensnet_learns_which_key_is_asked():
    """Eight gists each hold a different key after a marker (their previews' second half); the question names one of
    them (the query states hold its embedding). The Indexer's LensNet learns to rank the asked gist first on held-out
    questions; the same LensNet without the question (no Indexer) cannot beat chance: its inputs do not say which."""
    torch.manual_seed(0)
    d, G, T, V = 16, 8, 4, 40
    vocab = torch.randn(V, d)
    cfg = dict(block_k=4, w_max=40, recent_tokens=4, lens_width=32, lens_heads=2, lens_layers=1, lens_tail=T,
               lens_types=True, lens_markers=2)
    lod = torch.tensor([1] * G + [0] * T)
    span = torch.tensor([4] * G + [1] * T)
    dist = torch.tensor([4 * (G - i) + T - 4 for i in range(G)] + list(range(T - 1, -1, -1)))

    def batch(B, gen):
        keys = torch.stack([torch.randperm(V - 2, generator=gen)[:G] for _ in range(B)])  # (B, G) distinct keys
        types = torch.zeros(B, G + T, 2 * V, dtype=torch.bool)
        types[torch.arange(B)[:, None], torch.arange(G), V + keys] = True  # each gist: its key after a marker
        types[:, :G, V - 1] = True  # and the marker itself
        asked = torch.randint(0, G, (B,), generator=gen)
        query = vocab[keys[torch.arange(B), asked]][:, None].expand(B, T, d) + 0.1 * torch.randn(B, T, d,
                                                                                                  generator=gen)
        x = torch.randn(B, G + T, d, generator=gen)
        query_ids = torch.randint(0, V - 2, (B, T), generator=gen)  # the tail's ids: noise, the key is not among them
        return x, types, query, asked, query_ids

    def top1(lens, with_query):
        gen = torch.Generator().manual_seed(1)
        x, types, query, asked, ids = batch(256, gen)
        out = lens(x, lod.expand(256, -1), dist.expand(256, -1), span.expand(256, -1), types=types, vocab=vocab,
                   query=query if with_query else None, query_ids=ids)[:, :G]
        return float((out.argmax(1) == asked).float().mean())

    for with_query in (True, False):
        lens = LensNet(MegaContextConfig(**cfg, lens_query="0" if with_query else ""), d, d)
        opt = torch.optim.Adam(lens.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(150):
            x, types, query, asked, ids = batch(32, gen)
            out = lens(x, lod.expand(32, -1), dist.expand(32, -1), span.expand(32, -1), types=types, vocab=vocab,
                       query=query if with_query else None, query_ids=ids)[:, :G]
            loss = F.cross_entropy(out, asked)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = top1(lens.eval(), with_query)
        if with_query:
            assert acc >= 0.9, acc
        else:
            assert acc <= 0.3, acc  # chance is 1/8


def test_session_reads_the_question_as_the_base_does():
    """lens_query: before a LensNet refocus the session reads its pending tokens, and the states it keeps for the
    newest lens_tail tokens are the base's residual streams at the named layers over the current working context
    (equal to one forward over all its entries), so a different question changes the scores."""
    m = mc_model(w_max=64, recent_tokens=16, lens_types=True, lens_query="0,2", lens_markers=4, lens_margin=4)
    for p in m.lensnet.indexer.parameters():  # a visible Indexer, as a trained one is
        torch.nn.init.normal_(p, 0.0, 0.3)
    s = Session(m)
    ids = torch.randint(0, 90, (1500,)).tolist()
    s.ingest(ids)
    for i in range(3):
        s.ingest(ids[i * 8:i * 8 + 8])
        s.refocus()
    s.ingest([93, 5])  # a question arrives: the pending tokens are read at the next refocus
    s.refocus(until_stable=True)
    wc = s.wc
    tok = (wc.lod == 0).nonzero().flatten()[-8:]
    assert s.state_pos.tolist() == wc.start[tok].tolist() and s.state_pos[-1] == wc.cursor - 1
    x = wc.embeddings(s.tree)[None]
    mu, sigma = wc.positions(m.sigma_scale)
    _, states = m.read(embeds=x, mu=mu[None], sigma=sigma[None], last_only=True)
    assert states.shape[-1] == 2 * 48
    assert_close("kept states", states[0, tok], s.states, ratio=1e-4)
    before = s.scores()
    s.states = s.states.flip(1)  # another question (states not just reordered over tokens)
    assert (s.scores() - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="names a layer above"):
        mc_model(lens_types=True, lens_query="3")
    with pytest.raises(ValueError, match="lens_types on"):
        mc_config(lens_query="1").validate()
