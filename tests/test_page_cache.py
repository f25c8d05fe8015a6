"""tree.PageCache: reads of committed tree rows on the refocus path through one LRU cache of pages: the values of
direct reads, hits on re-reads, prefetched children hit, bounded bytes, rewrites never served stale; a session
prefetches the children of entries whose scores rise, and its zooms then hit those pages."""
import numpy as np
import torch

from test_tree import D, V, Recorder, fake_embed, make_tree
from tree import MegaContextTree, PageCache

K = 4


def saved(tmp_path, n=3000):
    t = make_tree(K)
    t.append(np.random.default_rng(0).integers(0, V, n))
    t.save(str(tmp_path / "t"))
    return MegaContextTree.open(str(tmp_path / "t"), K, D, V, "model-a", fake_embed, Recorder())[0]


def test_page_cache_hits_prefetch_eviction_and_rewrite(tmp_path, monkeypatch):
    t = saved(tmp_path)
    c = t.cache
    lod, index = torch.tensor([3, 3, 2, 1, 1, 0, 0]), torch.tensor([0, 5, 40, 300, 301, 17, 2999])
    direct = [t.levels[l].disk[[i]] for l, i in zip(lod.tolist(), index.tolist()) if i < t.levels[l].n_disk]
    x = t.node_embeddings(lod, index)
    # pages of 64 rows: LOD2 page 0, LOD1 page 4 (nodes 300 and 301), LOD0 page 0; LOD3 (46 nodes) and token 2999
    # lie in partial last pages, read directly
    assert c.stats["misses"] == 3 and c.stats["hits"] == 0
    assert torch.equal(x, t.node_embeddings(lod, index)) and c.stats["hits"] == 3  # a re-read: every page hits
    assert np.array_equal(t.gists(3, [0, 5]), np.concatenate(direct[:2]))
    # the children of two LOD2 gists, prefetched, then read as a zoom would: prefetch hits, no misses
    t.prefetch_children([2, 2], [100, 101])
    misses, fetched = c.stats["misses"], c.stats["prefetched"]
    assert fetched == 1  # LOD1 nodes 400..407: one page of 64 rows
    kids = t.gists(1, np.arange(400, 408))
    assert c.stats["misses"] == misses and c.stats["prefetch_hits"] == 1
    assert np.array_equal(kids, t.levels[1].disk[400:408])
    s = c.summary()
    assert 0 < s["hit_rate"] < 1 and s["read_ms"] >= 0 and s["pages"] == 4
    # bounded: a small cache keeps the newest pages only
    c.max_bytes = 3 * 64 * D * 4
    t.gists(1, np.arange(0, 64 * 8, 64))
    assert c.bytes <= c.max_bytes and len(c.pages) <= 3
    # a scan does not go through the cache; a rewrite drops its level's pages, so no stale token is served
    monkeypatch.setattr(PageCache, "MAX_READ", 1000)
    before = dict(c.stats)
    t.tokens(0, 3000)
    assert c.stats == before
    t.tokens(0, 8)
    t.rewrite(0, [7] * 8)
    assert list(t.tokens(0, 8)) == [7] * 8


def test_session_prefetches_children_of_rising_entries(tmp_path):
    from megacontext import recency_scores
    from session import Session
    from test_megacontext import mc_model
    m = mc_model(w_max=96, recent_tokens=16)
    s = Session(m)
    s.ingest(torch.randint(0, 97, (2500,)).tolist())
    path = str(tmp_path / "s")
    s.save(path)
    rates = {}
    for prefetch in (False, True):
        t = Session.open(m, path)
        t.prefetch = prefetch
        for p, boost in ((300, 0.5), (300, 20.0), (1100, 0.5), (1100, 20.0)):  # a score rises, then the zoom comes

            def scorer(wc, p=p, boost=boost):
                return recency_scores(wc, t.cfg.target) + boost * ((wc.lod > 0) & (wc.start <= p) & (wc.end > p))
            tel = t.refocus(until_stable=True, scorer=scorer)
            t.logits()
        rates[prefetch] = t.tree.cache.summary()
        assert 0 <= tel["cache_hit_rate"] <= 1  # the refocus telemetry carries it
    assert rates[False]["prefetched"] == 0 and rates[True]["prefetched"] > 0
    assert rates[True]["prefetch_hits"] > 0 and rates[True]["hit_rate"] > rates[False]["hit_rate"]
