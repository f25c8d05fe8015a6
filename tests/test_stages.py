"""The MegaContext training stages (stages.py through train.py) end to end on a synthetic corpus: gist learns and is
compared with mean pooling, lens labels have the right sign, each stage trains exactly its parameters, sample.py
reads the checkpoints, resume is exact, and impossible stage configs fail at start with one line."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import predict
import stages
import train
from configs import load_config
from conftest import ROOT
from megacontext import WorkingContext
from model import GPT, GPTConfig

PY = sys.executable
MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=128", "--eval_iters=2"]
# MC stages on the base above: K=8 so a 128-token sequence holds 16 LOD1 and 2 LOD2 gists
MC = ["--block_size=128", "--block_k=8", "--recent_tokens=16", "--w_max=48", "--horizon=16", "--gist_w0_max=32",
      "--gist_w1_max=2", "--lens_width=32", "--lens_tail=8", "--lora_rank=4",
      "--eval_iters=1", "--log_interval=1", "--warmup_iters=2"]


def run(args):
    env = {**os.environ, "MC_KERNELS": "torch", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([PY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory):
    """A 60-step base model (it must use some context for gists to matter): its checkpoint path."""
    out = str(tmp_path_factory.mktemp("base"))
    train.main(["configs/tiny.py", *MODEL, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=60",
                "--eval_interval=60", "--warmup_iters=5", "--lr=3e-3", "--batch_size=8", "--log_interval=30",
                "--eval_gap=0"])
    return os.path.join(out, "ckpt.pt")


def mc_args(stage, data_dir, base, out, **kw):
    args = [f"configs/tiny_{stage}.py", *MC, f"--data_dir={data_dir}", f"--base_ckpt={base}", f"--out_dir={out}"]
    return args + [f"--{k}={v}" for k, v in kw.items()]


@pytest.fixture(scope="module")
def gist(data_dir, base, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gist"))
    train.main(mc_args("gist", data_dir, base, out, max_iters=30, eval_interval=30, batch_size=4, lr=3e-3))
    return out


def test_gist_stage_learns_and_beats_mean_pooling(gist):
    log = read_log(gist)
    evals = [r for r in log if "dnll_lod1_gist" in r]
    assert [r["step"] for r in evals] == [0, 30]
    first, last = evals[0], evals[-1]
    for key in ("dnll_lod1_gist", "dnll_lod1_mean", "dnll_lod2_gist", "dnll_lod2_mean", "val_loss"):
        assert key in last
    assert last["dnll_lod1_gist"] < first["dnll_lod1_gist"], (first, last)
    assert last["dnll_lod1_gist"] < last["dnll_lod1_mean"], last  # GistNet beats the naive mean-pooled gists
    steps = [r for r in log if "loss" in r]
    assert all(k in steps[-1] for k in ("dnll", "tok_per_s", "time_base", "time_gistnet"))
    ckpt = torch.load(os.path.join(gist, "ckpt.pt"), weights_only=False)
    assert {"mc_config", "gistnet", "model", "optimizer", "rng"} <= set(ckpt) and "lensnet" not in ckpt


def test_gist_levels_beyond_the_kernel(gist, data_dir, tmp_path):
    """LOD3 (512 tokens at K=8), a level the pyramidal kernel does not train: gist_eval measures it on explicit working
    contexts, the LOD2 weights make it, and bench/gist_depth.py compares the ways to make it (an identical 'shared'
    checkpoint differs by exactly 0; LOD3 by the LOD1 weights differs at LOD3 only)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gist_depth
    import prepare
    mc = gist_depth.load_mc(os.path.join(gist, "ckpt.pt"))
    tokens = torch.from_numpy(prepare.load_split(data_dir, "val")[0][:601].astype("int64"))
    x, y = tokens[None, :-1], tokens[None, 1:]
    cfg = train.TrainConfig(horizon=16)
    calls = []
    for i, level in enumerate(mc.gistnet.levels):
        level.register_forward_hook(lambda mod, args, out, i=i: calls.append((i, args[0].shape[0])))
    out = stages.gist_eval(mc, x, y, cfg)
    assert out["dnll_lod3_gist"][1] == out["dnll_lod3_mean"][1] == 16 and "dnll_lod4_gist" not in out
    assert out["dnll_lod3_gist"][0] != out["dnll_lod3_mean"][0]
    assert (1, 1) in calls  # the one LOD3 gist of [0, 512) came from the second (LOD2) weight set
    ckpt = os.path.join(gist, "ckpt.pt")
    r = gist_depth.main(["--split", ckpt, "--shared", ckpt, "--data-dir", data_dir, "--cursor", "600", "--horizon",
                         "16", "--windows", "2", "--out", str(tmp_path / "gd")])
    assert set(r["arms"]) == {"reuse", "reuse-lod1", "mean", "shared"}
    assert all(r["diff_to_reuse"]["shared"][lvl]["mean"] == 0 for lvl in (1, 2, 3))
    lod1 = r["diff_to_reuse"]["reuse-lod1"]
    assert lod1[1]["mean"] == lod1[2]["mean"] == 0 and lod1[3]["mean"] != 0
    assert "| reuse |" in open(str(tmp_path / "gd.md")).read()


