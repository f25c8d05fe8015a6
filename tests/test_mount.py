"""Composite contexts: read-only trees mounted into a session (session.Mount). A mounted tree is unchanged on disk
after a session that zooms into it and saves (checksums); every entry's provenance names its tree and span, each
tree's entries tile its own history within its budget share; decoding with the KV cache equals a forward from
scratch over the composite; sample.py --mount end to end and its one-line errors."""
import hashlib
import os

import pytest
import torch

from conftest import assert_close
from megacontext import recency_scores
from session import Session, open_mounts
from test_megacontext import checkpoint, mc_model  # noqa: F401 (a fixture)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run on one thread


def digest(path):
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A saved 1,500-token tree (the library) and the model that built it."""
    m = mc_model(w_max=96, recent_tokens=16)
    lib = Session(m)
    lib.ingest(torch.randint(0, 97, (1500,), generator=torch.Generator().manual_seed(3)).tolist())
    path = str(tmp_path_factory.mktemp("lib") / "lib")
    lib.save(path)
    return m, path, lib.tree.tokens(0, 1500)


def scratch_logits(s):
    """One uncached forward over the composite, built here from each part's entries and position offset."""
    parts = [(w.wc, w.tree, w.offset) for w in s.mounts] + [(s.wc, s.tree, s.pos_offset)]
    xs, mus, sigmas = [], [], []
    for wc, tree, offset in parts:
        mu, sigma = wc.positions(s.model.sigma_scale)
        xs.append(tree.node_embeddings(wc.lod, wc.index))
        mus.append(mu + offset)
        sigmas.append(sigma)
    with torch.no_grad():
        return s.model.gpt(embeds=torch.cat(xs)[None], mu=torch.cat(mus)[None], sigma=torch.cat(sigmas)[None])[0][0, -1]


def test_mount_read_only_provenance_budget_and_zoom(library, tmp_path):
    m, lib_path, lib_tokens = library
    before = digest(lib_path)
    s = Session(m, mounts=open_mounts(m, [lib_path]), mount_share=0.5)
    mount = s.mounts[0]
    assert mount.cfg.w_max == 48 and s.cfg.w_max == 48 and s.pos_offset == 1500  # half of 96, the rest own
    s.ingest(torch.randint(0, 97, (400,)).tolist())
    p = 700  # a token of the library

    def scorer(wc):  # the pyramid's scores, plus a lot for every gist over library token p
        base = recency_scores(wc, (mount.cfg if wc is mount.wc else s.cfg).target)
        return base + 20.0 * ((wc is mount.wc) & (wc.lod > 0) & (wc.start <= p) & (wc.end > p))

    t = s.refocus(until_stable=True, scorer=scorer)
    assert [x["name"] for x in t["trees"]] == ["session", lib_path] and t["trees"][1]["expands"] >= 2
    zoomed = int(mount.wc.lod[int(((mount.wc.start <= p) & (mount.wc.end > p)).nonzero())])
    assert zoomed == 0 and mount.tree.access  # zoomed to the token (telemetry in memory only)
    for _ in range(12):
        s.step()
        for part, cfg in ((mount, mount.cfg), (s, s.cfg)):
            part.wc.check_invariants(cfg.w_max)  # each tree's own exact tiling, within its share
    prov = s.provenance()
    assert len(prov) == len(mount.wc) + len(s.wc) <= m.cfg.w_max
    lib_entries = [e for e in prov if e[0] == lib_path]
    assert prov[:len(lib_entries)] == lib_entries  # the library is read first
    assert lib_entries[0][3] == 0 and lib_entries[-1][4] == 1500
    assert all(a[4] == b[3] for a, b in zip(lib_entries, lib_entries[1:]))
    own = [e for e in prov if e[0] == "session"]
    assert own[0][3] == 0 and own[-1][4] == len(s.tree) == 400 + 12
    s.save(str(tmp_path / "own"))
    assert digest(lib_path) == before  # the mounted tree was never written
    assert list(s.mounts[0].tree.tokens(0, 1500)) == list(lib_tokens)


def test_mount_kv_reuse_equals_from_scratch(library):
    m, lib_path, _ = library
    s = Session(m, mounts=open_mounts(m, [lib_path, lib_path]), mount_share=0.5)  # the same library twice
    assert [w.offset for w in s.mounts] == [0, 1500] and s.pos_offset == 3000
    s.ingest(torch.randint(0, 97, (300,)).tolist())
    for i in range(16):
        if i % 5 == 0:
            s.refocus()  # the recency policy edits the mounts and the own tree
        assert_close("logits", scratch_logits(s), s.logits(), ratio=1e-5, atol=1e-4)
        s.ingest([s.step()])
    with pytest.raises(ValueError, match="share of the budget must be in"):
        Session(m, mounts=open_mounts(m, [lib_path]), mount_share=0.75)


def test_sample_mc_mount_end_to_end(checkpoint):
    """sample.py --mount: a library streamed into its own tree, then mounted read-only into another session: the
    status line names it, the library's files are unchanged, the session's own tree is saved; bad --mount flags are
    one line."""
    from test_megacontext import run
    ckpt, book, root = checkpoint
    lib, own = str(root / "mlib"), str(root / "mown")
    common = ["sample.py", "--ckpt", ckpt, "--mc", "--budget", "128", "--block", "8", "--recent", "16"]
    r = run(common + ["--prompt-file", book, "--max-new-tokens", "0", "--tree", lib])
    assert r.returncode == 0, r.stderr
    before = digest(lib)
    r = run(common + ["--tree", own, "--mount", lib, "--mount-share", "0.5", "--prompt", "The end",
                      "--max-new-tokens", "12", "--temperature", "0"])
    assert r.returncode == 0, r.stderr
    status = [line for line in r.stderr.splitlines() if line.startswith("[mc] ") and "entries" in line]
    assert status and all(" | mlib " in line and "/64 LOD" in line for line in status), r.stderr
    assert digest(lib) == before and os.path.isfile(os.path.join(own, "meta.json"))
    for extra, message in [(["--mount", lib, "--mount-share", "0.8"], "--mount-share must be in (0, 0.5]"),
                           (["--mount", own], "is the session's own --tree"),
                           (["--mount", str(root / "nothing")], "no MegaContext tree")]:
        r = run(common + ["--tree", own, "--prompt", "x", "--max-new-tokens", "1"] + extra)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
    assert digest(lib) == before
