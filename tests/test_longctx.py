"""bench/longctx.py end to end on a random tiny GPT and the synthetic corpus: every method x budget, exact
consistency of truncation and the recency pyramid with full attention where nothing needs compressing, the retrieval
generator's needle placement, checkpoints with and without MegaContext weights, and one-line errors."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import prepare
from conftest import ROOT
from megacontext import MegaContextConfig, MegaContextModel
from model import GPT, GPTConfig

sys.path.insert(0, os.path.join(ROOT, "bench"))
import longctx  # noqa: E402

HIST, BUDGETS = [256, 512], [64, 512]  # budget 512 >= every history: nothing to compress there
TINY = ["--histories", "256,512", "--budgets", "64,512", "--docs", "2", "--horizon", "16", "--block", "8",
        "--recent", "16", "--stream", "16", "--retrieval-histories", "384", "--retrieval-budget", "64",
        "--depths", "0.5", "--trials", "1", "--decode", "4", "--max-full", "4096", "--threads", "1"]


def save_ckpt(path, data_dir, mc=False):
    """A random tiny GPT in train.py's checkpoint format; with mc, also GistNet/LensNet weights and mc_config."""
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64)
    gpt = GPT(cfg)
    ckpt = dict(model=gpt.state_dict(), model_args=dataclasses.asdict(cfg), step=0,
                config=dict(data_dir=data_dir, max_position=2**20))
    if mc:
        mcfg = MegaContextConfig(block_k=8, w_max=128, recent_tokens=16, lens_width=64)
        model = MegaContextModel(gpt, mcfg)
        ckpt |= dict(gistnet=model.gistnet.state_dict(), lensnet=model.lensnet.state_dict(),
                     mc_config=dataclasses.asdict(mcfg))
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture(scope="module")
def result(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("longctx")
    ckpt = save_ckpt(tmp / "ckpt.pt", data_dir)
    res = longctx.main(["--ckpt", ckpt, "--data-dir", data_dir, "--out", str(tmp / "res"), *TINY])
    with open(tmp / "res.json") as f:
        assert json.load(f)["nll"] == json.loads(json.dumps(res["nll"]))  # what was returned is what was written
    return res, tmp


def nll(res, L, W, m):
    return next(r for r in res["nll"] if (r["history"], r["budget"], r["method"]) == (L, W, m))


def test_longctx_every_method_and_budget(result):
    res, tmp = result
    assert {(r["history"], r["budget"], r["method"]) for r in res["nll"]} == \
        {(L, W, m) for L in HIST for W in BUDGETS for m in longctx.METHODS}
    for r in res["nll"]:
        assert r["docs"] == 2 and len(r["per_doc"]) == 2
        assert all(np.isfinite(r["per_doc"])) and 0 < r["nll"] < 2 * np.log(512)  # a random model: about ln(512)
        assert r["ci"][0] <= r["nll"] <= r["ci"][1]
    assert any("GISTNET UNTRAINED" in n for n in res["notes"]) and any("LENSNET UNTRAINED" in n for n in res["notes"])
    assert {(t["budget"], t["method"]) for t in res["telemetry"]} == {(W, m) for W in BUDGETS
                                                                    for m in longctx.SESSION_METHODS}
    for t in res["telemetry"]:
        assert 0 < t["utilisation"] <= 1 and t["budget_compliance"] == 1.0
    assert all(np.isfinite(t["overhead"]) for t in res["telemetry"] if t["method"] != "mean")
    try:  # plots are optional (matplotlib is not a requirement); without it the output says so
        import matplotlib  # noqa: F401
        assert res["plots"] == [str(tmp / "res_nll.png"), str(tmp / "res_retrieval.png")]
        assert all(os.path.getsize(p) > 1000 for p in res["plots"])
    except ImportError:
        assert res["plots"] == [] and any("matplotlib" in n for n in res["notes"])
    md = (tmp / "res.md").read_text()
    assert "| 512 | 64 | 2 |" in md and "Retrieval accuracy" in md


def test_longctx_no_compression_equals_full_attention(result):
    """At W >= history nothing is compressed: truncation runs the same tokens (exactly the same numbers) and every
    session arm must build an all-LOD0 working context at the same positions (equal within fp32 noise). At W=64
    the arms must differ from full attention, or the comparison above proves nothing."""
    res, _ = result
    for L in HIST:
        full = nll(res, L, 512, "full")["per_doc"]
        assert nll(res, L, 512, "truncation")["per_doc"] == full
        for m in longctx.SESSION_METHODS:
            np.testing.assert_allclose(nll(res, L, 512, m)["per_doc"], full, rtol=0, atol=1e-5, err_msg=m)
    far = nll(res, 512, 64, "full")["per_doc"]
    for m in ("truncation", "recency"):
        assert np.abs(np.subtract(nll(res, 512, 64, m)["per_doc"], far)).max() > 1e-4, m
    assert nll(res, 512, 64, "truncation")["gap"] == pytest.approx(
        np.mean(nll(res, 512, 64, "truncation")["per_doc"]) - np.mean(far))


def test_longctx_gap_share_and_paired_delta():
    """Share of the truncation->full gap: 0.5 halfway, 1 at full, None where full is no better than truncation;
    the paired difference to truncation and its interval come from the per-document values."""
    per_doc = {(8, 4, "truncation"): [3.0, 2.0, 4.0], (8, 4, "full"): [2.0, 1.0, 3.0],
               (8, 4, "lens"): [2.5, 1.5, 3.5], (8, 4, "recency"): [2.0, 1.0, 3.0],
               (9, 4, "truncation"): [1.0, 1.0], (9, 4, "full"): [1.5, 1.5], (9, 4, "lens"): [0.5, 1.0]}
    rows = {(r["history"], r["method"]): r for r in longctx.summarise_nll(per_doc, None)}
    assert rows[8, "lens"]["gap_share"] == pytest.approx(0.5)
    assert rows[8, "lens"]["gap_share_ci"] == pytest.approx([0.5, 0.5])
    assert rows[8, "recency"]["gap_share"] == pytest.approx(1.0) and rows[8, "full"]["gap"] == pytest.approx(1.0)
    assert rows[8, "lens"]["delta_trunc"] == pytest.approx(-0.5)
    assert rows[8, "lens"]["delta_trunc_ci"] == pytest.approx([-0.5, -0.5])
    assert rows[8, "lens"]["nll"] == pytest.approx(2.5) and rows[8, "lens"]["ci"][0] < 2.5 < rows[8, "lens"]["ci"][1]
    assert rows[9, "lens"]["gap"] == pytest.approx(-0.5) and rows[9, "lens"]["gap_share"] is None
    assert rows[9, "lens"]["delta_trunc"] == pytest.approx(-0.25)


def test_longctx_retrieval_rows(result):
    res, _ = result
    ret = res["retrieval"]
    keys = {(r["history"], r["kind"], r["depth"], r["query_first"], r["method"]) for r in ret}
    assert keys == {(384, k, 0.5, q, m) for k in ("passkey", "kv")
                    for q in (False, True) for m in longctx.METHODS}
    assert all(0 <= r["accuracy"] <= 1 for r in ret)


@pytest.mark.parametrize("kind", ["passkey", "kv"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_longctx_needle_at_depth(data_dir, kind, depth):
    """The needle sits, token for token, at round(depth * text length) of the book text (distractors included),
    the prompt is exactly the requested length, and the question closes it (or, query_first, opens it, with only
    the answer cue at the end)."""
    enc = prepare.load_tokenizer(data_dir)
    hay = longctx.haystack(data_dir, "val", 2000)
    assert not (hay == enc.encode_single_token(prepare.BOS)).any()
    for query_first in (False, True):
        r = longctx.make_retrieval(hay, enc, kind, 2000, depth, np.random.default_rng(1), query_first)
        ids, at, needle, q, cue = (r[k] for k in ("ids", "needle_at", "needle", "question", "cue"))
        assert len(ids) == 2000 and list(ids[at:at + len(needle)]) == needle
        assert r["value"] in enc.decode(needle) and list(ids[-len(cue):]) == cue
        head = len(q) if query_first else 0
        assert list(ids[:len(q)] if query_first else ids[-len(cue) - len(q):-len(cue)]) == q
        assert at - head == round(depth * (2000 - len(needle) - len(q) - len(cue)))


def test_longctx_needle_reaches_the_model(data_dir, tmp_path):
    """What each method feeds the model holds the needle when it should: a session with room for the whole prompt
    reads every token raw (the needle included, at its positions), truncation keeps it only when it is recent."""
    ckpt = torch.load(save_ckpt(tmp_path / "ckpt.pt", data_dir), weights_only=False)
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    enc = prepare.load_tokenizer(data_dir)
    hay = longctx.haystack(data_dir, "val", 600)
    r = longctx.make_retrieval(hay, enc, "passkey", 600, 0.5, np.random.default_rng(0))
    s = longctx.stream_session(longctx.session_model(ckpt, gpt, "lens", 640 + 8, 8, 16), r["ids"], 16)
    assert (s.wc.lod == 0).all() and s.wc.index.tolist() == list(range(600))
    assert s.tree.tokens(0, 600).tolist() == r["ids"].tolist()
    x, mu, _ = longctx.session_prefix(s)
    at, n = r["needle_at"], len(r["needle"])
    assert torch.equal(x[at:at + n], gpt.wte(torch.tensor(r["needle"]))) and mu[at] == at
    for depth, inside in ((1.0, True), (0.0, False)):
        r = longctx.make_retrieval(hay, enc, "passkey", 600, depth, np.random.default_rng(0))
        tail = r["ids"][-64:].tolist()
        assert any(tail[i:i + len(r["needle"])] == r["needle"] for i in range(64)) == inside


def test_longctx_trained_weights_are_used(data_dir, tmp_path):
    """A checkpoint with gistnet/lensnet keys (and its mc_config's K and tail) runs without the UNTRAINED notes."""
    ckpt = save_ckpt(tmp_path / "mc.pt", data_dir, mc=True)
    res = longctx.main(["--ckpt", ckpt, "--data-dir", data_dir, "--out", str(tmp_path / "mc"), "--histories", "512",
                        "--budgets", "96", "--docs", "1", "--horizon", "16", "--retrieval-histories", "",
                        "--decode", "0", "--no-plot", "--depths", "0.5"])
    assert res["trained"] == {"gistnet": True, "lensnet": True}
    assert not any("UNTRAINED" in n for n in res["notes"])
    assert res["args"]["block"] == 8 and res["args"]["recent"] == 16  # taken from the checkpoint's mc_config
    assert all(np.isfinite(r["nll"]) for r in res["nll"])


def test_longctx_bad_input(data_dir, tmp_path, capsys):
    """Missing checkpoint or data, a history longer than every document, a budget below the protected tail: one
    line on stderr and a non-zero exit, before any compute. The first runs as a user would, in a subprocess."""
    env = {**os.environ, "MC_KERNELS": "torch"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "bench/longctx.py", "--ckpt", str(tmp_path / "nope.pt"), "--quick"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path}/nope.pt"]
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir)
    cases = [(["--data-dir", str(tmp_path / "nodata")], "cannot read the prepared data"),
             (["--histories", "10000000"], "longer than every document"),
             (["--budgets", "24"], "below the protected tail"),
             (["--retrieval-histories", "100000000"], "longer than all of")]
    for extra, msg in cases:
        argv = ["--ckpt", ckpt, "--data-dir", data_dir, *TINY, "--out", str(tmp_path / "x"), *extra]
        with pytest.raises(SystemExit) as e:
            longctx.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(err) == 1 and msg in err[0], (extra, err)
        assert not os.path.exists(tmp_path / "x.json")
