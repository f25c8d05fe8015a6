"""tree.py: node arithmetic, gists made exactly when spans complete, and the on-disk format (atomic appends,
memory-mapped open, truncated/corrupt/foreign trees refused with one line and nothing on disk changed)."""
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import tree as tree_module
from conftest import ROOT
from tree import MegaContextTree, TreeError, check_folder, children, depth_of, node_span, parent

D, V = 6, 50


def fake_embed(ids):
    """Token id t -> a vector that identifies it: [t, t^2, 1, ...] (exact in fp32 for small t)."""
    t = ids.double()
    return torch.stack([t, t * t] + [torch.ones_like(t)] * (D - 2), -1).float()


class Recorder:
    """gist(lod, x) = sum of the K children + lod, recording every call so tests can see what was pooled."""

    def __init__(self):
        self.calls = []

    def __call__(self, lod, x):
        self.calls.append((lod, x.clone()))
        return x.sum(1) + lod


def make_tree(K=4, identity="model-a", gist=None, dtype="float32"):
    return MegaContextTree(K, D, V, identity, fake_embed, gist or Recorder(), dtype)


def dir_digest(path):
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_tree_node_arithmetic_round_trips():
    for K in (2, 8, 32):
        for lod in range(6):
            for k in (0, 1, K - 1, K, 12345):
                a, b = node_span(lod, k, K)
                assert (a, b) == (k * K**lod, (k + 1) * K**lod)
                pl, pk = parent(lod, k, K)
                pa, pb = node_span(pl, pk, K)
                assert pa <= a and b <= pb and (lod, k) in children(pl, pk, K)
                if lod > 0:
                    kids = children(lod, k, K)
                    child = K ** (lod - 1)
                    assert [node_span(*c, K) for c in (kids[0], kids[-1])] == [(a, a + child), (b - child, b)]
                    assert all(parent(*c, K) == (lod, k) for c in kids)
    lod, idx = torch.tensor([0, 1, 2]), torch.tensor([5, 5, 5])
    assert [t.tolist() for t in node_span(lod, idx, 4)] == [[5, 20, 80], [6, 24, 96]]  # tensors as well as ints


def test_tree_gists_exactly_when_spans_complete():
    """Partial blocks are never pooled; a gist appears with the last token of its span; chunking does not matter."""
    K, n = 4, 4 * 4 * 2 + 4 + 3  # two LOD2 spans, one more block, a ragged 3-token tail
    ids = np.random.default_rng(0).integers(0, V, n)
    rec = Recorder()
    tree = make_tree(K, gist=rec)
    pos = 0
    for chunk in (1, 2, 5, 3, 9, 7, 12):  # odd chunks that straddle block edges
        tree.append(ids[pos:pos + chunk])
        pos += chunk
        assert (len(tree), tree.n_nodes(1), tree.n_nodes(2)) == (pos, pos // K, pos // K**2)
    assert pos == n
    for _, x in rec.calls:
        assert x.shape[1:] == (K, D)  # whole blocks only
    one = make_tree(K)
    one.append(ids)
    for lod in (1, 2):
        every = np.arange(one.n_nodes(lod))
        assert np.array_equal(one.gists(lod, every), tree.gists(lod, every))
    assert np.array_equal(tree.tokens(0, n), ids)


def test_tree_gist_depends_only_on_its_block():
    K = 4
    ids = np.random.default_rng(1).integers(0, V, 3 * K**2)
    a, b = make_tree(K), make_tree(K)
    a.append(ids)
    changed = ids.copy()
    changed[K + 2] = (changed[K + 2] + 1) % V  # a token of block 1 (in LOD2 node 0)
    b.append(changed)
    g1a, g1b = a.gists(1, np.arange(3 * K)), b.gists(1, np.arange(3 * K))
    assert np.array_equal(g1a[0], g1b[0]) and np.array_equal(g1a[2:], g1b[2:])
    assert not np.array_equal(g1a[1], g1b[1])
    g2a, g2b = a.gists(2, np.arange(3)), b.gists(2, np.arange(3))
    assert not np.array_equal(g2a[0], g2b[0]) and np.array_equal(g2a[1:], g2b[1:])
    # LOD2 node k is made from exactly its K LOD1 children: (sum of children) + 2 with the recording gist
    for k in range(3):
        assert np.allclose(g2a[k], g1a[k * K:(k + 1) * K].sum(0) + 2)
    # LOD1 node k is made from exactly tokens [kK, (k+1)K)
    emb = fake_embed(torch.from_numpy(ids)).numpy()
    assert np.allclose(g1a, emb.reshape(-1, K, D).sum(1) + 1)


def test_tree_node_embeddings_gather_mixed_levels():
    K = 4
    tree = make_tree(K)
    ids = np.arange(2 * K**2 + 3) % V
    tree.append(ids)
    lod, index = torch.tensor([2, 1, 1, 0, 0]), torch.tensor([0, 4, 5, 24, 34])
    x = tree.node_embeddings(lod, index)
    assert x.shape == (5, D)
    assert torch.equal(x[0], torch.from_numpy(tree.gists(2, [0])[0]))
    assert torch.equal(x[2], torch.from_numpy(tree.gists(1, [5])[0]))
    assert torch.equal(x[3:], fake_embed(torch.tensor([ids[24], ids[34]])))


def test_tree_rejects_tokens_outside_vocab_unchanged():
    tree = make_tree()
    tree.append([1, 2, 3])
    for bad in ([1, V], [-1], [5, 6, 7, V + 3]):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\)"):
            tree.append(bad)
        assert len(tree) == 3 and tree.n_nodes(1) == 0


