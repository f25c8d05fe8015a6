"""bench/longctx.py (the fair harness of issue 9) end to end on a random tiny GPT and the synthetic corpus: every
method x budget, exact consistency with full attention where nothing needs compressing, full attention only inside
the base's block, retrieval cells with Wilson intervals and both controls, needles only beyond the truncation window,
the gate, the summary a script can check, budgets above the trained block refused, and one-line errors."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import prepare
import retrieval
from conftest import ROOT
from megacontext import MegaContextConfig, MegaContextModel
from model import GPT, GPTConfig

sys.path.insert(0, os.path.join(ROOT, "bench"))
import longctx  # noqa: E402

# the base's block is 128: full attention at 96 only; W=128 compresses nothing there
HIST, BUDGETS = [96, 320], [64, 128]
TINY = ["--histories", "96,320", "--budgets", "64,128", "--docs", "2", "--windows", "2", "--horizon", "16",
        "--block", "8", "--recent", "16", "--stream", "16", "--retrieval-histories", "384", "--retrieval-budget", "64",
        "--depths", "0.2,0.5,0.95", "--trials", "3", "--decode", "4", "--threads", "1"]


def save_ckpt(path, data_dir, mc=False, block_size=128):
    """A random tiny GPT in train.py's checkpoint format; with mc, also GistNet/LensNet weights and mc_config."""
    cfg = GPTConfig(vocab_size=512, block_size=block_size, n_layer=2, n_head=2, n_embd=64, rope_heads=1)
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
        saved = json.load(f)
    assert saved["nll"] == json.loads(json.dumps(res["nll"])) and saved["summary"] == json.loads(
        json.dumps(res["summary"]))  # what was returned is what was written
    return res, tmp


def nll(res, L, W, m):
    return next(r for r in res["nll"] if (r["history"], r["budget"], r["method"]) == (L, W, m))


def test_longctx_every_method_and_budget(result):
    res, tmp = result
    keys = {(r["history"], r["budget"], r["method"]) for r in res["nll"]}
    assert keys == {(L, W, m) for L in HIST for W in BUDGETS for m in longctx.METHODS
                    if m != "oracle" and (m != "full" or L <= 128)}  # (oracle: a retrieval-only arm)
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
        assert res["plots"] == [str(tmp / "res.png")] and os.path.getsize(res["plots"][0]) > 1000
    except ImportError:
        assert res["plots"] == [] and any("matplotlib" in n for n in res["notes"])
    md = (tmp / "res.md").read_text()
    assert "| 96 | 64 | 2 |" in md and "## Retrieval" in md and "no needle (control)" in md


def test_longctx_no_compression_equals_full_attention(result):
    """At W >= history nothing is compressed: truncation runs the same tokens (exactly the same numbers) and every
    session arm builds an all-LOD0 working context at the same positions (equal within fp32 noise). At W=64 the
    arms must differ from full attention, or the comparison proves nothing."""
    res, _ = result
    full = nll(res, 96, 128, "full")["per_doc"]
    assert nll(res, 96, 128, "truncation")["per_doc"] == full
    for m in longctx.SESSION_METHODS:
        np.testing.assert_allclose(nll(res, 96, 128, m)["per_doc"], full, rtol=0, atol=1e-5, err_msg=m)
    far = nll(res, 96, 64, "full")["per_doc"]
    for m in ("truncation", "recency"):
        assert np.abs(np.subtract(nll(res, 96, 64, m)["per_doc"], far)).max() > 1e-4, m
    trunc = nll(res, 96, 64, "truncation")
    assert trunc["gap"] == pytest.approx(np.mean(trunc["per_doc"]) - np.mean(far))
    assert nll(res, 320, 64, "lens")["gap"] is None  # no full attention beyond the block: no gap, no share