def test_lens_labels_on_constructed_case():
    """One LOD2 gist holds what the scored tokens need: zooming it to its tokens lowers their summed NLL by 5 nats, any
    other zoom changes nothing, every collapse costs 0.3. Its label is the largest (zoom credit for a coarse gist),
    collapse labels are positive losses, and normalised labels are in units of the context's label spread."""
    wc = WorkingContext.pyramid(4, 4, 64, 400, 40)
    key = int((wc.lod == 2).nonzero()[len((wc.lod == 2).nonzero()) // 2])
    a, b = int(wc.start[key]), int(wc.end[key])

    def nll_fn(variants):
        out = []
        for lod, index in variants:
            start = index * 4**lod
            raw = bool(((lod == 0) & (start >= a) & (start < b)).sum() == b - a)  # the key's span is all tokens
            out.append(6.0 - 5.0 * raw + 0.3 * (len(lod) < len(wc)))
        return torch.tensor(out)

    cands = stages.candidates(wc)
    assert ("zoom", key) in cands and any(kind == "collapse" for kind, _ in cands)
    assert {i for kind, i in cands if kind == "zoom"} == set((wc.lod > 0).nonzero().flatten().tolist())
    assert {i for kind, i in cands if kind == "collapse"} == set(wc.group_starts().tolist())  # every legal edit
    raw = stages.counterfactual_labels(wc, cands, nll_fn)
    y = dict(zip(cands, raw.tolist()))
    assert y[("zoom", key)] == pytest.approx(5.0) and max(y, key=y.get) == ("zoom", key)
    assert all(v == pytest.approx(0.3) for (kind, _), v in y.items() if kind == "collapse")
    assert all(v == pytest.approx(0.0) for c, v in y.items() if c[0] == "zoom" and c != ("zoom", key))
    norm = stages.normalise(raw, floor=0.5)
    assert norm[cands.index(("zoom", key))] == pytest.approx(5.0 / float(raw.std()))
    assert torch.equal(stages.normalise(raw * 1e-3, floor=0.5), raw * 1e-3 / 0.5)  # nothing matters: stays small
    # the attention teacher: mass on the key's tokens makes it the best zoom, and a group's label is its span's mass
    mass = torch.full((400,), 0.01)
    mass[a:b] = 1.0
    att = dict(zip(cands, stages.attention_labels(wc, cands, mass).tolist()))
    zooms = {c: v for c, v in att.items() if c[0] == "zoom"}
    assert max(zooms, key=zooms.get) == ("zoom", key) and att[("zoom", key)] == pytest.approx(b - a)
    for (kind, i), v in att.items():  # a collapse loses its group's whole mass
        if kind == "collapse":
            lo, hi = int(wc.start[i]), int(wc.end[i + wc.K - 1])
            assert v == pytest.approx(0.01 * (hi - lo) + 0.99 * max(0, min(hi, b) - max(lo, a)), rel=1e-4)
    assert stages.spearman(raw, raw) == pytest.approx(1.0)


def test_attention_mass_matches_hand_computed_attention():
    """attention_mass on a 1-layer GPT whose position-free head attends exactly to earlier copies of the query's
    token (one-hot q = k, huge scale) and whose other head attends uniformly (zero q, k): the mass on the history
    token that the scored rows' token matches is what those two heads give by hand, averaged over heads."""
    cfg = GPTConfig(vocab_size=16, block_size=32, n_layer=1, n_head=2, n_embd=32, rope_heads=1, qk_norm=False)
    gpt = GPT(cfg)
    with torch.no_grad():
        gpt.wte.weight.zero_()
        gpt.wte.weight[:, :16] = torch.eye(16)
        W = gpt.blocks[0].attn.c_attn.weight  # (3C, C): rows of q, then k, then v; head 1 = dims 16..31
        W.zero_()
        W[16:32, :16] = 30 * torch.eye(16)
        W[48:64, :16] = torch.eye(16)
    ids = np.array([1, 2, 3, 4, 5, 12, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 12, 12, 12, 7])  # scored: the last 3
    mass = stages.attention_mass(gpt, ids, 3)
    rows = [16, 17, 18]  # the positions that predict the scored tokens
    copy = [1 / 2, 1 / 3, 1 / 4]  # head 1: the earlier 12s (and itself), equally
    uniform = [1 / (t + 1) for t in rows]  # head 0: every position up to itself
    assert mass.shape == (17,)
    assert float(mass[5]) == pytest.approx(0.5 * (sum(copy) + sum(uniform)), abs=1e-3)
    assert float(mass[0]) == pytest.approx(0.5 * sum(uniform), abs=1e-3)


QUERY = dict(lens_types=True, lens_query="0,2", lens_markers=8, lens_margin=8, lens_retrieval=1.0,
             retrieval_tasks="passkey,multikey,vartrack")  # the query-conditioned LensNet (issue 17)


@pytest.mark.parametrize("stage, extra", [("gist", {}), ("lens", {}), ("lora", {}),
                                          ("lens", dict(QUERY, lens_teacher="counterfactual")),
                                          ("lens", dict(QUERY, lens_teacher="attention")),
                                          ("lens", dict(QUERY, lens_teacher="oracle"))],
                         ids=["gist", "lens", "lora", "lens-query-cf", "lens-query-attention", "lens-query-oracle"])
def test_stage_trains_exactly_its_parameters(stage, extra, data_dir, base, gist, tmp_path):
    """One optimizer step changes exactly the stage's parameters; they are the optimizer's, and the checkpoint
    holds them (GistNet, LensNet, LoRA). With lens_query every teacher reaches every Indexer weight."""
    src = os.path.join(gist, "ckpt.pt")
    args = mc_args(stage, data_dir, base, str(tmp_path), batch_size=2, gist_w1_max=0,
                   **({"gist_ckpt": src} if stage != "gist" else {}), **extra)
    cfg = load_config(train.TrainConfig, args)
    model, _ = train.build_mc(cfg, None, torch.device("cpu"))
    opt = GPT.configure_optimizers(model, cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), "cpu")
    before = {n: p.detach().clone() for n, p in model.mc.named_parameters()}
    tokens = train.load_data(data_dir)[0]
    gen = train.batch_generator(cfg.seed, 0, 0)
    loss, _ = train.stage_loss(model, train.get_batch(tokens, cfg, gen, "cpu", gaps=False), cfg, gen)
    loss.backward()
    opt.step()
    changed = {n for n, p in model.mc.named_parameters() if not torch.equal(p, before[n])}
    names = set(before)
    want = {"gist": {n for n in names if n.startswith("gistnet.")},
            "lens": {n for n in names if n.startswith("lensnet.")},
            "lora": {n for n in names if n.startswith("gistnet.") or ".lora_" in n}}[stage]
    assert changed == want, f"unexpected: {sorted(changed - want)[:4]}, unchanged: {sorted(want - changed)[:4]}"
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.mc.named_parameters() if n in want}
    extras = train.mc_checkpoint_extras(model)
    assert "mc_config" in extras and "gistnet" in extras
    assert ("lensnet" in extras) == (stage == "lens") and ("lora" in extras) == (stage == "lora")
    if stage == "lora":
        assert len(extras["lora"]) == 2 * 2 and all(".lora_" in k for k in extras["lora"])


