"""bench/long_history.py and session.ingest_stream: a long history streams in with periodic saves, the tree on disk
has exactly the bytes the format predicts, the summary has the issue's shape; the retrieval function's Wilson
intervals and its session path."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import long_history  # noqa: E402
from megacontext import MegaContextConfig, MegaContextModel  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from session import Session, ingest_stream  # noqa: E402

SMALL = ["--vocab", "97", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--budget", "64",
         "--recent", "16", "--lens-width", "16", "--threads", "1"]


def small_model():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    cfg = MegaContextConfig(block_k=8, w_max=64, recent_tokens=16, lens_width=16)
    return MegaContextModel(gpt, cfg).eval()


def test_long_history_bench_small(tmp_path):
    out = str(tmp_path / "lh")
    r = long_history.main(SMALL + ["--lengths", "700,5000", "--decode", "4", "--warmup", "1", "--save-every", "1500",
                                   "--out", out])
    saved = json.load(open(out + ".json"))
    assert set(saved["summary"]) == {"ingest_tokens_per_s", "peak_rss_mb", "retrieval"}
    assert saved["summary"]["retrieval"] == {} and "not run" in saved["retrieval_note"]
    assert list(r["summary"]["peak_rss_mb"]) == [700, 5000] and r["summary"]["ingest_tokens_per_s"] > 0
    for row, depth in zip(r["rows"], (3, 4)):  # 8**3 <= 700 + 5 decoded < 8**4 <= 5000
        assert row["depth"] == depth and row["files_equal"] and row["disk_bytes"] == row["predicted_bytes"]
        assert row["decode"]["ms_mean"] > 0 and row["decode"]["entries"] <= 64
    n = r["rows"][-1]["tokens"]
    assert r["rows"][-1]["predicted_bytes"] == 4 * n + 32 * 4 * sum(n // 8**l for l in range(1, 5))
    assert "| 5,000 | 4 |" in open(out + ".md").read()


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


def test_wilson_interval():
    assert long_history.wilson(0, 30) == pytest.approx((0.0, 0.1135), abs=1e-4)
    assert long_history.wilson(30, 30) == pytest.approx((0.8865, 1.0), abs=1e-4)
    lo, hi = long_history.wilson(27, 30)
    assert lo == pytest.approx(0.7437, abs=1e-4) and hi == pytest.approx(0.9654, abs=1e-4)


class Oracle:
    """A stand-in session that 'retrieves' by reading the needle: right on even histories' prompts only."""

    def __init__(self, right):
        self.right, self.ids = right, None

    def ingest(self, ids):
        self.ids = list(ids)

    def step(self):
        return self.ids[0] if self.right else -1


def test_retrieval_cells_api():
    def builder(history, rng):
        value = int(rng.integers(0, 97))
        ids = np.concatenate([[value], rng.integers(0, 97, history - 1)])
        return ids, lambda out, v=value: out[0] == v

    m = small_model()
    factory = lambda method, history: (Oracle(method == "oracle") if method != "lens" else Session(m))  # noqa: E731
    r = long_history.retrieval_cells(factory, builder, [100, 300], trials=5, methods=("oracle", "never", "lens"),
                                     n_new=3)
    assert r["oracle"][300]["accuracy"] == 1.0 and r["oracle"][300]["lo"] == pytest.approx(0.5655, abs=1e-4)
    assert r["never"][100]["correct"] == 0 and r["never"][100]["trials"] == 5
    assert 0 <= r["lens"][300]["accuracy"] <= 1 and r["lens"][300]["refocus_steps"] >= 0
