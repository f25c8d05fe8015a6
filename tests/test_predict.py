"""predict.py (MegaPrediction, issue 19): the heads start as the tied head's input, targets are the gists the tree
holds, prediction positions and acceptance against brute-force loops, and the heads learn a planted mapping."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import predict
from megacontext import MegaContextConfig, MegaContextModel
from model import GPT, GPTConfig
from session import Session
from test_megacontext import checkpoint  # noqa: F401  (a random tiny GPT in train.py's format, a book, a folder)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops run on one thread


def tiny(**kw):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=97, block_size=128, n_layer=2, n_head=3, n_embd=48)).eval()
    cfg = dict(block_k=4, w_max=64, recent_tokens=12, gist_heads=3, lens_width=32, lens_heads=2, lens_tail=8)
    return MegaContextModel(gpt, MegaContextConfig(**{**cfg, **kw})).eval()


def test_predictor_is_off_by_default_and_starts_as_the_tied_heads_input():
    assert not hasattr(tiny(), "predictor")
    m = tiny(gist_predict="mlp")
    ids = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        h = predict.final_states(m.gpt, ids)
        g = m.predictor(h)
        logits = m.gpt(ids)[0]
    assert g.shape == (2, 32, 2, 48) and torch.equal(g[:, :, 0], h) and torch.equal(g[:, :, 1], h)
    torch.testing.assert_close(m.gpt.lm_head(h), logits)  # h is what the tied head decodes
    with pytest.raises(ValueError, match="gist_predict"):
        MegaContextConfig(gist_predict="yes").validate()


def test_block_gists_are_the_gists_the_tree_holds():
    m, K = tiny(), 4
    ids = torch.randint(0, 97, (1, 64))
    s = Session(m)
    s.ingest(ids[0].tolist())
    with torch.no_grad():
        g1, g2 = predict.block_gists(m.make_gists, m.embed_tokens(ids), K)
    for lod, g in ((1, g1), (2, g2)):
        n = 64 // K**lod
        held = s.tree.node_embeddings(torch.full((n,), lod), torch.arange(n))
        torch.testing.assert_close(g[0].float(), held.float(), atol=1e-5, rtol=1e-5)


def test_pairs_and_acceptance_match_loops():
    K, B, T, d = 4, 2, 64, 8
    h, g = torch.randn(B, T, d), torch.randn(B, T // K, d)
    states, target, prev, win, j = predict.pairs(h, g, K, 1)
    rows = [(b, jj) for b in range(B) for jj in range(1, T // K)]
    assert len(states) == len(rows)
    for r, (b, jj) in enumerate(rows):
        assert torch.equal(states[r], h[b, jj * K - 1]) and torch.equal(target[r], g[b, jj])
        assert torch.equal(prev[r], g[b, jj - 1]) and (int(win[r]), int(j[r])) == (b, jj)
    pred = target + 0.8 * torch.randn_like(target)
    n = T // K
    others = n - 1  # every other block: no draw, so the loop below is the whole definition
    hits = 0
    for r, (b, jj) in enumerate(rows):
        sims = [float(torch.nn.functional.cosine_similarity(pred[r], g[b, i], dim=0)) for i in range(n)]
        hits += max(range(n), key=lambda i: sims[i]) == jj
    assert predict.acceptance(pred, g, win, j, others) == pytest.approx(hits / len(rows))
    assert predict.acceptance(target, g, win, j, 7) == 1.0


def test_heads_learn_a_planted_mapping():
    torch.manual_seed(0)
    d = 16
    A = torch.randn(2, d, d) / d**0.5
    h = torch.randn(512, d)
    targets = [h @ A[0], h @ A[1]]
    heads = predict.GistPredictor(d)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        out = heads(h)
        loss = predict.loss([out[:, 0], out[:, 1]], targets, [1.0, 1.0])
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.2 * first


def test_sample_show_plan_prints_the_plan_beside_the_text(checkpoint, tmp_path):  # noqa: F811
    """sample.py --mc --show-plan HEADS: a [plan] line every K generated tokens (what was written, what was planned
    for it, the next plan); heads made for another model are refused in one line."""
    import types

    import checkpoint as ckpt_lib
    from test_sample import MC, launch
    path, _, _ = checkpoint
    ck = ckpt_lib.read(path)
    gpt = GPT(GPTConfig(**ck["model_args"]))
    gpt.load_state_dict(ck["model"])
    mc = ckpt_lib.mc_model(ck, types.SimpleNamespace(block=8, budget=128, recent=16, policy=None), gpt)
    d = gpt.config.n_embd
    heads = str(tmp_path / "heads.pt")
    torch.save(dict(heads=predict.GistPredictor(d).state_dict(), centers=None, rho=None, n_embd=d, K=8,
                    identity=mc.identity()), heads)
    p = launch(["--ckpt", path, *MC, "--prompt", "hello there", "--max-new-tokens", "30", "--temperature", "0",
                "--show-plan", heads], stdin=subprocess.DEVNULL)
    out, err = p.communicate(timeout=120)
    plans = [line for line in err.decode().splitlines() if line.startswith("[plan] ")]
    assert p.returncode == 0 and len(plans) >= 3 and all("next: " in line for line in plans), err.decode()
    assert all("wrote " in line and "(planned: " in line for line in plans[1:]), plans
    torch.save(dict(heads=predict.GistPredictor(d).state_dict(), centers=None, rho=None, n_embd=d, K=8,
                    identity="another"), heads)
    p = launch(["--ckpt", path, *MC, "--prompt", "hi", "--show-plan", heads], stdin=subprocess.DEVNULL)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "another base model or GistNet" in err.decode() and "Traceback" not in err.decode()


def test_megaprediction_bench_small(tmp_path, data_dir, capsys):
    """bench/megaprediction.py end to end on a random tiny checkpoint: the issue's summary keys, the heads file that
    sample.py --show-plan reads (centres, lengths), the fitted length's read-out; a bad --batch is one line."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import megaprediction
    from test_longctx import save_ckpt
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir, mc=True, block_size=512)
    common = ["--ckpt", ckpt, "--data-dir", data_dir, "--train-windows", "8", "--val-windows", "4", "--steps", "3"]
    out, heads = str(tmp_path / "mp"), str(tmp_path / "heads.pt")
    r = megaprediction.main(common + ["--batch", "32", "--save-heads", heads, "--out", out])
    s = json.load(open(out + ".json"))["summary"]
    assert set(s) == {"cos", "baseline_cos", "acceptance", "dnll_tok"} and set(s["cos"]) == {"lod1", "lod2"}
    assert 0 <= s["acceptance"] <= 1 and s["cos"] == r["summary"]["cos"] and r["batch"] == 32
    lod1 = r["levels"]["lod1"]
    assert lod1["pairs"] == 4 * 63 and lod1["length_fit"] <= lod1["length"]  # a projection is at most the norm
    saved = torch.load(heads, weights_only=False)
    assert torch.allclose(torch.stack(saved["rho"]), torch.tensor([v["length"] for v in r["levels"].values()]))
    assert "| lod1 | 252 |" in open(out + ".md").read()
    with pytest.raises(SystemExit):
        megaprediction.main(common + ["--batch", "-1", "--out", out])
    assert "--batch -1: pairs per step must be >= 1" in capsys.readouterr().err