def test_lens_then_lora_end_to_end_and_sample_loads(data_dir, base, gist, tmp_path):
    lens, lora = str(tmp_path / "lens"), str(tmp_path / "lora")
    train.main(mc_args("lens", data_dir, base, lens, gist_ckpt=os.path.join(gist, "ckpt.pt"), max_iters=4,
                       eval_interval=4, batch_size=2))
    evals = [r for r in read_log(lens) if "lens_spearman" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert all(k in evals[-1] for k in ("label_mean", "label_std", "label_pos", "val_loss"))
    steps = [r for r in read_log(lens) if "loss" in r]
    assert all(k in steps[-1] for k in ("lens_reg", "lens_rank", "label_mean", "time_lensnet", "time_base"))
    train.main(mc_args("lora", data_dir, base, lora, gist_ckpt=os.path.join(lens, "ckpt.pt"), max_iters=2,
                       eval_interval=2, batch_size=2))
    ckpt = torch.load(os.path.join(lora, "ckpt.pt"), weights_only=False)
    assert ckpt["model_args"]["lora_rank"] == 4 and {"lora", "lensnet", "gistnet"} <= set(ckpt)
    assert all(k in [r for r in read_log(lora) if "loss" in r][-1] for k in ("task_nll", "time_allocator"))
    r = run(["sample.py", f"--ckpt={lora}/ckpt.pt", "--mc", "--max-new-tokens=5", "--prompt=the key is",
             "--budget=48", "--block=8", "--recent=16"])
    assert r.returncode == 0, r.stderr[-2000:]


def test_alt_cycles_chain_phases_and_skip_finished_ones(data_dir, base, tmp_path):
    """alt runs gist -> lens -> lora per cycle, each phase from the previous phase's checkpoint, logs every phase to
    alt.jsonl; a rerun skips the finished phases (no new training) and reports the same values."""
    args = mc_args("gist", data_dir, base, str(tmp_path), alt_cycles=2, alt_gist_iters=2, alt_lens_iters=2,
                   alt_lora_iters=2, batch_size=2, eval_interval=2, alt_min_delta=-1e9) + ["--stage=alt"]
    train.main(args)
    with open(tmp_path / "alt.jsonl") as f:
        phases = [json.loads(line) for line in f]
    assert [(p["cycle"], p["stage"]) for p in phases] == [(c, s) for c in range(2) for s in ("gist", "lens", "lora")]
    lens1 = torch.load(tmp_path / "cycle1_lens" / "ckpt.pt", weights_only=False)
    lora0 = torch.load(tmp_path / "cycle0_lora" / "ckpt.pt", weights_only=False)
    gist1 = torch.load(tmp_path / "cycle1_gist" / "ckpt.pt", weights_only=False)
    assert lens1["config"]["base_ckpt"].endswith("cycle1_gist/ckpt.pt")  # each phase starts from the one before
    assert gist1["model_args"]["lora_rank"] == 4  # cycle 1 keeps the adapters cycle 0's lora phase trained
    assert all(torch.equal(gist1["model"][k], lora0["model"][k]) for k in lora0["lora"])
    mtime = os.path.getmtime(tmp_path / "cycle1_lora" / "ckpt.pt")
    train.main(args)  # everything finished: nothing retrains
    assert os.path.getmtime(tmp_path / "cycle1_lora" / "ckpt.pt") == mtime
    with open(tmp_path / "alt.jsonl") as f:
        again = [json.loads(line) for line in f][6:]
    assert [p["val_loss"] for p in again] == [p["val_loss"] for p in phases]


def test_gist_torchrun_two_ranks_match_one(data_dir, base, tmp_path):
    """The gist stage under 2-process gloo DDP with grad_accum=2 takes the same steps as 1 process accumulating 2
    micro-batches (the random W0/W1 of a micro-batch come from its global index, not its rank)."""
    ddp_out, one_out = str(tmp_path / "ddp"), str(tmp_path / "one")
    common = lambda out: mc_args("gist", data_dir, base, out, max_iters=2, eval_interval=2, batch_size=2,  # noqa
                                 grad_accum=2)
    r = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *common(ddp_out)])
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    assert "world=2, accum=1" in r.stdout
    train.main(common(one_out))
    ddp = [r["loss"] for r in read_log(ddp_out) if "loss" in r]
    one = [r["loss"] for r in read_log(one_out) if "loss" in r]
    assert len(ddp) == 2 and ddp == pytest.approx(one, rel=1e-4)


