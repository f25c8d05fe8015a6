"""What a refocus costs with the query-conditioned LensNet against the query-independent one (issue 17), same model,
same budget, same history, on the CPU.

    python bench/refocus_cost.py --ckpt out/mc_demo/lens_counterfactual/ckpt.pt --data-dir data/pg1k

A session streams --history tokens of book text, then refocuses every K tokens while it decodes. Each refocus is timed
in two parts: reading the pending tokens through the base (lens_query only; the next decode would read them anyway,
so this moves work rather than adding it, but it is reported) and scoring + the allocator step. The baseline is the
same checkpoint with lens_query, lens_markers and lens_margin off (LensNet's own layers, its type previews). Runs
alternate between the two arms so machine noise hits both alike; medians over --steps refocus steps per run.
Writes <out>.json with summary = {"ratio": median(new) / median(old), "read_ms": ..., "score_ms": {arm: ms}}.
"""
import argparse
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import longctx  # noqa: E402
from megacontext import MegaContextModel  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from session import Session  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402


def arm_model(ckpt, gpt, query: bool) -> MegaContextModel:
    """The checkpoint's MegaContext model, or the same with the question's features off (the pre-issue-17 LensNet)."""
    mc = longctx.session_model(ckpt, gpt, "lens", ckpt["mc_config"]["w_max"], ckpt["mc_config"]["block_k"],
                               ckpt["mc_config"]["recent_tokens"])
    if query:
        return mc
    cfg = dataclasses.replace(mc.cfg, lens_query="", lens_plan=False, lens_markers=0, lens_margin=0)
    old = MegaContextModel(gpt, cfg).eval()
    old.gistnet.load_state_dict(mc.gistnet.state_dict())
    old.lensnet.load_state_dict(mc.lensnet.state_dict(), strict=False)  # (no Indexer)
    return old


def timed_refocus(s: Session, steps: int, ids) -> tuple[list, list]:
    """(read ms, score + allocator ms) of `steps` refocus steps, K new tokens before each."""
    read, score, K = [], [], s.cfg.K
    for i in range(steps):
        s.ingest(ids[i * K:(i + 1) * K])
        t0 = time.perf_counter()
        s._read_question()
        t1 = time.perf_counter()
        s.alloc.step(s.wc, s.scores())
        t2 = time.perf_counter()
        read.append(1e3 * (t1 - t0))
        score.append(1e3 * (t2 - t1))
    return read, score


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a lens-stage checkpoint with lens_query")
    p.add_argument("--data-dir", default=None, help="prepared data (default: the checkpoint's)")
    p.add_argument("--history", type=int, default=4096, help="tokens of book text before the timed refocus steps")
    p.add_argument("--steps", type=int, default=40, help="timed refocus steps per run")
    p.add_argument("--runs", type=int, default=5, help="runs per arm, alternating")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "refocus_cost_cpu"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.ckpt)
    if not ckpt.get("mc_config", {}).get("lens_query"):
        fail(f"{a.ckpt} has no query-conditioned LensNet (mc_config.lens_query is empty)")
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.eval()
    data_dir = a.data_dir or ckpt["config"]["data_dir"]
    try:
        hay = longctx.haystack(data_dir, "val", a.history + a.steps * 8 * a.runs)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    models = {"query": arm_model(ckpt, gpt, True), "saliency": arm_model(ckpt, gpt, False)}
    read, score = [], {arm: [] for arm in models}
    with torch.no_grad():
        for r in range(a.runs):
            for arm, mc in models.items():
                s = Session(mc)
                s.ingest(hay[:a.history])
                s.logits()
                rd, sc = timed_refocus(s, a.steps, hay[a.history:])
                score[arm].append(statistics.median(sc))
                if arm == "query":
                    read.append(statistics.median(rd))
    med = {arm: statistics.median(v) for arm, v in score.items()}
    git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
    result = dict(summary=dict(ratio=med["query"] / med["saliency"], read_ms=statistics.median(read),
                               score_ms=med), runs=dict(score=score, read=read), history=a.history, steps=a.steps,
                  budget=models["query"].cfg.w_max, threads=a.threads, device="cpu", torch=torch.__version__,
                  date=datetime.date.today().isoformat(), commit=git("rev-parse", "--short", "HEAD"),
                  command="python bench/refocus_cost.py " + " ".join(argv), checkpoint=a.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(f"{a.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"refocus (score + allocator), median of {a.runs} runs x {a.steps} steps at {a.history:,} tokens, budget "
          f"{result['budget']}: query-conditioned {med['query']:.2f} ms, query-independent {med['saliency']:.2f} ms "
          f"-> {result['summary']['ratio']:.2f}x; reading the pending tokens first (lens_query): "
          f"{result['summary']['read_ms']:.2f} ms")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