def test_longctx_gap_share_and_paired_delta():
    """Share of the truncation->full gap: 0.5 halfway, 1 at full, None where full is no better than truncation;
    the paired difference to truncation and its interval come from the per-document values."""
    per_doc = {(8, 4, "truncation"): [3.0, 2.0, 4.0], (8, 4, "full"): [2.0, 1.0, 3.0],
               (8, 4, "lens"): [2.5, 1.5, 3.5], (8, 4, "recency"): [2.0, 1.0, 3.0],
               (9, 4, "truncation"): [1.0, 1.0], (9, 4, "full"): [1.5, 1.5], (9, 4, "lens"): [0.5, 1.0]}
    rows = {(r["history"], r["method"]): r for r in longctx.summarise_nll(per_doc)}
    assert rows[8, "lens"]["gap_share"] == pytest.approx(0.5)
    assert rows[8, "lens"]["gap_share_ci"] == pytest.approx([0.5, 0.5])
    assert rows[8, "recency"]["gap_share"] == pytest.approx(1.0) and rows[8, "full"]["gap"] == pytest.approx(1.0)
    assert rows[8, "lens"]["gap_ci"] == pytest.approx([1.0, 1.0])
    assert rows[8, "lens"]["delta_trunc"] == pytest.approx(-0.5)
    assert rows[8, "lens"]["delta_trunc_ci"] == pytest.approx([-0.5, -0.5])
    assert rows[8, "lens"]["nll"] == pytest.approx(2.5) and rows[8, "lens"]["ci"][0] < 2.5 < rows[8, "lens"]["ci"][1]
    assert rows[9, "lens"]["gap"] == pytest.approx(-0.5) and rows[9, "lens"]["gap_share"] is None
    assert rows[9, "lens"]["delta_trunc"] == pytest.approx(-0.25)


def test_longctx_retrieval_cells_controls_and_summary(result):
    res, _ = result
    ret = res["retrieval"]
    keys = {(r["history"], r["task"], r["control"], r["method"]) for r in ret}
    assert keys == {(384, k, c, m) for k in ("passkey", "multikey") for c in retrieval.CONTROLS
                    for m in ("truncation", "recency", "lens", "oracle") if c is None or m in ("truncation", "lens")}
    # (no full attention over 384 > the 128-token block; the controls ask the control arms only)
    for r in ret:
        assert r["trials"] == 3 and r["accuracy"] == r["hits"] / 3 and r["ci"][0] <= r["accuracy"] <= r["ci"][1]
        assert set(r["per_depth"]) == {"0.2", "0.5"}  # 0.95 leaves the needle inside the 64-token window: dropped
        if r["method"] in longctx.SESSION_METHODS + ("oracle",):
            assert {"steps", "expands", "needle_raw"} <= set(r["telemetry"]) and 1 <= r["telemetry"]["steps"] <= 3
        if r["method"] == "oracle" and r["control"] != "no_needle":
            assert r["telemetry"]["needle_raw"] == 1.0  # zooming exactly the needle's gists always reaches its tokens
    ib = res["in_block"]
    assert ib["history"] == 128 and ib["trials"] == 100 and set(ib["per_task"]) == {"passkey", "multikey"}
    s = res["summary"]
    assert s["in_block_retrieval"] == ib["accuracy"]
    assert set(s["retrieval"]) == {"truncation", "recency", "lens", "oracle"}
    assert all(set(v) == {"6x"} for v in s["retrieval"].values())  # 384 // 64
    hits = sum(r["hits"] for r in ret if r["method"] == "lens" and r["control"] is None)
    assert s["retrieval"]["lens"]["6x"] == pytest.approx(hits / 6)
    acc = {(x["task"], x["method"]): x["accuracy"] for x in ret if x["control"] is None}
    assert {t: {m: v["6x"] for m, v in ms.items()} for t, ms in s["tasks"].items()} == {
        t: {m: acc[t, m] for m in ("truncation", "recency", "lens", "oracle")} for t in ("passkey", "multikey")}
    assert s["in_block_tasks"] == ib["per_task"]
    assert s["nll"]["history"] == 96 and s["nll"]["budget"] == 64
    assert s["nll"]["gap_nats"] == pytest.approx(nll(res, 96, 64, "truncation")["gap"])
    assert set(s["nll"]["gap_share"]) <= set(longctx.SESSION_METHODS)


def test_longctx_legal_depths():
    assert longctx.legal_depths([0.0, 0.5, 0.8, 0.9], 1024, 128) == [0.0, 0.5, 0.8]
    assert longctx.legal_depths([0.9], 200, 128) == []