def test_gist_resume_is_exact(data_dir, base, tmp_path):
    common = lambda out, n: mc_args("gist", data_dir, base, out, max_iters=n, eval_interval=2, batch_size=2,  # noqa
                                    lr=1e-3, min_lr=1e-3)
    b, c = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    train.main(common(b, 2))
    train.main(common(b, 4) + ["--init_from=resume"])
    train.main(common(c, 4))
    lb = {r["step"]: r["loss"] for r in read_log(b) if "loss" in r}
    lc = {r["step"]: r["loss"] for r in read_log(c) if "loss" in r}
    assert sorted(lb) == [1, 2, 3, 4] and lb == lc
    gb, gc = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=False)["gistnet"] for d in (b, c))
    assert all(torch.equal(gb[k], gc[k]) for k in gc)


@pytest.mark.parametrize("extra, message", [
    (["configs/tiny_gist.py", "--base_ckpt="], "stage 'gist' needs base_ckpt=<a base-stage checkpoint>"),
    (["configs/tiny_gist.py", "--base_ckpt=/nonexistent/ckpt.pt"], "base_ckpt not found: /nonexistent/ckpt.pt"),
    (["configs/tiny_lens.py", "--gist_ckpt="], "stage 'lens' needs a trained GistNet: set gist_ckpt="),
    (["configs/tiny_gist.py", "--w_max=20"], "budget w_max=20 is too small: the protected tail (16)"),
    (["configs/tiny_gist.py", "--horizon=128"], "horizon=128 must be in 1..block_size-1=127"),
    (["configs/tiny_lens.py", "--gist_ckpt=", "--block_size=64", "--horizon=32"], "fits the budget w_max=48 raw"),
    (["configs/tiny_gist.py", "--stage=alt", "--alt_cycles=0"], "alt_cycles must be >= 1, got 0"),
])
def test_stage_config_errors_are_one_line(extra, message, data_dir, base, tmp_path):
    args = [*MC, f"--data_dir={data_dir}", f"--base_ckpt={base}", f"--out_dir={tmp_path}"]
    r = run(["train.py", extra[0], *args, *extra[1:]])
    assert r.returncode != 0
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(os.path.join(tmp_path, "log.jsonl"))  # failed before any compute


