"""Long-lived memories on one CPU (issue 20): curate a 4M-token history, then ask every needle again; a library tree
mounted read-only; the page cache's hit rate with and without prefetch.

    python bench/curation.py --data-dir data/pg1k                                  # untrained model of the demo's shape
    python bench/curation.py --ckpt out/mc_demo/lens_counterfactual/ckpt.pt --data-dir data/pg1k   # the demo's model
    python bench/curation.py --data-dir data/pg1k --tokens 262144 --library 65536 --needles 8 --out /tmp/cur  # quick

The experiment: --tokens of book text (the test, val, then train splits) with --needles key -> value needles
(retrieval.py's multikey, no look-alikes: every key is asked once) planted evenly throughout, streamed into a saved
session. Every needle is asked once (the question ingested, the oracle zoom: the recency pyramid plus a perfect
LensNet's scores on the needle, refocus until stable before each answer token, greedy answer) on the tree as saved;
the asked half (even needles) is asked in sessions that are saved, so their zooms go into the tree's access
telemetry; the other half in sessions that are not. Then `curate.py apply` with --policy (default
configs/curate/default.py) and every needle is asked again. A library of --library tokens with its own needles is
saved as a separate tree and asked twice: as the session's own tree, and mounted (read-only, half the budget) into a
session over other text. Retrieval is the share of answers equal to the needle's value when --ckpt is given (the
demo's model); an untrained model cannot answer, so without --ckpt it is the share of needles whose tokens all
reach the working context raw while the answer is decoded (`measure` in the summary says which), which is what
curation can take away. Cache: the page cache's hits over lookups in the post-curation asks, with prefetch on and
(the same asks again) off.

Writes <out>.json and <out>.md (default bench/results/curation_cpu); the JSON's `summary` is {"bytes_before",
"bytes_after" (the token files: what curation drops), "accessed_retrieval_before", "accessed_retrieval_after",
"unaccessed_retrieval_after", "mounted_retrieval", "cache_hit_rate"} plus the measure, the own-tree library
retrieval, the unaccessed needles' retrieval before, the whole trees' bytes and the cache without prefetch.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import curate  # noqa: E402
import longctx  # noqa: E402
import retrieval  # noqa: E402
from checkpoint import mc_model  # noqa: E402
from configs import load_config  # noqa: E402
from long_history import BookText, write_results  # noqa: E402
from megacontext import MegaContextConfig, MegaContextModel, recency_scores  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from session import Session, ingest_stream, open_mounts  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default="data/pg1k", help="prepared data: book text and the needles' tokenizer")
    p.add_argument("--ckpt", default=None, help="a train.py checkpoint (else an untrained model of the demo's shape)")
    p.add_argument("--tokens", type=int, default=1 << 22, help="history length (>= 4M for the issue's run)")
    p.add_argument("--needles", type=int, default=32, help="needles planted evenly through the history")
    p.add_argument("--library", type=int, default=1 << 20, help="tokens of the mounted library tree")
    p.add_argument("--library-needles", type=int, default=8)
    p.add_argument("--own", type=int, default=1 << 16, help="tokens of the session that mounts the library")
    p.add_argument("--policy", default=os.path.join(REPO, "configs", "curate", "default.py"))
    p.add_argument("--budget", type=int, default=256, help="working-context entries (the base's block is 512)")
    p.add_argument("--block", type=int, default=8, help="K")
    p.add_argument("--recent", type=int, default=32, help="protected tail")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "curation_cpu"))
    p.add_argument("--work", default=None, help="folder for the trees (default: a temp folder, removed at the end)")
    args = p.parse_args(argv)
    if min(args.tokens, args.needles, args.library, args.library_needles, args.own) < 1:
        fail("--tokens, --needles, --library, --library-needles and --own must be >= 1")
    return args


def build_model(args) -> MegaContextModel:
    """The checkpoint's model with a recency policy (the oracle zooms), or an untrained one of the demo's shape."""
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        gpt = GPT(GPTConfig(**ckpt["model_args"]))
        gpt.load_state_dict(ckpt["model"])
        ns = types.SimpleNamespace(block=args.block, budget=args.budget, recent=args.recent, policy="recency")
        return mc_model(ckpt, ns, gpt.eval())
    torch.manual_seed(args.seed)
    gpt = GPT(GPTConfig(vocab_size=1024, block_size=512, n_layer=4, n_head=4, n_embd=128)).eval()
    cfg = MegaContextConfig(block_k=args.block, w_max=args.budget, recent_tokens=args.recent, policy="recency",
                            gist_layers=2, lens_width=64)
    return MegaContextModel(gpt, cfg).eval()


def history_with_needles(text: BookText, n: int, count: int, needles, rng, avoid: set) -> tuple[np.ndarray, list]:
    """n tokens of book text with `count` key -> value needles written over it, evenly spaced (jittered): (ids,
    [dict(at, length, question, answer)]). Needle words avoid those used before (`avoid` grows) and the tokens the
    base reads raw at the end (where the question lands)."""
    parts, have = [], 0
    while have < n:
        parts.append(text.take(n - have))
        have += len(parts[-1])
    ids = np.concatenate(parts)
    avoid |= set(ids[-1024:].tolist())
    out, step = [], n // count
    for i in range(count):
        t = needles.task("multikey", rng, avoid, distractors=0)
        needle = t.needles[0]
        at = i * step + int(rng.integers(0, max(1, step - len(needle))))
        ids[at:at + len(needle)] = needle
        out.append(dict(at=at, length=len(needle), question=t.question, answer=t.answer))
    return ids, out


def stream_into(mc, ids, path: str):
    s = Session(mc)
    ingest_stream(s, ids, save_to=path, out=None)
    s.save(path)


@torch.no_grad()
def ask(mc, path: str, q: dict, mount: str | None = None, save: bool = False, prefetch: bool = True):
    """(answer right, needle raw while answering, cache summary) of one question. mount: the needle lives in this
    library, mounted into the session over `path`; else in `path` itself. save: keep the question, the answer and
    the zoom's access telemetry in the tree."""
    mounts = open_mounts(mc, [mount]) if mount else ()
    s = Session.open(mc, path, verify=False, mounts=mounts, mount_share=0.5)
    s.prefetch = prefetch
    part = s.mounts[0] if mount else s
    span = [(q["at"], q["length"])]
    oracle = longctx.oracle_scorer(span)

    def scorer(wc):  # the oracle on the needle's tree, the recency pyramid elsewhere
        return oracle(wc) if wc is part.wc else recency_scores(wc, wc.w_max - wc.K)
    s.ingest(q["question"])
    got, raw = [], False
    for _ in q["answer"]:
        s.refocus(until_stable=True, scorer=scorer)
        raw = raw or longctx.raw_spans(part.wc, span)[0]
        tok = int(s.logits().argmax())
        s.ingest([tok])
        got.append(tok)
    if save:
        s.save(path)
    return got == q["answer"], raw, (part.tree.cache.summary() if mount else s.tree.cache.summary())