def test_longctx_needle_reaches_the_model(data_dir, tmp_path):
    """A session with room for the whole prompt reads every token raw, the needle included, at its positions;
    truncation keeps the needle only when it is recent."""
    ckpt = torch.load(save_ckpt(tmp_path / "ckpt.pt", data_dir, block_size=1024), weights_only=False)
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    needles = retrieval.Needles(prepare.load_tokenizer(data_dir))
    hay = longctx.haystack(data_dir, "val", 600)
    assert not (hay == prepare.load_tokenizer(data_dir).encode_single_token(prepare.BOS)).any()
    p = retrieval.make_prompt(hay, needles, "passkey", 600, 0.5, np.random.default_rng(0))
    s = longctx.stream_session(longctx.session_model(ckpt, gpt, "lens", 640 + 8, 8, 16), p["ids"], 16, settle=True)
    assert (s.wc.lod == 0).all() and s.wc.index.tolist() == list(range(600))
    assert s.tree.tokens(0, 600).tolist() == p["ids"].tolist()
    x, mu, _ = longctx.session_prefix(s)
    at = p["needle_at"]
    assert torch.equal(x[at:at + 7], gpt.wte(torch.as_tensor(p["ids"][at:at + 7]))) and mu[at] == at
    for depth, inside in ((1.0, True), (0.0, False)):
        p = retrieval.make_prompt(hay, needles, "passkey", 600, depth, np.random.default_rng(0))
        assert (needles.passkey in p["ids"][-64:-2].tolist()) == inside


def test_longctx_gate(data_dir, tmp_path, capsys):
    """--gate: only the in-block check; below the threshold one line on stderr and exit 1, above it a result."""
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir)
    base = ["--ckpt", ckpt, "--data-dir", data_dir, "--trials", "5"]
    with pytest.raises(SystemExit) as e:
        longctx.main(base + ["--gate", "0.95"])  # a random model retrieves nothing
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and "retrieves 0.000 < 0.95 of the needles inside its own 128-token window" in err[-1]
    assert longctx.main(base + ["--gate", "0.0"])["trials"] == 100


def test_longctx_trained_weights_are_used(data_dir, tmp_path):
    """A checkpoint with gistnet/lensnet keys (and its mc_config's K and tail) runs without the UNTRAINED notes."""
    ckpt = save_ckpt(tmp_path / "mc.pt", data_dir, mc=True)
    res = longctx.main(["--ckpt", ckpt, "--data-dir", data_dir, "--out", str(tmp_path / "mc"), "--histories", "384",
                        "--budgets", "96", "--docs", "1", "--windows", "1", "--horizon", "16",
                        "--retrieval-histories", "", "--decode", "0", "--no-plot", "--trials", "1"])
    assert res["trained"] == {"gistnet": True, "lensnet": True}
    assert not any("UNTRAINED" in n for n in res["notes"])
    assert res["args"]["block"] == 8 and res["args"]["recent"] == 16  # taken from the checkpoint's mc_config
    assert all(np.isfinite(r["nll"]) for r in res["nll"])


def test_longctx_bad_input(data_dir, tmp_path, capsys):
    """Missing checkpoint or data, a history longer than every document, a budget below the protected tail or above
    the base's trained block: one line on stderr and a non-zero exit, before any compute."""
    env = {**os.environ, "MC_KERNELS": "torch"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "bench/longctx.py", "--ckpt", str(tmp_path / "nope.pt")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path}/nope.pt"]
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir)
    cases = [(["--data-dir", str(tmp_path / "nodata")], "cannot read the prepared data"),
             (["--histories", "10000000"], "longer than every document"),
             (["--budgets", "24"], "below the protected tail"),
             (["--budgets", "256"], "above the 128-token block the base model was trained on"),
             (["--retrieval-budget", "200"], "above the 128-token block"),
             (["--retrieval-histories", "100000000"], "longer than all of"),
             (["--controls", "bogus"], "--controls from"),
             (["--methods", "lens,oracle"], "oracle is for retrieval only")]
    for extra, msg in cases:
        argv = ["--ckpt", ckpt, "--data-dir", data_dir, *TINY, "--out", str(tmp_path / "x"), *extra]
        with pytest.raises(SystemExit) as e:
            longctx.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code != 0 and len(err) == 1 and msg in err[0], (extra, err)
        assert not os.path.exists(tmp_path / "x.json")


def test_longctx_long_range_tokens():
    """A scored token is long-range when it and the two before it occur as a run before the truncation window and
    not inside it: planted runs make it true, a copy inside the window or no earlier copy make it false."""
    L, H, W = 64, 8, 24  # truncation reads [L - W, L): tokens 40.. ; the scored ones are 56..63
    win = np.arange(1000, 1000 + L)  # all distinct: nothing repeats, nothing is long-range
    assert not longctx.long_range(win, H, W).any()
    win[10:13] = win[57:60]  # tokens 57..59 (and the two before 59) ran at 10..12, before the window
    mask = longctx.long_range(win, H, W)
    assert mask.tolist() == [False, False, False, True, False, False, False, False]  # position 59 only: 57, 58, 59
    win[44:47] = win[57:60]  # the same run also inside the window: truncation can copy it too
    assert not longctx.long_range(win, H, W).any()