def test_lens_plan_appends_the_predicted_gist_to_the_query_and_moves_the_scores():
    """lens_plan: read() returns the lens_query streams, then the LOD1 gist the heads plan after every token (their
    centre and length applied); the Indexer is one d wider; a session's LensNet scores change with the heads, so the
    plan is read. Without gist_predict or lens_query the config is refused in one line."""
    q = dict(lens_types=True, lens_query="1,2")
    plain, m = tiny(**q), tiny(**q, gist_predict="mlp", lens_plan=True)
    d = 48
    assert m.lensnet.indexer.norm.weight.shape == (3 * d,) and plain.lensnet.indexer.norm.weight.shape == (2 * d,)
    torch.manual_seed(1)
    for w in m.predictor.w2:
        torch.nn.init.normal_(w.weight, 0.0, 0.1)
    m.predictor.center.normal_()
    m.predictor.rho.fill_(3.0)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        _, streams = plain.read(idx=ids)
        _, states = m.read(idx=ids)
        want = m.predictor.gist(predict.final_states(m.gpt, ids))
    assert states.shape == (2, 24, 3 * d)
    torch.testing.assert_close(states[..., :2 * d], streams)
    torch.testing.assert_close(states[..., 2 * d:], want)
    assert torch.allclose((want - m.predictor.center[0]).norm(dim=-1), torch.tensor(3.0))  # as_gist's length
    history = torch.randint(0, 97, (200,)).tolist()

    def scores():  # a session over the same history, its question read before scoring
        s = Session(m)
        s.ingest(history)
        s.logits()
        return s.scores()

    before = scores()
    for w in m.predictor.w2:
        torch.nn.init.normal_(w.weight, 0.0, 0.1)
    assert not torch.allclose(before, scores())  # (recency scores, which ignore the heads, would not change)
    for bad in (dict(q, lens_plan=True), dict(gist_predict="mlp", lens_plan=True)):
        with pytest.raises(ValueError, match="lens_plan"):
            MegaContextConfig(**bad).validate()