def test_tree_save_open_append_round_trip(tmp_path):
    """save -> open (memory-mapped) -> append -> save (in-place append) -> open: contents equal an in-memory tree."""
    K, path = 4, str(tmp_path / "t")
    ids = np.random.default_rng(2).integers(0, V, 200)
    ref = make_tree(K)
    ref.append(ids)
    tree = make_tree(K)
    tree.append(ids[:77])
    tree.save(path, extra={"note": "first"})
    tree, extra = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert extra == {"note": "first"} and isinstance(tree.levels[1].disk, np.memmap) and len(tree) == 77
    tree.append(ids[77:150])
    tree.save(path)
    tree.append(ids[150:])  # unsaved rows live in RAM next to the mapped ones
    for lod in (1, 2):
        idx = np.arange(ref.n_nodes(lod))[::-1].copy()  # any order, across the disk/RAM boundary
        assert np.array_equal(tree.gists(lod, idx), ref.gists(lod, idx))
    tree.save(path)
    again, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert np.array_equal(again.tokens(0, 200), ids)
    for lod in (1, 2):
        every = np.arange(ref.n_nodes(lod))
        assert np.array_equal(again.gists(lod, every), ref.gists(lod, every))
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["counts"] == [200, 50, 12, 3] and meta["levels"] == 4
    assert meta["format_version"] == tree_module.FORMAT_VERSION
    assert meta["K"] == K and meta["d"] == D and meta["identity"] == "model-a"
    assert os.path.getsize(os.path.join(path, "lod1.bin")) == 50 * D * 4


def test_tree_crash_mid_append_leaves_consistent_tree(tmp_path):
    """Bytes past the committed rows (an append that crashed before meta.json) are ignored, then overwritten."""
    K, path = 4, str(tmp_path / "t")
    tree = make_tree(K)
    tree.append(np.arange(40) % V)
    tree.save(path)
    for name in ("tokens.bin", "lod1.bin"):
        with open(os.path.join(path, name), "ab") as f:
            f.write(b"\x13" * 37)  # half-written rows of a crashed append
    tree, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert len(tree) == 40 and np.array_equal(tree.tokens(0, 40), np.arange(40) % V)
    tree.append([1, 2, 3, 4])
    tree.save(path)
    tree, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert np.array_equal(tree.tokens(36, 44), [36, 37, 38, 39, 1, 2, 3, 4])
    assert os.path.getsize(os.path.join(path, "tokens.bin")) == 44 * 4


@pytest.mark.parametrize("damage, message", [
    ("truncate", "is truncated"), ("flip", r"is corrupt \(crc32 mismatch"), ("meta", "meta.json is corrupt"),
    ("missing", "meta.json missing"), ("K", "block size K=4, this session uses K=8"),
    ("model", "built by another model"), ("dim", "built by another model"),
], ids=["truncated", "corrupted-byte", "corrupt-meta", "missing", "other-K", "other-model", "other-width"])
def test_tree_open_refuses_damaged_or_foreign_tree(tmp_path, damage, message):
    K, path = 4, str(tmp_path / "t")
    tree = make_tree(K)
    tree.append(np.arange(100) % V)
    tree.save(path)
    lod1 = os.path.join(path, "lod1.bin")
    if damage == "truncate":
        with open(lod1, "r+b") as f:
            f.truncate(os.path.getsize(lod1) - 5)
    elif damage == "flip":
        with open(lod1, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0x40]))
    elif damage == "meta":
        with open(os.path.join(path, "meta.json"), "w") as f:
            f.write('{"format_version": 1, "K": ')
    elif damage == "missing":
        os.remove(os.path.join(path, "meta.json"))
    before = dir_digest(path)
    K_open, d_open, ident = (8 if damage == "K" else K), (D + 2 if damage == "dim" else D), \
        ("model-b" if damage == "model" else "model-a")
    with pytest.raises(TreeError, match=message) as e:
        MegaContextTree.open(path, K_open, d_open, V, ident, fake_embed, Recorder())
    assert "\n" not in str(e.value)
    assert dir_digest(path) == before