def test_mc_report_writes_summary_and_targets(result, tmp_path):
    """bench/mc_report.py (mc_demo.sh's last step) on the harness output: the test split's summary with `tasks`, each
    teacher's LensNet accuracies (test and the val selection), every issue-17 target with a yes/no (the LensNet target
    met exactly when the figure reaches it), and the per-task table leading the markdown."""
    import mc_report
    res, tmp = result
    path = str(tmp / "res.json")
    report = mc_report.main(["--out", str(tmp_path / "demo"), "--test", path, "--kept", "counterfactual",
                             "--select", f"counterfactual={path}", f"oracle={path}",
                             "--test-teachers", f"counterfactual={path}", f"oracle={path}", "--seconds", "60"])
    saved = json.loads((tmp_path / "demo.json").read_text())
    s = saved["summary"]
    assert s["tasks"] == json.loads(json.dumps(res["summary"]["tasks"])) and s["kept"] == "counterfactual"
    assert {"in_block_retrieval", "retrieval", "nll", "nll_long_range", "teachers", "teachers_val"} <= set(s)
    assert s["teachers"]["oracle"] == {t: v["lens"] for t, v in s["tasks"].items()} == s["teachers_val"]["oracle"]
    names = {t["target"]: t for t in saved["targets"]}
    assert "passkey 6x: truncation <= 0.05" in names and "multikey 6x: LensNet within 0.1 of the oracle" in names
    lens, oracle = s["tasks"]["multikey"]["lens"]["6x"], s["tasks"]["multikey"]["oracle"]["6x"]
    assert names["multikey 6x: LensNet within 0.1 of the oracle"]["met"] == (lens >= oracle - 0.1)
    assert any(n.startswith("no-needle control at chance") for n in names)
    md = (tmp_path / "demo.md").read_text()
    assert md.index("## Retrieval per task") < md.index("## Targets (issue 17)")
    assert "| passkey | 6x |" in md and "LensNet (oracle)" in md
    assert report["summary"]["kept"] == "counterfactual"


def test_longctx_time_limit_marks_partial_cells(data_dir, tmp_path, monkeypatch):
    """--time-limit: past it no prompt or document starts; the cell cut short keeps the prompts it asked (partial),
    the cells not reached have no row, each is listed in `partial`, and the JSON, markdown and mc_report still come."""
    import types
    import mc_report
    ticks = iter(range(10**6))  # a clock that advances one second per reading: the limit falls at a known prompt
    clock = types.SimpleNamespace(time=lambda: next(ticks), perf_counter=time.perf_counter)
    monkeypatch.setattr(longctx, "time", clock)
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir)
    out = str(tmp_path / "res")
    res = longctx.main(["--ckpt", ckpt, "--data-dir", data_dir, "--out", out, *TINY, "--histories", "",
                        "--retrieval-methods", "truncation,lens", "--time-limit", "2.5"])  # 2 prompts, then cut
    assert [(r["task"], r["control"], r["method"], r["trials"], r.get("partial")) for r in res["retrieval"]] == [
        ("passkey", None, "truncation", 2, True), ("passkey", None, "lens", 2, True)]
    assert res["partial"][0] == "retrieval passkey, question last, at 384 tokens: 2/3 prompts"
    assert len(res["partial"]) == 6 and all(c.endswith(": 0/3 prompts") for c in res["partial"][1:])
    assert res["summary"]["retrieval"]["lens"]["6x"] == res["retrieval"][1]["accuracy"]
    assert json.loads(open(out + ".json").read())["partial"] == res["partial"]
    md = open(out + ".md").read()
    assert "**Partial: --time-limit 2.5 s cut these cells short**" in md and "* (2)" in md
    report = mc_report.main(["--out", str(tmp_path / "demo"), "--test", out + ".json", "--kept", "counterfactual",
                             "--test-teachers", f"attention={out}.json"])
    assert report["partial"] == {"test": res["partial"], "attention": res["partial"]}
    assert "**Partial**: the harness's time limit cut 6 cells of test, 6 cells of attention short" in open(
        tmp_path / "demo.md").read()
    monkeypatch.undo()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "longctx.py"), "--ckpt", ckpt, "--data-dir",
                        data_dir, "--out", out, *TINY, "--time-limit", "0"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = json.loads(open(out + ".json").read())
    assert saved["nll"] == saved["retrieval"] == [] and saved["partial"][:2] == [
        "nll at 96 tokens: 0/2 documents", "nll at 320 tokens: 0/2 documents"]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "longctx.py"), "--ckpt", ckpt, "--time-limit",
                        "-1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "error: --time-limit must be >= 0 seconds, got -1.0"