def rate(rows, key: str, which) -> float | None:
    vals = [r[key] for r in rows if which(r)]
    return float(np.mean(vals)) if vals else None


def hit_rate(caches) -> float | None:
    hits, misses = sum(c["hits"] for c in caches), sum(c["misses"] for c in caches)
    return hits / (hits + misses) if hits + misses else None


def folder_bytes(path: str, token_only: bool = False) -> int:
    meta = json.load(open(os.path.join(path, "meta.json")))
    names = [meta.get("token_file", "tokens.bin")] if token_only else [
        n for n in os.listdir(path) if n.endswith(".bin")]
    return sum(os.path.getsize(os.path.join(path, n)) for n in names)


def main(argv):
    args = parse_args(argv)
    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    mc = build_model(args)
    needles = retrieval.needles_for(args.data_dir)
    rng, text = np.random.default_rng(args.seed), BookText(args.data_dir)
    work = args.work or tempfile.mkdtemp(prefix="curation-")
    tree, lib, own = (os.path.join(work, n) for n in ("tree", "library", "own"))
    avoid = set()
    ids, qs = history_with_needles(text, args.tokens, args.needles, needles, rng, avoid)
    lib_ids, lib_qs = history_with_needles(text, args.library, args.library_needles, needles, rng, avoid)
    own_ids = history_with_needles(text, args.own, 1, needles, rng, avoid)[0]
    for path, data in ((tree, ids), (lib, lib_ids), (own, own_ids)):
        t = time.time()
        stream_into(mc, data, path)
        print(f"[curation] {path}: {len(data):,} tokens in {time.time() - t:.0f} s", file=sys.stderr)
    measure = "answer" if args.ckpt else "needle_raw"
    rows = []
    for i, q in enumerate(qs):  # before curation; the even needles' zooms are saved into the tree's telemetry
        right, raw, _ = ask(mc, tree, q, save=i % 2 == 0)
        rows.append(dict(needle=i, at=q["at"], accessed=i % 2 == 0, before=right if args.ckpt else raw))
    bytes_before, tree_before = folder_bytes(tree, True), folder_bytes(tree)
    policy = load_config(curate.CurationPolicy, [args.policy])
    report = curate.describe(curate.plan(curate.open_tree(tree)[0], policy), args.policy)
    record = curate.apply(tree, policy, args.policy)
    print(report, file=sys.stderr)
    caches = {True: [], False: []}
    for prefetch in (True, False):
        for r, q in zip(rows, qs):
            right, raw, cache = ask(mc, tree, q, prefetch=prefetch)
            caches[prefetch].append(cache)
            if prefetch:
                r["after"] = right if args.ckpt else raw
    lib_rows = []
    for i, q in enumerate(lib_qs):
        own_right, own_raw, _ = ask(mc, lib, q)
        m_right, m_raw, _ = ask(mc, own, q, mount=lib)
        lib_rows.append(dict(needle=i, own=own_right if args.ckpt else own_raw,
                             mounted=m_right if args.ckpt else m_raw))
    summary = {
        "bytes_before": bytes_before, "bytes_after": folder_bytes(tree, True),
        "accessed_retrieval_before": rate(rows, "before", lambda r: r["accessed"]),
        "accessed_retrieval_after": rate(rows, "after", lambda r: r["accessed"]),
        "unaccessed_retrieval_after": rate(rows, "after", lambda r: not r["accessed"]),
        "mounted_retrieval": rate(lib_rows, "mounted", lambda r: True),
        "cache_hit_rate": hit_rate(caches[True]),
        "measure": measure, "unaccessed_retrieval_before": rate(rows, "before", lambda r: not r["accessed"]),
        "library_own_retrieval": rate(lib_rows, "own", lambda r: True),
        "cache_hit_rate_no_prefetch": hit_rate(caches[False]),
        "tree_bytes_before": tree_before, "tree_bytes_after": folder_bytes(tree)}
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    result = dict(summary=summary, args=vars(args), git=sha, seconds=time.time() - t0,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  curation=record, needles=rows, library=lib_rows)
    write_results(args.out, result, markdown(result, report))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def markdown(r: dict, report: str) -> str:
    s, a = r["summary"], r["args"]

    def f(x):
        return "n/a" if x is None else f"{x:.2f}"
    ratio = s["bytes_before"] / max(s["bytes_after"], 1)
    lib = (f"{f(s['mounted_retrieval'])} mounted vs {f(s['library_own_retrieval'])} as the session's own tree")
    return "\n".join([
        f"# Curation (issue 20): {a['tokens']:,} tokens, {a['needles']} needles, "
        f"{'checkpoint ' + a['ckpt'] if a['ckpt'] else 'untrained model of the demo shape'}",
        "", f"git {r['git'][:12]}, {r['date']}, {r['seconds']:.0f} s. Retrieval measure: **{s['measure']}** "
        + ("(answer == the needle's value)" if s["measure"] == "answer" else
           "(the needle's tokens reach the working context raw while answering; an untrained base cannot answer)"),
        "", "| | value |", "|---|---|",
        f"| token files before → after curation | {s['bytes_before']:,} → {s['bytes_after']:,} bytes "
        f"({ratio:.1f}× smaller) |",
        f"| whole tree (gists included) | {s['tree_bytes_before']:,} → {s['tree_bytes_after']:,} bytes |",
        f"| accessed needles, before → after | {f(s['accessed_retrieval_before'])} → "
        f"{f(s['accessed_retrieval_after'])} |",
        f"| unaccessed needles, before → after | {f(s['unaccessed_retrieval_before'])} → "
        f"{f(s['unaccessed_retrieval_after'])} |",
        f"| library needles | {lib} |",
        f"| page-cache hit rate, prefetch on / off | {f(s['cache_hit_rate'])} / {f(s['cache_hit_rate_no_prefetch'])} |",
        "", "Curation report (dry run before the apply):", "", "```", report, "```", ""])


if __name__ == "__main__":
    main(sys.argv[1:])