def test_tree_save_refuses_directory_of_another_tree(tmp_path):
    path = str(tmp_path / "t")
    a, b = make_tree(), make_tree()
    a.append([1, 2, 3])
    a.save(path)
    before = dir_digest(path)
    b.append([4, 5])
    with pytest.raises(TreeError, match="already holds a MegaContext tree"):
        b.save(path)
    assert dir_digest(path) == before
    b.save(str(tmp_path / "other"))  # elsewhere it is fine, and "save as" copies a mapped tree whole
    a.save(str(tmp_path / "copy"))
    copy, _ = MegaContextTree.open(str(tmp_path / "copy"), 4, D, V, "model-a", fake_embed, Recorder())
    assert np.array_equal(copy.tokens(0, 3), [1, 2, 3])


def test_tree_float16_storage(tmp_path):
    tree = make_tree(dtype="float16")
    tree.append(np.arange(64) % V)
    tree.save(str(tmp_path / "t"))
    back, _ = MegaContextTree.open(str(tmp_path / "t"), 4, D, V, "model-a", fake_embed, Recorder())
    assert back.gists(1, [0]).dtype == np.float16 and os.path.getsize(str(tmp_path / "t" / "lod1.bin")) == 16 * D * 2
    with pytest.raises(ValueError, match="gist dtype"):
        make_tree(dtype="bfloat16")


def test_tree_files_without_commit_record_are_never_written(tmp_path):
    """tokens.bin / lodN.bin without meta.json (deleted, or lost in a crash): save and open refuse in one line that
    says how to recover, and the files are left as they were."""
    path = str(tmp_path / "t")
    tree = make_tree()
    tree.append(np.arange(100) % V)
    tree.save(path)
    os.remove(os.path.join(path, "meta.json"))
    before = dir_digest(path)
    fresh = make_tree()
    fresh.append([1, 2])
    for call in (lambda: fresh.save(path), lambda: MegaContextTree.open(path, 4, D, V, "model-a", fake_embed,
                                                                         Recorder())):
        with pytest.raises(TreeError, match="holds tree files .* but no commit record .*start over in an empty"):
            call()
    assert dir_digest(path) == before


@contextlib.contextmanager
def unwritable(path):
    """Make folder `path` unwritable, also for root (chattr +i where chmod is not enough); skip where neither works."""
    os.chmod(path, 0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", path], capture_output=True).returncode == 0
    try:
        if os.access(path, os.W_OK) and not immutable:
            pytest.skip("cannot make a folder unwritable here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", path])
        os.chmod(path, 0o755)


def test_tree_save_to_unwritable_folder_fails_before_writing(tmp_path):
    path = str(tmp_path / "t")
    os.makedirs(path)
    tree = make_tree()
    tree.append(np.arange(40) % V)
    with unwritable(path):
        with pytest.raises(TreeError, match="cannot write to .*t .*choose a writable folder"):
            check_folder(path, write=True)
        with pytest.raises(TreeError, match="cannot write to"):
            tree.save(os.path.join(path, "sub"))  # a folder save would create inside it
        assert check_folder(path, write=False) is False  # reading needs no write access
    assert os.listdir(path) == []
# ----------------------------------------------------------------------------------------------------------------
# any depth: levels are born as the history grows; format v2; v1 trees open and extend; crash safety of a save that
# creates a level


