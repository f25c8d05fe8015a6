"""curate.py: protected spans are never curated, apply -> restore is byte-identical, a crash at every durable step of
an apply leaves one whole generation, bad input is one line; a session on a curated tree never zooms into dropped
tokens and records its zooms in the tree's access telemetry."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import curate
import tree as tree_module
from conftest import ROOT
from curate import CurationPolicy
from test_tree import D, V, Recorder, fake_embed, make_tree
from tree import FILL, MegaContextTree, TreeError, TreeLock

K, N = 4, 400  # 100 blocks of 4 tokens, depth 4


def saved_tree(path, n=N, accessed=(), tags=()):
    """A tree of n tokens at `path` whose LOD1 nodes `accessed` were expanded (at history length 10)."""
    t = make_tree(K)
    t.append(np.random.default_rng(0).integers(0, V, 10))
    for k in accessed:
        t.record_expansion(1, k)
    t.append(np.random.default_rng(1).integers(0, V, n - 10))
    for name, a, b in tags:
        t.tag(name, a, b)
    t.save(path, extra={"note": "session state"})
    return t


def reopen(path):
    return MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())[0]


def tree_digest(path):
    """sha of every file of the tree itself (not the lock, not curate/)."""
    import hashlib
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))
            if n not in ("lock", "curate")}


POLICY = CurationPolicy(min_age=40, keep_recent=20, max_expansions=0, min_idle=1000)
DELETE = CurationPolicy(min_age=40, keep_recent=20, max_expansions=0, min_idle=1000, delete_age=100)


def test_curate_delete_drops_lod1_gists_of_old_unused_spans(tmp_path):
    """delete_age: LOD2 spans (16 tokens at K=4) old enough, all of whose blocks are compacted, lose their LOD1 gists;
    a span holding a zoomed block keeps them; sessions see LOD2 there as not expandable; restore is exact."""
    path = str(tmp_path / "t")
    ref = saved_tree(path, accessed=(3,), tags=[("keep", 64, 80)])  # block 3: LOD2 node 0; tag: LOD2 node 4
    before = tree_digest(path)
    policy = CurationPolicy(min_age=40, keep_recent=20, min_idle=0, delete_age=100, protect_tags=["keep"])
    p = curate.plan(reopen(path), policy)
    # LOD2 nodes ending <= 300 (0..17), less node 0 (a zoomed block) and node 4 (tagged)
    assert p["delete_spans"] == 16 and p["gist_bytes_saved"] == 16 * K * D * 4
    curate.apply(path, policy)
    t = reopen(path)
    assert t.level_holes(1) == [[4, 16], [20, 72]] and t.levels[1].stored == len(ref.levels[1]) - 16 * K
    assert os.path.getsize(os.path.join(path, t.file(1))) == t.levels[1].stored * D * 4
    assert list(t.expandable([2] * 5, [0, 1, 4, 17, 18])) == [True, False, True, False, True]
    assert not t.node_embeddings(torch.tensor([1]), torch.tensor([5])).any()  # a deleted gist reads as zeros
    for lod in range(2, t.depth + 1):  # LOD2 and above: every gist kept
        assert np.array_equal(t.gists(lod, np.arange(t.n_nodes(lod))), ref.gists(lod, np.arange(t.n_nodes(lod))))
    kept = np.array([0, 1, 2, 3, 16, 17, 18, 19, 72, 99])
    assert np.array_equal(t.gists(1, kept), ref.gists(1, kept))
    t.append(np.arange(30) % V)  # a session goes on: appends to the new generation's files
    t.save(path)
    t = reopen(path)
    assert len(t) == N + 30 and t.level_holes(1) == [[4, 16], [20, 72]]
    curate.restore(path)
    assert tree_digest(path) == before


def test_curate_never_touches_protected_or_accessed_spans(tmp_path):
    path = str(tmp_path / "t")
    ref = saved_tree(path, accessed=(3, 17), tags=[("book", 100, 130)])
    policy = CurationPolicy(min_age=40, keep_recent=20, min_idle=0, protect_tags=["book"],
                            protect_ranges=[[201, 202], [250, 262]])
    p = curate.plan(reopen(path), policy)
    assert p["compact_blocks"] > 50 and p["kept_accessed"] == 2 and p["bytes_after"] < p["bytes_before"]
    curate.apply(path, policy, "inline")
    t = reopen(path)
    protected = [(25, 33), (50, 51), (62, 66), (3, 4), (17, 18)]  # blocks: tags, ranges, accessed
    for a, b in protected:
        assert np.array_equal(t.tokens(a * K, b * K), ref.tokens(a * K, b * K))
        assert t.expandable([1] * (b - a), range(a, b)).all()
    assert not t.expandable([1], [0])[0] and (t.tokens(0, K) == FILL).all()  # an old, never zoomed block
    assert np.array_equal(t.tokens(N - 40, N), ref.tokens(N - 40, N))  # younger than min_age: kept
    assert (t.tokens(N - 44, N - 40) == FILL).all()
    assert t.levels[0].stored == N - K * p["compact_blocks"] and len(t) == N
    for lod in range(1, t.depth + 1):  # every gist kept
        every = np.arange(t.n_nodes(lod))
        assert np.array_equal(t.gists(lod, every), ref.gists(lod, every))
    dropped = [[a // K, b // K] for a, b in t.holes]
    assert all(b <= pa or a >= pb for a, b in dropped for pa, pb in protected)
    assert t.access == ref.access and t.tags == ref.tags and t.curation["compact_blocks"] == p["compact_blocks"]
    # a second apply with the same policy finds nothing; a session-style append and save keeps the holes
    assert curate.apply(path, policy)["compact_blocks"] == 0
    t.append([1, 2, 3, 4, 5])
    t.save(path)
    t = reopen(path)
    assert len(t) == N + 5 and t.holes and list(t.tokens(N, N + 5)) == [1, 2, 3, 4, 5]


def test_curate_apply_then_restore_is_byte_identical(tmp_path):
    path = str(tmp_path / "t")
    saved_tree(path, accessed=(5,), tags=[("x", 0, 8)])
    before = tree_digest(path)
    curate.apply(path, POLICY)
    assert tree_digest(path) != before and reopen(path).generation == 1
    t = reopen(path)  # a session goes on after the apply: more rows, a new level file, new telemetry
    t.append(np.random.default_rng(2).integers(0, V, 700))
    t.record_expansion(2, 1)
    t.save(path)
    curate.restore(path)
    assert tree_digest(path) == before
    assert reopen(path).generation == 0 and not os.path.exists(os.path.join(path, "curate", "gen0"))
    log = [json.loads(x) for x in open(os.path.join(path, "curate", "audit.jsonl"))]
    assert [r["op"] for r in log] == ["apply", "restore"] and log[0]["compact_blocks"] > 0
    with pytest.raises(TreeError, match="no previous generation"):
        curate.restore(path)


class Crash(Exception):
    pass


@pytest.mark.parametrize("policy", [POLICY, DELETE], ids=["compact", "compact-and-delete"])
def test_curate_crash_at_every_point_of_apply_leaves_one_whole_generation(tmp_path, monkeypatch, policy):
    base = str(tmp_path / "base")
    ref = saved_tree(base, accessed=(2,))
    points = []
    monkeypatch.setattr(curate, "_crash_point", points.append)
    probe = str(tmp_path / "probe")
    shutil.copytree(base, probe)
    curate.apply(probe, policy)
    monkeypatch.setattr(curate, "_crash_point", lambda what: None)
    after = reopen(probe)
    assert len(points) == 5 + (policy is DELETE) and bool(after.level_holes(1)) == (policy is DELETE)
    for k, what in enumerate(points):
        path = str(tmp_path / f"crash{k}")
        shutil.copytree(base, path)
        before = tree_digest(path)

        def crash(w, k=k, seen=[]):
            seen.append(w)
            if len(seen) == k + 1:
                raise Crash(w)
        monkeypatch.setattr(curate, "_crash_point", crash)
        with pytest.raises(Crash):
            curate.apply(path, policy)
        monkeypatch.setattr(curate, "_crash_point", lambda what: None)
        t = reopen(path)  # opens (checksums verified) as one whole generation
        if t.generation == 0:
            assert np.array_equal(t.tokens(0, N), ref.tokens(0, N)), what
            assert {n: h for n, h in tree_digest(path).items() if n in before} == before, what
        else:
            assert t.generation == 1 and np.array_equal(t.tokens(0, N), after.tokens(0, N)), what
        for lod in range(1, t.depth + 1):
            every = np.arange(t.n_nodes(lod))
            assert np.array_equal(t.gists(lod, every), (ref if t.generation == 0 else after).gists(lod, every)), what
        if t.generation == 0:  # the interrupted apply can be run again, and it lands where an uninterrupted one did
            curate.apply(path, policy)
        assert np.array_equal(reopen(path).tokens(0, N), after.tokens(0, N)), what
        curate.restore(path)
        assert np.array_equal(reopen(path).tokens(0, N), ref.tokens(0, N)), what


def test_curate_cli_bad_input_is_one_line(tmp_path, capsys):
    path = str(tmp_path / "t")
    saved_tree(path)
    pol = tmp_path / "p.py"
    cases = []
    cases.append((["report", "--tree", str(tmp_path / "none"), "--policy", "configs/curate/default.py"],
                  "no MegaContext tree"))
    pol.write_text("min_age = 'old'\n")
    cases.append((["report", "--tree", path, "--policy", str(pol)], "min_age must be int"))
    cases.append((["report", "--tree", path, "--policy", str(tmp_path / "missing.py")], "config file not found"))
    (tmp_path / "q.py").write_text("protect_tags = ['nope']\n")
    cases.append((["apply", "--tree", path, "--policy", str(tmp_path / "q.py")], "which this tree does not have"))
    cases.append((["restore", "--tree", path], "no previous generation"))
    cases.append((["report", "--tree", path], "needs --policy"))
    cases.append((["apply", "--tree", str(tmp_path / "none"), "--policy", "configs/curate/default.py"],
                  "no MegaContext tree"))
    for argv, message in cases:
        assert curate.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(tmp_path / "none")  # (the lock never made the folder)
    before = tree_digest(path)
    with TreeLock(path):  # a writer holds the tree
        assert curate.main(["apply", "--tree", path, "--policy", "configs/curate/default.py"]) == 1
        err = capsys.readouterr().err
        assert "is in use by another session" in err and err.count("\n") == 1
    assert tree_digest(path) == before


def test_curate_cli_report_apply_restore_tag(tmp_path, capsys):
    """The command line: tag, report (a dry run: nothing changes), apply (the real script), restore."""
    path = str(tmp_path / "t")
    saved_tree(path)
    pol = tmp_path / "p.py"
    pol.write_text("min_age = 40\nkeep_recent = 20\nprotect_tags = ['intro']\n")
    before = tree_digest(path)
    assert curate.main(["tag", "--tree", path, "--name", "intro", "--span", "0:40"]) == 0
    tagged = tree_digest(path)
    assert curate.main(["report", "--tree", path, "--policy", str(pol)]) == 0
    out = capsys.readouterr().out
    assert "compact: 80 blocks (320 tokens)" in out and "kept as protected: 10" in out
    assert tree_digest(path) == tagged  # a dry run
    assert tagged["tokens.bin"] == before["tokens.bin"] and tagged["meta.json"] != before["meta.json"]
    env = {**os.environ, "MC_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "curate.py", "apply", "--tree", path, "--policy", str(pol)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generation 1: 80 blocks compacted" in r.stdout, r.stderr
    assert curate.main(["restore", "--tree", path]) == 0 and tree_digest(path) == tagged


# ----------------------------------------------------------------------------------------------------------------
# a session over a curated tree


def test_session_records_zooms_and_never_expands_into_dropped_tokens(tmp_path):
    from megacontext import recency_scores
    from session import Session
    from test_megacontext import mc_model
    m = mc_model(w_max=96, recent_tokens=16)
    s = Session(m)
    s.ingest(torch.randint(0, 97, (2500,)).tolist())
    p, q = 300, 1000  # two old tokens: q's block is zoomed (and so kept), p's is not

    def wants(pos):
        def scorer(wc):
            return recency_scores(wc, s.cfg.target) + 20.0 * ((wc.lod > 0) & (wc.start <= pos) & (wc.end > pos))
        return scorer

    def level_at(wc, pos):
        return int(wc.lod[int(((wc.start <= pos) & (wc.end > pos)).nonzero())])

    s.refocus(until_stable=True, scorer=wants(q))
    assert level_at(s.wc, q) == 0
    Kb = s.cfg.K
    assert s.tree.access[1, q // Kb][0] == 1 and s.tree.access[1, q // Kb][1] == 2500  # the zoom, recorded
    path, deep = str(tmp_path / "s"), str(tmp_path / "deep")
    s.save(path)
    shutil.copytree(path, deep)
    curate.apply(path, CurationPolicy(min_age=500, keep_recent=100, min_idle=0))
    t = Session.open(m, path)
    assert t.tree.access == s.tree.access and (t.tree.tokens(p - p % Kb, p - p % Kb + Kb) == FILL).all()
    assert level_at(t.wc, q) == 0  # the saved working context keeps the zoom into kept tokens
    t.refocus(until_stable=True, scorer=wants(p))
    assert level_at(t.wc, p) == 1  # zoomed down to the gist over dropped tokens, and no further
    assert not t.wc.can_expand()[((t.wc.start <= p) & (t.wc.end > p))].any()
    t.wc.check_invariants(t.cfg.target)
    t.step()  # decodes over the curated tree
    lens = Session.open(m, path)  # LensNet's policy: its previews read the children of gists over dropped tokens
    assert lens.cfg.policy == "lens" and lens.cfg.lens_preview == 1
    x = lens.tree.node_embeddings(torch.tensor([0, 0]), torch.tensor([p, q]))
    assert not x[0].any() and x[1].any()  # a dropped token reads as zeros, a kept one as its embedding
    lens.refocus(until_stable=True)
    lens.wc.check_invariants(lens.cfg.target)
    lens.step()
    curate.apply(deep, CurationPolicy(min_age=500, keep_recent=100, min_idle=0, delete_age=1000))
    d = Session.open(m, deep)  # p's LOD1 gists are deleted too: the zoom stops at LOD2
    assert d.tree.dropped(1, [p // Kb])[0] and not d.tree.dropped(1, [q // Kb])[0]
    assert level_at(d.wc, q) == 0  # the saved zoom into kept tokens survives
    d.refocus(until_stable=True, scorer=wants(p))
    assert level_at(d.wc, p) == 2
    d.wc.check_invariants(d.cfg.target)
    d.step()
    with pytest.raises(ValueError, match="curation dropped"):
        t.wc.expand(int(((t.wc.start <= p) & (t.wc.end > p)).nonzero()))
