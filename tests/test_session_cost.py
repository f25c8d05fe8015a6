"""session.py's decode cost (issue 19): per-refocus KV reuse telemetry against a brute-force count, one batched cut per
refocus equal to a full recompute in float64, and the allocator's edit_cost knob keeping edits near the tail."""
import pytest
import torch

from megacontext import FocusAllocator, MegaContextConfig, MegaContextModel, WorkingContext
from model import GPT, GPTConfig
from session import Session


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run on one thread


def decisive_model(dtype=torch.float32, **kw):
    """A tiny MegaContext model whose LensNet scores are large, so every refocus edits, anywhere in the context."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=3, n_embd=48)).eval()
    cfg = dict(block_k=8, w_max=64, recent_tokens=12, gist_heads=3, lens_width=32, lens_heads=2, lens_tail=8)
    torch.manual_seed(1)
    m = MegaContextModel(gpt, MegaContextConfig(**{**cfg, **kw})).eval().to(dtype)
    with torch.no_grad():
        m.lensnet.head.weight.mul_(300)
    return m


def rows(wc) -> list:
    return list(zip(wc.lod.tolist(), wc.index.tolist()))


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("edit_cost", [0.0, 3.0])
def test_session_reuse_counts_match_brute_force(edit_cost):
    """Each refocus reports reused = the entries the decode before it cached that are still the same node at the same
    place afterwards (a longest common prefix of (lod, index) rows, recounted here), recomputed = the rest."""
    s = Session(decisive_model(edit_cost=edit_cost))
    s.ingest(torch.randint(0, 97, (400,)).tolist())
    cached, seen, middle = [], 0, 0
    for _ in range(120):
        if s.pending >= s.cfg.refocus_tokens:
            t = s.refocus()
            reused = common_prefix(cached, rows(s.wc))
            assert (t["reused"], t["recomputed"]) == (reused, len(cached) - reused), t
            assert t["seconds"] >= t["refocus_s"] > 0
            seen, middle = seen + 1, middle + (0 < reused < len(cached))
        s.logits()
        cached = rows(s.wc)  # what the KV cache now holds
        s.ingest([int(torch.randint(0, 97, ()))])
    s.ingest(torch.randint(0, 97, (20,)).tolist())  # a question: refocus until stable, several steps, one count
    before = rows(s.wc)[:min(s.wc.dirty, s.cache.length)]
    t = s.refocus(until_stable=True)
    reused = common_prefix(before, rows(s.wc))
    assert (t["reused"], t["recomputed"]) == (reused, len(before) - reused) and t["steps"] >= 2, t
    kv = s.kv_summary()
    assert kv["refocuses"] == seen + 1 >= 11 and middle >= 3, (kv, middle)
    assert 0 < kv["reuse"] < 1 and kv["seconds_per_refocus"] > 0


def test_session_batched_cut_equals_full_recompute_float64():
    """Several edits in one refocus cut the cache once, at the lowest edited entry; the cached prefix + one batched
    re-read gives the logits of a full recompute of the working context (same position origin) in float64."""
    s = Session(decisive_model(torch.float64, max_edits=4, tau_expand=0.0, hysteresis=0.0))
    s.ingest(torch.randint(0, 97, (500,)).tolist())
    cuts, multi = [], 0
    truncate = s.cache.truncate
    s.cache.truncate = lambda n: (cuts.append(n), truncate(n))
    for _ in range(60):
        if s.pending >= s.cfg.refocus_tokens:
            t = s.refocus()
            cuts.clear()
            logits = s.logits()
            assert cuts == [t["reused"]], (cuts, t)  # one cut, where the telemetry says
            multi += t["edits"] >= 2 and t["reused"] > 0
            full = s.model.gpt.make_cache(1, s.cfg.w_max)
            full.origin = s.cache.origin.clone()
            mu, sigma = s.wc.positions(s.model.sigma_scale)
            with torch.no_grad():
                ref = s.model.gpt(embeds=s.wc.embeddings(s.tree)[None].double(), mu=mu[None], sigma=sigma[None],
                                  cache=full)[0][0, -1]
            # the model runs in float64; the head hands back fp32 logits, so agreement is fp32 rounding (an fp32
            # model's cached and uncached logits differ by ~1e-6, far above this)
            torch.testing.assert_close(logits, ref, atol=1e-7, rtol=1e-6)
        s.ingest([int(s.logits().argmax())])
    assert multi >= 3, "refocuses with several edits and a reused prefix must have been checked"


def test_allocator_edit_cost_prefers_edits_near_the_tail():
    """Without edit_cost the budget collapses the lowest-scoring group (the oldest, entry 0: every cached entry goes
    stale) and a gist far back expands; with it the collapse moves next to the tail and the far expansion waits."""
    cfg = dict(block_k=8, w_max=64, recent_tokens=12, max_edits=2)

    def run(edit_cost, expand_score):
        c = MegaContextConfig(**cfg, edit_cost=edit_cost)
        wc = WorkingContext.pyramid(8, 12, 64, 1000, c.target)
        wc.append(8)
        wc.dirty = len(wc)  # all cached
        scores = torch.zeros(len(wc))
        g = wc.group_starts()
        scores[g[0]:g[0] + 8] = -0.5  # the oldest legal group is the cheapest by score
        assert g[0] == 0 and wc.lod[8] > 0 and 8 not in g  # entry 8: a gist outside every legal group
        scores[8] = expand_score
        t = FocusAllocator(c).step(wc, scores)
        return t, wc.dirty, len(wc), int(g[0]), int(g[-1])

    t, cut, n, first, last = run(0.0, 0.0)
    assert t["collapses"] == 1 and cut == first
    t, cut, n, first, last = run(4.0, 0.0)
    assert t["collapses"] == 1 and cut == last and cut > n // 2
    t, cut, _, _, _ = run(0.0, 2.5)
    assert t["expands"] == 1 and cut == 0
    t, cut, _, _, _ = run(4.0, 2.5)
    assert t["expands"] == 0 and cut > 0
    with pytest.raises(ValueError, match="edit_cost"):
        MegaContextConfig(edit_cost=-1.0).validate()