def heads_file(gist_ckpt: str, path: str):
    """Random (non-identity) MegaPrediction heads with a centre and length, saved as a --save-heads file matching the
    gist checkpoint's base and GistNet; returns them."""
    ck = torch.load(gist_ckpt, weights_only=False)
    gpt = GPT(GPTConfig(**ck["model_args"]))
    gpt.load_state_dict(ck["model"])
    mc = checkpoint.mc_model(ck, argparse.Namespace(block=None, budget=None, recent=None, policy=None), gpt)
    heads = predict.GistPredictor(gpt.config.n_embd)
    torch.nn.init.normal_(heads.w2[0].weight, 0.0, 0.05)
    heads.center.normal_()
    heads.rho.fill_(2.0)
    torch.save(dict(heads=heads.state_dict(), centers=None, rho=None, n_embd=gpt.config.n_embd, K=8,
                    identity=mc.identity()), path)
    return heads


def test_lens_plan_stage_trains_lensnet_over_frozen_heads(data_dir, base, gist, tmp_path):
    """lens_plan: the lens stage loads MegaPrediction heads (a --save-heads file matching the base and GistNet) into
    the model, keeps them frozen while LensNet learns, saves them in the checkpoint, and sample.py --mc decodes with
    them; without heads, or with another model's, it stops at start with one line."""
    src, path = os.path.join(gist, "ckpt.pt"), str(tmp_path / "heads.pt")
    heads = heads_file(src, path)
    plan = dict(QUERY, lens_teacher="oracle", gist_predict="mlp", lens_plan=True)
    out = str(tmp_path / "lens")
    train.main(mc_args("lens", data_dir, base, out, gist_ckpt=src, max_iters=2, eval_interval=2, batch_size=2,
                       predict_heads=path, **plan))
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert saved["mc_config"]["lens_plan"] and saved["lensnet"]["indexer.norm.weight"].shape == (3 * 64,)
    assert all(torch.equal(saved["predictor"][k], v) for k, v in heads.state_dict().items())  # loaded, frozen
    r = run(["sample.py", f"--ckpt={out}/ckpt.pt", "--mc", "--max-new-tokens=5", "--prompt=the key is",
             "--budget=48", "--block=8", "--recent=16"])
    assert r.returncode == 0, r.stderr[-2000:]
    torch.save(dict(heads=heads.state_dict(), centers=None, rho=None, n_embd=64, K=8, identity="other"), path)
    for extra in ({}, {"predict_heads": path}):
        r = run(["train.py", *mc_args("lens", data_dir, base, str(tmp_path / "bad"), gist_ckpt=src, max_iters=1,
                                      **plan, **extra)])
        err = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-800:]
        assert ("predict_heads=" in err[0]) if not extra else ("another base model or GistNet" in err[0])