def test_shared_gists_pools_each_block_once():
    calls = []

    def make_gists(lod, x):
        calls.append(lod)
        return x.mean(1) * lod

    shared = longctx.SharedGists(make_gists)
    x, y = torch.randn(5, 8, 4), torch.randn(5, 8, 4)
    assert torch.equal(shared(1, x), make_gists(1, x)) and torch.equal(shared(1, x.clone()), make_gists(1, x))
    assert torch.equal(shared(2, x), 2 * x.mean(1)) and torch.equal(shared(1, y), y.mean(1))
    assert calls == [1, 1, 1, 2, 1]  # the second (1, x) came from the memo: 3 pools for 3 distinct inputs + 2 direct


def test_refocus_cost_bench_times_both_arms(data_dir, tmp_path, capsys):
    """bench/refocus_cost.py on a tiny query-conditioned checkpoint: both arms timed, the ratio is theirs, and a
    checkpoint without lens_query is refused in one line."""
    import refocus_cost
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64)
    gpt = GPT(cfg)
    mcfg = MegaContextConfig(block_k=8, w_max=96, recent_tokens=16, lens_width=32, lens_types=True, lens_query="0,2",
                             lens_markers=8, lens_margin=5)
    model = MegaContextModel(gpt, mcfg)
    ckpt = dict(model=gpt.state_dict(), model_args=dataclasses.asdict(cfg), step=0, config=dict(data_dir=data_dir),
                gistnet=model.gistnet.state_dict(), lensnet=model.lensnet.state_dict(),
                mc_config=dataclasses.asdict(mcfg))
    torch.save(ckpt, tmp_path / "q.pt")
    r = refocus_cost.main(["--ckpt", str(tmp_path / "q.pt"), "--history", "2000", "--steps", "3", "--runs", "2",
                           "--out", str(tmp_path / "rc")])
    s = r["summary"]
    assert set(s["score_ms"]) == {"query", "saliency"} and all(v > 0 for v in s["score_ms"].values())
    assert s["ratio"] == pytest.approx(s["score_ms"]["query"] / s["score_ms"]["saliency"]) and s["read_ms"] >= 0
    assert len(r["runs"]["score"]["query"]) == 2 and json.load(open(tmp_path / "rc.json"))["summary"] == s
    with pytest.raises(SystemExit):
        refocus_cost.main(["--ckpt", save_ckpt(tmp_path / "plain.pt", data_dir, mc=True), "--out", str(tmp_path / "x")])
    assert "has no query-conditioned LensNet" in capsys.readouterr().err


def test_longctx_refuses_a_bad_gate_and_another_tokenizer(data_dir, tmp_path, capsys):
    """--gate outside [0, 1] (a share of needles: 2 can never pass) and a --data-dir whose tokenizer is not the one
    the checkpoint records: one line each, before any compute (issue 18)."""
    import checkpoint
    import prepare
    other = str(tmp_path / "other")
    prepare.main(["--synthetic", "--out", other, "--vocab-size", "512", "--syn-docs", "8", "--syn-chars", "40000",
                  "--seed", "7"])
    path = save_ckpt(tmp_path / "ckpt.pt", data_dir)
    ckpt = torch.load(path, weights_only=False)
    torch.save({**ckpt, "tokenizer": checkpoint.tokenizer_record(data_dir)}, path)
    for extra, msg in [(["--gate", "2"], "error: --gate must be in [0, 1] (the share of in-block needles retrieved), "
                                         "got 2.0"),
                       (["--data-dir", other], f"error: the tokenizer in {other} (sha256 ")]:
        with pytest.raises(SystemExit) as e:
            longctx.main(["--ckpt", path, "--data-dir", data_dir, *TINY, "--out", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith(msg), (extra, err)
    assert not os.path.exists(tmp_path / "x.json")