def test_tree_depth_grows_a_level_per_K_gists():
    """A level is born exactly when K gists of the current top exist; every level holds len // K**l nodes; the top
    holds fewer than K; chunking across level births does not change a single gist."""
    K, n = 2, 600  # depth 9 at 512 tokens
    ids = np.random.default_rng(3).integers(0, V, n)
    tree, pos = make_tree(K), 0
    for chunk in (1, 1, 3, 2, 9, 17, 30, 1, 64, 100, 1, 250, 121):
        tree.append(ids[pos:pos + chunk])
        pos += chunk
        assert tree.depth == depth_of(pos, K) and (pos < K**tree.depth * K)
        assert [tree.n_nodes(l) for l in range(tree.depth + 2)] == [pos // K**l for l in range(tree.depth + 1)] + [0]
        assert 1 <= tree.n_nodes(tree.depth) < K or tree.depth == 0
    assert pos == n and tree.depth == 9
    one = make_tree(K)
    one.append(ids)
    for lod in range(1, 10):
        every = np.arange(one.n_nodes(lod))
        assert np.array_equal(one.gists(lod, every), tree.gists(lod, every))
        # LOD l node k = (sum of its K children) + l with the recording gist, at every level
        below = fake_embed(torch.from_numpy(ids)).numpy() if lod == 1 else one.gists(lod - 1, np.arange(len(every) * K))
        assert np.allclose(one.gists(lod, every), below[:len(every) * K].reshape(-1, K, D).sum(1) + lod)


def write_v1(path, tree):
    """The format of this code before issue 11, written independently: tokens.bin, lod1.bin, lod2.bin and a
    version-1 meta.json with three counts (LOD3 and above did not exist)."""
    os.makedirs(path)
    counts, crcs = [], []
    for lod, name in enumerate(("tokens.bin", "lod1.bin", "lod2.bin")):
        n = len(tree) // tree.K**lod
        rows = (tree.tokens(0, n).astype(np.int32) if lod == 0 else np.zeros((0, D), np.float32) if n == 0
                else tree.gists(lod, np.arange(n)).astype(np.float32))
        open(os.path.join(path, name), "wb").write(rows.tobytes())
        counts.append(n)
        crcs.append(zlib.crc32(rows.tobytes()))
    meta = {"format_version": 1, "K": tree.K, "d": D, "dtype": "float32", "token_dtype": "int32", "vocab_size": V,
            "identity": "model-a", "counts": counts, "crc32": crcs, "extra": {"note": "v1"}}
    open(os.path.join(path, "meta.json"), "w").write(json.dumps(meta))


@pytest.mark.parametrize("n", [3, 37, 300], ids=["no-gists", "lod1-only", "lod2-and-above"])
def test_tree_v1_opens_and_extends_without_loss(tmp_path, n):
    K, path = 4, str(tmp_path / "v1")
    ids = np.random.default_rng(4).integers(0, V, n + 90)
    ref = make_tree(K)
    ref.append(ids[:n])
    write_v1(path, ref)
    before = dir_digest(path)
    tree, extra = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert extra == {"note": "v1"} and dir_digest(path) == before  # opening writes nothing
    assert tree.depth == ref.depth == depth_of(n, K)  # 300 tokens at K=4: LOD3 and LOD4 made on open
    for lod in range(1, tree.depth + 1):
        every = np.arange(ref.n_nodes(lod))
        assert np.array_equal(tree.gists(lod, every), ref.gists(lod, every))
    tree.append(ids[n:])
    ref.append(ids[n:])
    tree.save(path)  # extended and written back as v2, the v1 rows kept in place
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["format_version"] == tree_module.FORMAT_VERSION
    assert meta["levels"] == ref.depth + 1 and meta["counts"][0] == n + 90
    with open(os.path.join(path, "tokens.bin"), "rb") as f:
        assert f.read(4 * n) == ids[:n].astype(np.int32).tobytes()
    again, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert np.array_equal(again.tokens(0, n + 90), ids)
    for lod in range(1, ref.depth + 1):
        every = np.arange(ref.n_nodes(lod))
        assert np.array_equal(again.gists(lod, every), ref.gists(lod, every))


class Crash(Exception):
    pass


def test_tree_crash_at_every_point_of_a_save_that_creates_a_level(tmp_path, monkeypatch):
    """A save that appends rows and creates LOD3 is cut at each of its durable steps, with torn bytes left in every
    file (and a leftover lod3.bin): the directory opens as the last commit until meta.json is replaced, as the new one
    after; either way the next save completes it, and it equals a tree that never crashed."""
    K = 4
    ids = np.random.default_rng(5).integers(0, V, 80)
    committed = str(tmp_path / "committed")
    first = make_tree(K)
    first.append(ids[:60])  # depth 2: 3 LOD2 gists
    first.save(committed)
    whole = make_tree(K)
    whole.append(ids)  # 80 tokens: 5 LOD2 gists, so LOD3 is born
    points = []
    monkeypatch.setattr(tree_module, "_crash_point", points.append)
    probe = str(tmp_path / "probe")
    shutil.copytree(committed, probe)
    t, _ = MegaContextTree.open(probe, K, D, V, "model-a", fake_embed, Recorder())
    t.append(ids[60:])
    t.save(probe)
    assert "write lod3.bin" in points and points.index("write lod3.bin") < points.index("write meta.json")

    def crash_at(k):
        calls = []

        def point(what):
            calls.append(what)
            if len(calls) == k + 1:
                raise Crash(what)
        return point

    for k, what in enumerate(points):
        path = str(tmp_path / f"crash{k}")
        shutil.copytree(committed, path)
        t, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
        t.append(ids[60:])
        monkeypatch.setattr(tree_module, "_crash_point", crash_at(k))
        with pytest.raises(Crash):
            t.save(path)
        monkeypatch.setattr(tree_module, "_crash_point", lambda what: None)
        for name in ("tokens.bin", "lod1.bin", "lod2.bin", "lod3.bin"):
            with open(os.path.join(path, name), "ab") as f:
                f.write(b"\x5a" * 23)  # torn rows of the interrupted write
        after_commit = k > points.index("write meta.json")
        t, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
        n = 80 if after_commit else 60
        assert len(t) == n and t.depth == depth_of(n, K), what
        assert np.array_equal(t.tokens(0, n), ids[:n])
        t.append(ids[n:])
        t.save(path)
        t, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
        assert len(t) == 80 and t.depth == 3, what
        for lod in range(1, 4):
            every = np.arange(whole.n_nodes(lod))
            assert np.array_equal(t.gists(lod, every), whole.gists(lod, every)), (what, lod)
        assert os.path.getsize(os.path.join(path, "lod3.bin")) == 1 * D * 4


@pytest.mark.parametrize("saved", [True, False], ids=["memory-mapped", "ram-tail"])
def test_tree_rewrite_remakes_every_gist_above_and_leaves_files_alone(tmp_path, saved):
    """rewrite(start, tokens) equals a tree built from the rewritten history at every level (a span across two
    blocks, under a partial top); committed rows change through a copy-on-write map, the files do not, and the
    rewritten tree refuses to save."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, 4**5 + 77)
    t = make_tree()
    t.append(ids)
    if saved:
        t.save(str(tmp_path / "t"))
        before = dir_digest(tmp_path / "t")
    new = ids.copy()
    new[301:308] = [7, 8, 9, 10, 11, 12, 13]  # crosses a LOD1 boundary at 304
    calls = len(t.gist.calls)
    t.rewrite(301, new[301:308])
    fresh = make_tree()
    fresh.append(new)
    assert t.tokens(0, len(t)).tolist() == new.tolist()
    for lod in range(1, t.depth + 1):
        idx = np.arange(t.n_nodes(lod))
        np.testing.assert_allclose(t.gists(lod, idx), fresh.gists(lod, idx), rtol=1e-6)
    assert len(t.gist.calls) - calls <= t.depth  # one batched call per level, not a re-ingest
    assert not np.allclose(t.gists(5, [0]), make_tree_gists(ids, 5))
    with pytest.raises(ValueError, match="outside the history"):
        t.rewrite(len(ids) - 3, [1, 2, 3, 4])
    with pytest.raises(TreeError, match="rewritten in memory"):
        t.save(str(tmp_path / "t"))
    if saved:
        assert dir_digest(tmp_path / "t") == before


def make_tree_gists(ids, lod):
    t = make_tree()
    t.append(ids)
    return t.gists(lod, [0])


def test_tree_token_types_at_every_level_follow_appends_and_rewrites(monkeypatch):
    """types(lod, index) is the set of ids in each node's span, from the tokens below TYPE_SPAN and from the RAM
    bitsets at and above it (made lazily, extended after appends, remade over a rewrite)."""
    monkeypatch.setattr(tree_module, "TYPE_SPAN", 16)  # K = 4: LOD2 and up keep bitsets
    rng = np.random.default_rng(5)
    ids = rng.integers(0, V - 1, 4**5 + 300)  # id V - 1 never occurs in the text
    t = make_tree()
    t.append(ids[:4**4 + 9])

    def expect(lod, index):
        a, b = node_span(lod, index, 4)
        return np.isin(np.arange(V), t.tokens(a, b))

    def check():
        for lod in range(t.depth + 1):
            idx = np.arange(t.n_nodes(lod))[::7]
            got = t.types(np.full(len(idx), lod), idx)
            assert got.shape == (len(idx), V)
            assert all((got[j] == expect(lod, int(i))).all() for j, i in enumerate(idx))

    check()
    assert set(t._types) == {(2, 0), (3, 0), (4, 0)}
    t.append(ids[4**4 + 9:])  # a level is born; the bitsets extend on the next use
    check()
    assert len(t._types[5, 0]) == 1 and len(t._types[2, 0]) == t.n_nodes(2)
    t.rewrite(700, [V - 1] * 3)
    check()
    top = t.types([5, 4, 1], [0, 700 // 256, 700 // 4])
    assert top[:, V - 1].all() and not t.types([4], [0])[0, V - 1]  # the rare id shows at every level above it


def test_tree_types_after_markers_and_margin_against_a_brute_force(monkeypatch):
    """types(..., markers, margin): the second half marks the ids whose predecessor is one of the top `markers` ids
    (also across a node boundary), and every span starts `margin` tokens earlier and takes in the token after it
    (clipped to the history); the RAM bitsets (at and above TYPE_SPAN) agree with a loop over the tokens at every
    level, after appends and a rewrite that plants a marker."""
    monkeypatch.setattr(tree_module, "TYPE_SPAN", 16)  # K = 4: LOD2 and up keep bitsets
    rng = np.random.default_rng(6)
    markers = 2  # ids V - 2 and V - 1
    ids = rng.integers(0, V, 4**5 + 77)
    t = make_tree()
    t.append(ids[:4**4 + 5])

    def expect(lod, index, margin):
        a, b = node_span(lod, index, 4)
        tok = t.tokens(0, len(t))
        present, tagged = np.zeros(V, bool), np.zeros(V, bool)
        for p in range(max(0, a - margin), min(len(tok), b + (margin > 0))):
            present[tok[p]] = True
            tagged[tok[p]] |= p >= 1 and tok[p - 1] >= V - markers
        return np.concatenate([present, tagged])

    def check():
        for margin in (0, 3):
            for lod in range(t.depth + 1):
                idx = np.arange(t.n_nodes(lod))[::5]
                got = t.types(np.full(len(idx), lod), idx, markers, margin)
                assert got.shape == (len(idx), 2 * V)
                for j, i in enumerate(idx):
                    assert (got[j] == expect(lod, int(i), margin)).all(), (lod, int(i), margin)

    check()
    t.append(ids[4**4 + 5:])
    check()
    t.rewrite(511, [V - 1])  # the last token of a LOD2 node: the id after it is now tagged, in the next node
    check()
    assert t.types([2], [512 // 16], markers)[0, V + int(t.tokens(512, 513)[0])]


# ----------------------------------------------------------------------------------------------------------------
# issue 18: one writer per tree, never beside foreign files, a full disk loses nothing


def hold_lock_in_another_process(path):
    """A real second process that takes the tree's lock and keeps it until killed; returns it once it holds it."""
    code = f"import sys, time; sys.path.insert(0, {ROOT!r}); import tree; tree.TreeLock({path!r}).__enter__(); " \
           "print('locked', flush=True); time.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_tree_lock_one_writer_names_the_holder_and_a_dead_one_is_taken_over(tmp_path):
    """A second writer (lock or save) is refused in one line naming the live holder's pid, host and start, and
    changes nothing; once the holder is killed (-9, its lock file left behind) the next writer takes the lock over;
    a release removes the lock file and, when the lock made the folder, the empty folder."""
    path = str(tmp_path / "t")
    t = make_tree()
    t.append(np.arange(40) % V)
    t.save(path)
    holder = hold_lock_in_another_process(path)
    try:
        before = dir_digest(path)
        for attempt in (lambda: tree_module.TreeLock(path).__enter__(), lambda: t.save(path)):
            with pytest.raises(TreeError, match=rf"is in use by another session \(pid {holder.pid} on "
                                                rf"{socket.gethostname()} since 20\d\d-") as e:
                attempt()
            assert "\n" not in str(e.value) and "read-only" in str(e.value)
            assert dir_digest(path) == before
        assert MegaContextTree.open(path, 4, D, V, "model-a", fake_embed, Recorder())[0].tokens(0, 3).tolist() == \
            [0, 1, 2]  # a reader needs no lock
    finally:
        holder.kill()
        holder.wait()
    assert json.load(open(os.path.join(path, "lock")))["pid"] == holder.pid  # stale: its process is dead
    with tree_module.TreeLock(path):
        assert json.load(open(os.path.join(path, "lock")))["pid"] == os.getpid()
        t.append([1, 2, 3])
        t.save(path)  # the session's own lock serves its saves
    assert "lock" not in os.listdir(path) and json.load(open(os.path.join(path, "meta.json")))["counts"][0] == 43
    fresh = str(tmp_path / "new" / "t")
    with tree_module.TreeLock(fresh):
        assert os.listdir(fresh) == ["lock"]
    assert not os.path.exists(fresh)  # made by the lock, left empty: gone again


def test_tree_lock_released_between_open_and_flock_is_locked_anew(tmp_path, monkeypatch):
    """The holder unlinks the lock file as it releases: an acquirer that opened the old file before that and locks
    it after must notice and lock the new file, or two writers would each hold 'the' lock."""
    path = str(tmp_path / "t")
    first = tree_module.TreeLock(path).__enter__()
    real_flock, calls = fcntl.flock, []

    def flock_after_release(fd, op):
        calls.append(fd)
        if len(calls) == 1:
            first.__exit__()  # the holder releases (and unlinks) right between our open and our flock
        return real_flock(fd, op)

    monkeypatch.setattr(tree_module.fcntl, "flock", flock_after_release)
    second = tree_module.TreeLock(path).__enter__()
    monkeypatch.setattr(tree_module.fcntl, "flock", real_flock)
    assert len(calls) == 2  # the first flock won the unlinked file, so it locked the folder's new one
    with pytest.raises(TreeError, match="in use by another session"):
        tree_module.TreeLock(path).__enter__()
    second.__exit__()


@pytest.mark.parametrize("files, found", [
    ({"notes.txt": b"my notes"}, "notes.txt"),
    ({"config.json": b"{}", "log.jsonl": b"{}\n", "ckpt.pt": b"PK"}, "ckpt.pt, config.json, log.jsonl"),
    ({"meta.json": b'{"vocab_size": 512, "splits": {}}', "tokenizer.json": b"{}", "train.bin": b"\0\0"},
     "meta.json (not a tree's), tokenizer.json, train.bin"),
    ({"meta.json": b'{"vocab_size": 512, "splits": {}}'}, "meta.json (not a tree's)"),
], ids=["notes", "training-out-dir", "prepared-data", "foreign-meta"])
def test_tree_never_written_beside_foreign_files(tmp_path, files, found):
    """A folder that is neither empty nor a tree (a user's notes, a training run, prepared data) is refused in one
    line naming what was found, by check_folder and by save, and nothing in it changes; a committed tree with a
    stranger's file beside it is still a tree (saves touch only the tree's own names)."""
    path = tmp_path / "f"
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    before = dir_digest(str(path))
    t = make_tree()
    t.append(np.arange(20) % V)
    for attempt in (lambda: check_folder(str(path), write=False), lambda: t.save(str(path))):
        with pytest.raises(TreeError) as e:
            attempt()
        assert str(e.value) == (f"{path} is not empty and holds no MegaContext tree (found {found}); nothing was "
                                "written: a tree goes into an empty folder or the folder of a saved tree")
    assert dir_digest(str(path)) == before
    tree_dir = str(tmp_path / "t")
    t.save(tree_dir)
    open(os.path.join(tree_dir, "notes.txt"), "w").write("mine")
    t.append([1, 2])
    t.save(tree_dir)
    assert open(os.path.join(tree_dir, "notes.txt")).read() == "mine"


class DiskFullAt:
    """_crash_point replacement: ENOSPC at one durable step of a save (and, for a realistic tear, half a row of
    garbage already written into the level file it was writing)."""

    def __init__(self, at, path):
        self.at, self.path = at, path

    def __call__(self, what):
        if what == self.at:
            if what.startswith("write lod") or what == "write tokens.bin":
                with open(os.path.join(self.path, what.split()[1]), "ab") as f:
                    f.write(b"\x77" * 5)
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("case", ["new-folder", "append", "append-new-level"])
def test_tree_save_on_a_full_disk_leaves_the_previous_generation(tmp_path, monkeypatch, case):
    """ENOSPC at every durable step of a save (injected), and a save the free-space check refuses: one line saying
    what the folder keeps; the folder opens as its previous generation (a new folder: nothing, no orphan tokens.bin
    or temp file that would get it refused later); the tree in memory keeps its rows and saves once there is room."""
    K, path = 4, str(tmp_path / "t")
    ids = np.random.default_rng(6).integers(0, V, 80)
    t = make_tree(K)
    if case != "new-folder":
        t.append(ids[:60] if case == "append-new-level" else ids[:40])  # 60 -> 80 tokens at K=4 births LOD3
        t.save(path)
    n_prev = len(t)
    points = []
    monkeypatch.setattr(tree_module, "_crash_point", points.append)
    probe = make_tree(K)
    probe.append(ids[:len(t)])
    if case != "new-folder":
        probe.save(str(tmp_path / "probe"))
        probe, _ = MegaContextTree.open(str(tmp_path / "probe"), K, D, V, "model-a", fake_embed, Recorder())
    probe.append(ids[len(t):])
    probe.save(str(tmp_path / "probe"))
    free = [1 << 40]
    monkeypatch.setattr(tree_module.durable, "free_bytes", lambda p: free[0])
    t.append(ids[len(t):])
    for at in points[:points.index("write meta.json") + 1] + ["no room"]:  # (after the commit nothing is written)
        before = dir_digest(path) if os.path.exists(path) else None
        free[0] = 1000 if at == "no room" else 1 << 40
        monkeypatch.setattr(tree_module, "_crash_point", DiskFullAt(at, path))
        with pytest.raises(TreeError) as e:
            t.save(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"cannot save the tree to {path} ("), msg
        assert ("No space left on device" if at != "no room" else "no room for") in msg
        assert msg.endswith("nothing was saved there" if case == "new-folder" else
                            f"it keeps its last saved generation ({n_prev} tokens)"), msg
        if case == "new-folder":
            assert not os.path.exists(path), (at, os.listdir(path))
        else:
            assert dir_digest(path) == before, at  # byte for byte: truncated back, new files removed
            back, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
            assert len(back) == n_prev
    monkeypatch.setattr(tree_module, "_crash_point", lambda what: None)
    free[0] = 1 << 40
    t.save(path)
    back, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert np.array_equal(back.tokens(0, 80), ids) and back.depth == 3
    assert sorted(os.listdir(path)) == sorted(["meta.json", "tokens.bin", "lod1.bin", "lod2.bin", "lod3.bin"])


def test_tree_access_telemetry_persists_and_a_v2_tree_is_upgraded(tmp_path, monkeypatch):
    """Expansions and last access per node survive save -> open; a v2 tree (no telemetry) opens and is written as v3
    by its first save; a save cut at each durable step keeps the committed telemetry or the new one, never a mix."""
    K, path = 4, str(tmp_path / "t")
    t = make_tree(K)
    t.append(np.arange(100) % V)
    t.save(path)
    meta = json.load(open(os.path.join(path, "meta.json")))
    v2 = {k: v for k, v in meta.items() if k not in ("token_file", "holes", "generation", "tags", "curation", "access")}
    open(os.path.join(path, "meta.json"), "w").write(json.dumps({**v2, "format_version": 2}))
    t, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert t.access == {} and t.generation == 0
    t.record_expansion(2, 1)
    t.append([1, 2])
    t.record_expansion(1, 3)
    t.record_expansion(2, 1)
    assert t.access == {(2, 1): [2, 102], (1, 3): [1, 102]}
    t.save(path)
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["format_version"] == 3 and meta["access"]["rows"] == 2
    assert sorted(n for n in os.listdir(path) if n.startswith("access")) == ["access.1.bin"]
    t, _ = MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
    assert t.access == {(2, 1): [2, 102], (1, 3): [1, 102]}
    assert t.access_rows().tolist() == [[1, 3, 1, 102], [2, 1, 2, 102]]
    points = []
    monkeypatch.setattr(tree_module, "_crash_point", points.append)
    t.save(path)  # nothing new: the committed access file stays
    assert sorted(n for n in os.listdir(path) if n.startswith("access")) == ["access.1.bin"]
    assert "write access telemetry" in points
    old = {(2, 1): [2, 102], (1, 3): [1, 102]}
    for k, what in enumerate(points):
        calls, where = [], str(tmp_path / f"crash{k}")
        shutil.copytree(path, where)

        def point(w, k=k):
            calls.append(w)
            if len(calls) == k + 1:
                raise Crash(w)
        t, _ = MegaContextTree.open(where, K, D, V, "model-a", fake_embed, Recorder())
        t.append([5])
        t.record_expansion(1, 20)
        monkeypatch.setattr(tree_module, "_crash_point", point)
        with pytest.raises(Crash):
            t.save(where)
        monkeypatch.setattr(tree_module, "_crash_point", lambda w: None)
        again, _ = MegaContextTree.open(where, K, D, V, "model-a", fake_embed, Recorder())
        committed = k > points.index("write meta.json")
        assert again.access == ({**old, (1, 20): [1, 103]} if committed else old), what
        assert len(again) == 102 + committed, what
        t.save(where)  # the retried save completes; one access file is left
        assert sorted(n for n in os.listdir(where) if n.startswith("access")) == ["access.2.bin"], what
    with open(os.path.join(path, "access.1.bin"), "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(TreeError, match="access telemetry .* corrupt"):
        MegaContextTree.open(path, K, D, V, "model-a", fake_embed, Recorder())