def test_predict_stage_trains_the_heads_and_feeds_show_plan_and_lens_plan(data_dir, base, gist, tmp_path):
    """The predict stage trains exactly the heads (base and GistNet frozen), sets their centre and length to the
    gists' running mean and mean distance, logs cos per level with both baselines and acceptance, and on this planted
    corpus beats the last block's gist; its checkpoint is a heads source for sample.py --show-plan and for a lens
    stage with lens_plan. Impossible predict configs stop in one line."""
    src, out = os.path.join(gist, "ckpt.pt"), str(tmp_path / "predict")
    args = mc_args("predict", data_dir, base, out, gist_ckpt=src, block_size=128, batch_size=4, max_iters=40,
                   eval_interval=40, lr=3e-3)
    cfg = load_config(train.TrainConfig, args)
    model, _ = train.build_mc(cfg, None, torch.device("cpu"))
    assert set(stages.set_trainable(model.mc, "predict")) == {n for n, _ in model.mc.named_parameters()
                                                            if n.startswith("predictor.")}
    train.main(args)
    ev = [r for r in read_log(out) if "acceptance" in r]
    assert [r["step"] for r in ev] == [0, 40]
    last = ev[-1]
    assert all(f"cos_lod{lod}{b}" in last for lod in (1, 2) for b in ("", "_last_block", "_mean_gist"))
    assert "cos_lod1_mean_gist" not in ev[0]  # no mean gist before a training batch has set it
    assert last["val_loss"] < ev[0]["val_loss"] and last["cos_lod1"] > last["cos_lod1_last_block"]
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    gist_ck = torch.load(src, weights_only=False)
    assert all(torch.equal(saved["gistnet"][k], v) for k, v in gist_ck["gistnet"].items())  # frozen
    assert float(saved["predictor"]["rho"].min()) > 0  # the running length was set
    r = run(["sample.py", f"--ckpt={src}", "--mc", "--max-new-tokens=17", "--prompt=the key is", "--budget=48",
             "--block=8", "--recent=16", f"--show-plan={out}/ckpt.pt"])
    assert r.returncode == 0 and r.stderr.count("[plan]") >= 2, r.stderr[-2000:]
    lens = str(tmp_path / "lens")
    train.main(mc_args("lens", data_dir, base, lens, gist_ckpt=src, max_iters=1, eval_interval=1, batch_size=2,
                       predict_heads=f"{out}/ckpt.pt", gist_predict="mlp", lens_plan=True,
                       **dict(QUERY, lens_teacher="oracle")))
    assert torch.equal(torch.load(f"{lens}/ckpt.pt", weights_only=False)["predictor"]["center"],
                       saved["predictor"]["center"])
    for bad, msg in ((dict(gist_predict=""), "gist_predict='mlp'"), (dict(block_size=100), "multiple of K²"),
                     (dict(predict_alphas="0.1"), "predict_alphas"), (dict(block_size=256), "must be <= the base's")):
        r = run(["train.py", *mc_args("predict", data_dir, base, str(tmp_path / "bad"), gist_ckpt=src, **bad)])
        err = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(err) == 1 and msg in err[0], r.stderr[-800:]


