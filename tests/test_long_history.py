"""bench/long_history.py and session.ingest_stream: a long history streams in with periodic saves, the tree on disk
has exactly the bytes the format predicts, the summary has the issue's shape; the retrieval function's Wilson
intervals and its session path; retrieval cells on book text with needles planted into the saved history."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import prepare

sys.path.insert(0, os.path.join(ROOT, "bench"))
import long_history  # noqa: E402
from test_longctx import save_ckpt  # noqa: E402
from tiling import zoom_entries  # noqa: E402
from megacontext import MegaContextConfig, MegaContextModel  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from session import Session, ingest_stream  # noqa: E402

SMALL = ["--vocab", "97", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--budget", "64",
         "--recent", "16", "--lens-width", "16", "--threads", "1"]


def small_model(vocab=97):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=vocab, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    cfg = MegaContextConfig(block_k=8, w_max=64, recent_tokens=16, lens_width=16)
    return MegaContextModel(gpt, cfg).eval()


def test_long_history_bench_small(tmp_path):
    out = str(tmp_path / "lh")
    r = long_history.main(SMALL + ["--lengths", "700,5000", "--decode", "4", "--warmup", "1", "--save-every", "1500",
                                   "--out", out])
    saved = json.load(open(out + ".json"))
    assert set(saved["summary"]) == {"ingest_tokens_per_s", "peak_rss_mb", "tasks", "retrieval"}
    assert saved["summary"]["retrieval"] == {} and saved["retrieval"] == []
    assert list(r["summary"]["peak_rss_mb"]) == [700, 5000] and r["summary"]["ingest_tokens_per_s"] > 0
    for row, depth in zip(r["rows"], (3, 4)):  # 8**3 <= 700 + 5 decoded < 8**4 <= 5000
        assert row["depth"] == depth and row["files_equal"] and row["disk_bytes"] == row["predicted_bytes"]
        assert row["decode"]["ms_mean"] > 0 and row["decode"]["entries"] <= 64
    n = r["rows"][-1]["tokens"]
    assert r["rows"][-1]["predicted_bytes"] == 4 * n + 32 * 4 * sum(n // 8**l for l in range(1, 5))
    assert "| 5,000 | 4 |" in open(out + ".md").read()


def test_long_history_resumes_from_its_saved_tree(tmp_path, capsys):
    """--resume goes on from the tree in --tree: a stop at or below its length ingests nothing, a longer one ingests
    only the rest; without --resume a held tree is refused (and --resume without one), in one line, before any work."""
    out, tree = str(tmp_path / "lh"), str(tmp_path / "tree")
    first = long_history.main(SMALL + ["--lengths", "700", "--decode", "2", "--warmup", "1", "--tree", tree,
                                       "--out", out])
    held = first["rows"][-1]["tokens"]  # 700 + the decoded tokens, saved
    with pytest.raises(SystemExit):
        long_history.main(SMALL + ["--lengths", "900", "--tree", tree, "--out", out])
    assert "already holds a tree; give a new directory or --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        long_history.main(SMALL + ["--lengths", "900", "--resume", "--tree", str(tmp_path / "none"), "--out", out])
    assert "--resume needs --tree with a saved tree" in capsys.readouterr().err
    r = long_history.main(SMALL + ["--lengths", "700,900", "--decode", "2", "--warmup", "1", "--tree", tree,
                                   "--resume", "--out", out])
    # each stop decodes warmup + decode = 3 tokens; the stop at 700 ingests nothing, the one at 900 the rest
    assert r["resumed_from"] == held and [row["tokens"] for row in r["rows"]] == [held + 3, 900 + 3]
    assert r["ingested"] == 900 - (held + 3)


def test_ingest_stream_saves_as_it_goes_and_refuses_bad_input(tmp_path):
    m, path = small_model(), str(tmp_path / "t")
    s, log = Session(m), io.StringIO()
    ids = np.random.default_rng(0).integers(0, 97, 10_000)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 97\)"):
        ingest_stream(s, np.append(ids, 97), save_to=path, out=log)
    assert len(s.tree) == 0 and not os.path.exists(path)  # nothing ingested, nothing written
    rate = ingest_stream(s, ids, chunk=1000, save_to=path, save_every=3000, out=log, every_s=0.0)
    assert rate > 0 and len(s.tree) == 10_000 and s.tree.depth == 4
    counts = json.load(open(os.path.join(path, "meta.json")))["counts"]
    assert counts[0] == 9000  # saved after 3,000, 6,000 and 9,000 tokens; the caller saves the rest
    lines = log.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[ingest] 10,000 / 10,000 tokens (100%)")
    assert "tokens/s | ETA 0 s | depth 4" in lines[-1]
    s.save(path)
    again = Session.open(m, path)
    assert again.tree.tokens(0, 10_000).tolist() == ids.tolist()


def test_long_history_retrieval_cells_on_book_text(data_dir, tmp_path):
    """--retrieval at a stop: every (task, method) row over the same planted prompts, the oracle arm zooms the needles
    raw every time (so planting and zooming really happen), the saved history keeps its bytes (planted in memory
    only) and the summary carries retrieval per task, method and length."""
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir, mc=True)
    out = str(tmp_path / "lh")
    r = long_history.main(["--ckpt", ckpt, "--data-dir", data_dir, "--lengths", "2000,5000", "--retrieval", "5000",
                           "--trials", "4", "--decode", "2", "--warmup", "0", "--threads", "1", "--out", out,
                           "--tasks", "passkey", "--tasks-at", "5000=passkey,multikey,vartrack",  # (at 5,000 tokens)
                           "--distractors", "1",  # (a 146-word corpus)
                           "--tree", str(tmp_path / "tree")])
    rows = r["retrieval"]
    ran = [g["task"] for g in r["retrieval_gate"] if g["zoom_entries"] <= g["target"]]
    assert ran == ["passkey", "multikey"]  # a chain's three needles do not fit a budget of 128 at 5,000 tokens
    assert [(x["task"], x["method"]) for x in rows] == [(k, m) for k in ran
                                                        for m in ("lens", "recency", "oracle", "truncation")]
    assert all(x["history"] == 5000 and x["trials"] == 4 and 0 <= x["accuracy"] <= 1 for x in rows)
    oracle = [x for x in rows if x["method"] == "oracle"]
    assert all(x["telemetry"]["needle_raw"] == 1.0 and x["telemetry"]["expands"] >= 1 for x in oracle)
    assert set(r["summary"]["retrieval"]) == {"lens", "recency", "oracle", "truncation"}
    assert list(r["summary"]["retrieval"]["lens"]) == [5000] and r["rows"][-1]["files_equal"]
    assert set(r["summary"]["tasks"]) == {"passkey", "multikey"}
    assert r["summary"]["tasks"]["multikey"]["oracle"] == {5000: next(
        x["accuracy"] for x in rows if (x["task"], x["method"]) == ("multikey", "oracle"))}
    text = long_history.BookText(data_dir)
    first = text.take(2000)
    saved = np.fromfile(tmp_path / "tree" / "tokens.bin", np.int32)
    assert saved[:len(first)].tolist() == first.tolist()  # book text, and no needle was written to disk
    assert "| passkey | 5,000 | oracle |" in open(out + ".md").read()
    assert r["retrieval_gate"] == [dict(history=5000, task=t, zoom_entries=zoom_entries(5002, 8, 16, n), target=120)
                                   for t, n in (("passkey", 1), ("multikey", 1), ("vartrack", 3))]


def test_book_text_passes_stream_the_text_again_then_stop(data_dir):
    """--text-passes: the second pass starts again at the first token; past the last pass, one clear error."""
    def stream(text):
        parts = []
        while True:
            try:
                parts.append(text.take(5000))
            except ValueError as e:
                return np.concatenate(parts), str(e)
    once, err = stream(long_history.BookText(data_dir))
    assert "--text-passes" in err and len(once) > 10_000
    text = long_history.BookText(data_dir, passes=2)
    twice, _ = stream(text)
    assert text.passes_used == 2 and twice.tolist() == once.tolist() * 2
    with pytest.raises(ValueError, match="must be >= 1"):
        long_history.BookText(data_dir, passes=0)


def test_long_history_retrieval_gate_skips_a_budget_too_small_for_the_zoom_path(data_dir, tmp_path, capsys):
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir, mc=True)
    r = long_history.main(["--ckpt", ckpt, "--data-dir", data_dir, "--lengths", "5000", "--retrieval", "5000",
                           "--retrieval-budget", "64", "--trials", "2", "--decode", "1", "--warmup", "0",
                           "--threads", "1", "--out", str(tmp_path / "lh")])
    assert r["retrieval"] == [] and r["retrieval_gate"][0]["target"] == 56 < r["retrieval_gate"][0]["zoom_entries"]
    assert "5,000 tokens, passkey skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        long_history.main(["--ckpt", ckpt, "--data-dir", data_dir, "--lengths", "5000", "--retrieval", "5000",
                           "--retrieval-budget", "256", "--out", str(tmp_path / "lh2")])
    for bad in ("2000=passkey", "5000=", "x=passkey", "5000=needle"):  # not a retrieval stop; no task; not a length
        with pytest.raises(SystemExit):
            long_history.main(["--ckpt", ckpt, "--data-dir", data_dir, "--lengths", "5000", "--retrieval", "5000",
                               "--tasks-at", bad, "--out", str(tmp_path / "lh3")])


def test_plan_prompt_plants_the_needles_where_it_says(data_dir):
    """plan_prompt: a kv task's asked needle at its depth among non-overlapping look-alikes, and a variable-tracking
    chain in history order, each needle where `needles` says once written over the history."""
    s = Session(small_model(vocab=512))
    s.ingest(np.random.default_rng(1).integers(0, 90, 3000))
    needles = long_history.retrieval.Needles(prepare.load_tokenizer(data_dir))
    plan = long_history.plan_prompt(s.tree, needles, "multikey", 0.3, np.random.default_rng(0), distractors=2)
    (at, n), = plan["needles"]
    assert len(plan["spots"]) == 3 and n == 7 and 900 - long_history.retrieval.JITTER < at <= 900
    starts = sorted(p for p, _ in plan["spots"])
    assert all(b - a >= 7 for a, b in zip(starts, starts[1:]))  # no needle overwrites another
    for pos, ids in plan["spots"]:
        s.tree.rewrite(pos, ids)
    needle = s.tree.tokens(at, at + n).tolist()
    assert needle[1] == plan["question"][1] and needle[2:6] == plan["answer"]  # <|key|> k v1..v4 <|value|>
    chain = long_history.plan_prompt(s.tree, needles, "vartrack", 0.5, np.random.default_rng(1), distractors=1)
    assert len(chain["spots"]) == 6 and len(chain["needles"]) == 3
    assert [a for a, _ in chain["needles"]] == sorted(a for a, _ in chain["needles"])  # the hops in history order
    for pos, ids in chain["spots"]:
        s.tree.rewrite(pos, ids)
    hops = [s.tree.tokens(a, a + n).tolist() for a, n in chain["needles"]]
    assert [h[1] for h in hops] == chain["question"][1:] + chain["answer"][:2]  # V -> X1, X1 -> X2, X2 -> X3
    assert [h[2] for h in hops] == chain["answer"]


def test_copy_gap_decodes_as_the_model_and_refuses_a_history_beyond_the_block(data_dir, tmp_path, capsys):
    """bench/copy_gap.py: its greedy answer at gap 0 is the model's own greedy continuation; a row per gap; a history
    longer than the base's block is refused with one line."""
    import copy_gap
    ckpt = save_ckpt(tmp_path / "ckpt.pt", data_dir)
    rows = copy_gap.main(["--ckpt", ckpt, "--gaps", "0,5000", "--history", "96", "--trials", "2"])
    assert [r["gap"] for r in rows] == [0, 5000] and all(r["trials"] == 2 for r in rows)
    gpt = GPT(GPTConfig(**torch.load(ckpt, weights_only=False)["model_args"]))
    gpt.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
    ids = np.random.default_rng(0).integers(0, 500, 40)
    want = [int(t) for t in gpt.eval().generate(torch.as_tensor(ids)[None], 4, temperature=0.0)]
    assert copy_gap.answer(gpt, ids, torch.arange(40, dtype=torch.float64), 4) == want
    with pytest.raises(SystemExit):
        copy_gap.main(["--ckpt", ckpt, "--history", "4096"])
    assert "above the base's 128-token block" in capsys.readouterr().err