def test_load_heads_reads_old_files_and_refuses_other_models(tmp_path):
    """A heads file written before the centre/length buffers (centres and lengths beside the weights) loads with them
    set, so gist() is as_gist of the saved centre and length; another model's heads are refused in one line."""
    m = tiny(gist_predict="mlp")
    heads = predict.GistPredictor(48)
    torch.nn.init.normal_(heads.w2[0].weight, 0.0, 0.1)
    state = {k: v for k, v in heads.state_dict().items() if k not in ("center", "rho")}
    centers, rho = [torch.randn(48), torch.randn(48)], [torch.tensor(2.5), torch.tensor(4.0)]
    path = str(tmp_path / "old.pt")
    torch.save(dict(heads=state, centers=centers, rho=rho, n_embd=48, K=4, identity=m.identity()), path)
    loaded = predict.load_heads(path, m)
    h = torch.randn(5, 48)
    torch.testing.assert_close(loaded.gist(h), predict.as_gist(heads(h)[:, 0], centers[0], rho[0]))
    torch.save(dict(heads=state, centers=None, rho=None, n_embd=48, K=4, identity=m.identity()), path)
    torch.testing.assert_close(predict.load_heads(path, m).gist(h), heads(h)[:, 0])  # no centre: as is
    torch.save(dict(heads=state, centers=None, rho=None, n_embd=48, K=4, identity="other"), path)
    with pytest.raises(ValueError, match="another base model or GistNet"):
        predict.load_heads(path, m)
    open(path, "wb").write(b"junk")
    with pytest.raises(ValueError, match="cannot read MegaPrediction heads"):
        predict.load_heads(path, m)


def test_lens_plan_compare_pools_seeds_and_decides():
    """bench/lens_plan.py's comparison on made-up harness results: pooled accuracy, the Newcombe interval of the
    difference (it holds 0 for equal arms, excludes it for a large gap), and the verdict."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import lens_plan

    def harness(hits, delta):
        return dict(retrieval=[dict(task="passkey", history=1024, method="lens", control=None, hits=hits, trials=30),
                               dict(task="passkey", history=1024, method="lens", control="no_needle", hits=0,
                                    trials=30)],
                    nll_long_range=[dict(method="lens", delta_trunc=delta, docs=19, delta_trunc_ci=[-1, 1],
                                         gap_share=0.1, gap_share_ci=[0, 1])])
    same = lens_plan.compare({(a, s): harness(20, -0.02) for a in ("plain", "plan") for s in (1, 2)})
    lo, hi = same["summary"]["difference_ci"]
    assert same["pooled"]["plan"] == dict(hits=40, trials=60) and lo < 0 < hi
    assert same["summary"]["verdict"] == "no detectable effect" and not same["summary"]["kept"]
    better = lens_plan.compare({("plain", 1): harness(10, -0.02), ("plan", 1): harness(29, -0.05)})
    assert better["summary"]["difference_ci"][0] > 0 and better["summary"]["verdict"] == "helps"
    assert better["summary"]["nll_long_range"] == {"plain": -0.02, "plan": -0.05}
    worse = lens_plan.compare({("plain", 1): harness(29, -0.02), ("plan", 1): harness(10, -0.02)})
    assert worse["summary"]["verdict"] == "hurts"