def test_lens_plan_bench_runs_both_arms_and_compares(data_dir, base, gist, tmp_path):
    """bench/lens_plan.py end to end at toy sizes: both arms trained per seed (the plan arm with the heads in its
    checkpoint), both harnesses run, a rerun skips them all, and the report pools the cells; a missing file is one
    line."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import lens_plan
    src, heads = os.path.join(gist, "ckpt.pt"), str(tmp_path / "heads.pt")
    heads_file(src, heads)
    lens = ["configs/tiny_lens.py", *MC, "--batch_size=2", "--eval_interval=2", "--lens_teacher=oracle",
            *(f"--{k}={v}" for k, v in QUERY.items())]
    harness = ("--split test --histories 256 --docs 2 --windows 1 --methods full,truncation,lens --retrieval-methods "
               "lens --controls '' --decode 0 --no-plot --in-block-trials 0 --tasks passkey,multikey "
               "--retrieval-histories 512 --retrieval-budget 48 --depths 0.3 --trials 2 --stream 16")
    argv = ["--base", base, "--gist", src, "--heads", heads, "--data-dir", data_dir, "--seeds", "7", "--iters", "2",
            "--lens-args", " ".join(lens), "--harness-args", harness, "--threads", "1", "--run", str(tmp_path / "run"),
            "--out", str(tmp_path / "cmp")]
    r = lens_plan.main(argv)
    assert "predictor" in torch.load(tmp_path / "run" / "plan_s7" / "ckpt.pt", weights_only=False)
    assert "predictor" not in torch.load(tmp_path / "run" / "plain_s7" / "ckpt.pt", weights_only=False)
    for arm in ("plain", "plan"):
        cells = r["cells"][f"{arm}_s7"]
        assert set(cells) == {"passkey@512", "multikey@512"} and all(n == 2 for _, n in cells.values())
        assert r["pooled"][arm]["trials"] == 4
        assert r["summary"]["retrieval"][arm] == r["pooled"][arm]["hits"] / 4
    assert r["summary"]["verdict"] in ("helps", "hurts", "no detectable effect")
    assert "Verdict" in open(tmp_path / "cmp.md").read()
    mtime = os.path.getmtime(tmp_path / "run" / "plan_s7" / "harness.json")
    lens_plan.main(argv)  # everything is there: nothing reruns
    assert os.path.getmtime(tmp_path / "run" / "plan_s7" / "harness.json") == mtime
    bad = run(["bench/lens_plan.py", *argv[:4], "--heads", str(tmp_path / "missing.pt"), *argv[6:]])
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--heads not found" in bad.stderr
