"""Unbounded history on one CPU (issue 11): a 16M-token history streamed into a MegaContext session, with ingest speed,
resident memory, tree size on disk against the format's prediction, and decode latency per token by history length;
plus the retrieval cells, kept in one separate function until the demo's harness is wired to it.

    python bench/long_history.py                                   # untrained model of the demo's shape, 16M tokens
    python bench/long_history.py --ckpt out/demo/ckpt.pt           # a train.py checkpoint (its GistNet/LensNet if any)
    python bench/long_history.py --lengths 65536,1048576 --decode 32 --out /tmp/lh   # a quick look

Model: --ckpt, or an untrained model of the demo's shape (vocab 1024, 4 layers x 4 heads x 128, block 512; K = 8,
budget 128, tail 32, GistNet 2 layers, LensNet width 64; flags below). Ingest and decode cost do not depend on the
weights, so an untrained model measures them. History: random token ids streamed with session.ingest_stream in 64k
chunks, the session saved to a tree directory every --save-every tokens (the tree's RAM tail stays bounded). At each
length of --lengths the stream pauses: the session is saved and reopened from disk (memory-mapped, checksums
verified), the data files' bytes are compared to the format's prediction (4 bytes per token, d values of the gist
dtype per gist, every level), and --decode tokens are decoded greedily after --warmup (refocus every K tokens; each
token timed with its refocus). Peak RSS (ru_maxrss, Linux) is read at each length: flat memory means equal peaks.
Writes <out>.json and <out>.md (default bench/results/long_history_cpu); the JSON's top-level `summary` is
{"ingest_tokens_per_s": x, "peak_rss_mb": {tokens: mb}, "retrieval": {method: {tokens: accuracy}}}.
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
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

from decode_latency import rss_mb  # noqa: E402
from megacontext import MegaContextConfig, MegaContextModel  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sample import mc_model  # noqa: E402
from session import Session, ingest_stream  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402
from tree import GIST_DTYPES, level_file  # noqa: E402

RETRIEVAL_NOTE = ("retrieval cells not run: retrieval_cells() is not wired to bench/longctx.py's harness yet, and the "
                  "demo's base copies a raw needle from at most ~2k positions back (bench/results/mc_demo_cpu.md)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=None, help="train.py checkpoint (default: an untrained model of the shape below)")
    p.add_argument("--lengths", default="65536,1048576,4194304,16777216", help="history lengths to stop at, tokens")
    p.add_argument("--decode", type=int, default=128, help="timed decode steps per length")
    p.add_argument("--warmup", type=int, default=16, help="untimed decode steps before them")
    p.add_argument("--save-every", type=int, default=1 << 20, help="tokens between saves while streaming")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "long_history_cpu"), help="output prefix")
    p.add_argument("--tree", default=None, help="tree directory (default: a temporary one, removed at the end)")
    shape = p.add_argument_group("model shape without --ckpt (MegaContext flags apply with --ckpt too)")
    for flag, default in (("vocab", 1024), ("n-layer", 4), ("n-head", 4), ("n-embd", 128), ("block-size", 512),
                          ("gist-layers", 2), ("lens-width", 64)):
        shape.add_argument(f"--{flag}", type=int, default=default)
    shape.add_argument("--block", type=int, default=None, help="K (default 8, or the checkpoint's)")
    shape.add_argument("--budget", type=int, default=None, help="w_max (default 128, or the checkpoint's)")
    shape.add_argument("--recent", type=int, default=None, help="protected tail (default 32, or the checkpoint's)")
    shape.add_argument("--policy", default=None, choices=["lens", "recency"])
    shape.add_argument("--gist-dtype", default="float32", choices=GIST_DTYPES, help="tree storage of gists")
    args = p.parse_args(argv)
    try:
        args.lengths = sorted(int(x) for x in args.lengths.split(","))
    except ValueError:
        fail(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if args.lengths[0] < 1 or min(args.decode, args.warmup) < 0 or args.save_every < 1:
        fail("need lengths >= 1, decode and warmup >= 0 and save-every >= 1")
    return args


def build_model(args) -> MegaContextModel:
    """The checkpoint's GPT (and GistNet/LensNet/config when trained) or an untrained model of the demo's shape."""
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        gpt = GPT(GPTConfig(**ckpt["model_args"]))
        gpt.load_state_dict(ckpt["model"])
        ns = types.SimpleNamespace(block=args.block, budget=args.budget, recent=args.recent, policy=args.policy)
        return mc_model(ckpt, ns, gpt.eval())
    torch.manual_seed(args.seed)
    gpt = GPT(GPTConfig(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                        n_embd=args.n_embd)).eval()
    cfg = MegaContextConfig(block_k=args.block or 8, w_max=args.budget or 128, recent_tokens=args.recent or 32,
                            policy=args.policy or "lens", gist_layers=args.gist_layers, lens_width=args.lens_width,
                            gist_dtype=args.gist_dtype)
    return MegaContextModel(gpt, cfg).eval()


def predicted_bytes(n: int, K: int, d: int, dtype: str) -> dict:
    """Bytes of each data file of a v2 tree of n tokens: int32 ids, then floor(n / K**l) gists of d values per level."""
    out, level = {"tokens.bin": 4 * n}, 1
    while n // K**level:
        out[level_file(level)] = n // K**level * d * np.dtype(dtype).itemsize
        level += 1
    return out


@torch.no_grad()
def decode(session: Session, n: int, warmup: int) -> dict:
    """Greedy decode of warmup + n tokens, refocusing every K; per-token latency (with its refocus) of the last n."""
    times, refocus = [], 0
    for i in range(warmup + n):
        t0 = time.perf_counter()
        if session.pending >= session.cfg.refocus_tokens:
            session.refocus()
            refocus += i >= warmup
        session.step(0.0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = [1e3 * t for t in times]
    return dict(ms_mean=statistics.mean(ms), ms_p50=statistics.median(ms), ms_p90=float(np.percentile(ms, 90)),
                refocus_per_token=refocus / n, entries=len(session.wc))


# ----------------------------------------------------------------------------------------------------------------
# retrieval: the function the demo's harness plugs into


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p, den = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / den, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def retrieval_cells(session_factory, prompt_builder, histories, trials: int, methods=("lens", "recency", "truncation"),
                    n_new: int = 8, seed: int = 0) -> dict:
    """Accuracy per (method, history length) with Wilson 95 % intervals and refocus steps per answer.

    session_factory(method, history) -> a fresh session-like object: .ingest(ids) and .step() -> next token id (a
        session.Session, or a wrapper for truncation). It may already hold a shared haystack prefix (a tree opened
        from disk), in which case prompt_builder returns only the rest.
    prompt_builder(history, rng) -> (ids: int64 array to ingest, check: callable(list of generated ids) -> bool).
    Every method sees the same prompts (one rng per history, seeded). Long prompts stream in through ingest_stream.
    Returns {method: {history: {"accuracy", "lo", "hi", "correct", "trials", "refocus_steps"}}}."""
    out = {m: {} for m in methods}
    for L in histories:
        prompts = [prompt_builder(L, rng) for rng in [np.random.default_rng([seed, L])] for _ in range(trials)]
        for m in methods:
            correct, steps = 0, []
            for ids, check in prompts:
                s = session_factory(m, L)
                ingest_stream(s, ids, out=None) if isinstance(s, Session) else s.ingest(ids)
                before = s.alloc.steps if isinstance(s, Session) else 0
                correct += bool(check([s.step() for _ in range(n_new)]))
                steps.append(s.alloc.steps - before if isinstance(s, Session) else 0)
            lo, hi = wilson(correct, trials)
            out[m][L] = dict(accuracy=correct / trials, lo=lo, hi=hi, correct=correct, trials=trials,
                             refocus_steps=statistics.mean(steps) if steps else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------------------


def markdown(r) -> str:
    s = r["summary"]
    lines = [f"# Long history on {r['device']} ({r['threads']} threads), {r['date']}, commit {r['commit']}", "",
             f"`{r['command']}`", "", f"Model: {r['model_note']}; K = {r['mc']['block_k']}, budget {r['mc']['w_max']}, "
             f"tail {r['mc']['recent_tokens']}, policy {r['mc']['policy']}; {r['gistnet']}.", "",
             f"Ingest: **{s['ingest_tokens_per_s']:,.0f} tokens/s** over {r['ingested']:,} tokens in "
             f"{r['ingest_s']:,.0f} s (load average at start {r['load_start']}, at end {r['load_end']}).", "",
             "| history | depth | peak RSS MB | RSS now MB | tree data MB | predicted MB | equal | open s | "
             "decode ms/token mean (p50, p90) | entries |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        d = row["decode"]
        lines.append(f"| {row['history']:,} | {row['depth']} | {row['peak_rss_mb']:.0f} | {row['rss_mb']:.0f} | "
                     f"{row['disk_bytes'] / 2**20:.1f} | {row['predicted_bytes'] / 2**20:.1f} | "
                     f"{row['disk_bytes'] == row['predicted_bytes']} | {row['open_s']:.2f} | "
                     f"{d['ms_mean']:.2f} ({d['ms_p50']:.2f}, {d['ms_p90']:.2f}) | {d['entries']} |")
    first, last = r["rows"][0], r["rows"][-1]
    lines += ["", f"Decode latency at {last['history']:,} / at {first['history']:,} tokens: "
              f"{last['decode']['ms_mean'] / first['decode']['ms_mean']:.2f}x (mean), "
              f"{last['decode']['ms_p50'] / first['decode']['ms_p50']:.2f}x (p50).", "",
              "Retrieval: " + (json.dumps(s["retrieval"]) if s["retrieval"] else r["retrieval_note"]), ""]
    return "\n".join(lines)


def main(argv):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = build_model(args)
    except ValueError as e:
        fail(str(e))
    cfg, d = model.cfg, model.gpt.config.n_embd
    tmp = tempfile.TemporaryDirectory() if args.tree is None else None
    tree_dir = args.tree or os.path.join(tmp.name, "tree")
    if os.path.exists(os.path.join(tree_dir, "meta.json")):
        fail(f"--tree {tree_dir} already holds a tree; give a new directory")
    session = Session(model)
    print(f"[long_history] {session.describe()}", file=sys.stderr)
    rng, rows, ingest_s, ingested = np.random.default_rng(args.seed), [], 0.0, 0
    load_start = os.getloadavg()[0]
    for L in args.lengths:
        n = L - len(session.tree)
        if n > 0:
            t0 = time.perf_counter()
            for i in range(0, n, 1 << 22):  # random ids made 4M at a time, so they take no memory worth counting
                ids = rng.integers(0, model.gpt.config.vocab_size, min(1 << 22, n - i))
                ingest_stream(session, ids, save_to=tree_dir, save_every=args.save_every)
            ingest_s, ingested = ingest_s + time.perf_counter() - t0, ingested + n
        peak = rss_mb()[1]  # peak of the ingest up to here (before the decode below)
        session.save(tree_dir)
        t0 = time.perf_counter()
        session = Session.open(model, tree_dir)  # memory-mapped, crc32 verified by streaming the files
        open_s = time.perf_counter() - t0
        dec = decode(session, args.decode, args.warmup)
        session.save(tree_dir)
        sizes = {f: os.path.getsize(os.path.join(tree_dir, f)) for f in os.listdir(tree_dir) if f.endswith(".bin")}
        want = predicted_bytes(len(session.tree), cfg.K, d, cfg.gist_dtype)
        rows.append(dict(history=L, tokens=len(session.tree), depth=session.tree.depth, peak_rss_mb=peak,
                         rss_mb=rss_mb()[0], disk_bytes=sum(sizes.values()), predicted_bytes=sum(want.values()),
                         files_equal=sizes == want, meta_bytes=os.path.getsize(os.path.join(tree_dir, "meta.json")),
                         open_s=open_s, decode=dec))
        print(f"[long_history] {L:>11,} tokens: depth {session.tree.depth}, peak RSS {peak:.0f} MB, tree "
              f"{sum(sizes.values()) / 2**20:.1f} MB (predicted {sum(want.values()) / 2**20:.1f}), decode "
              f"{dec['ms_mean']:.2f} ms/token (p50 {dec['ms_p50']:.2f})", file=sys.stderr)
    if tmp is not None:
        tmp.cleanup()

    git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
    result = dict(
        summary=dict(ingest_tokens_per_s=ingested / max(ingest_s, 1e-9),
                     peak_rss_mb={r["history"]: round(r["peak_rss_mb"], 1) for r in rows}, retrieval={}),
        retrieval_note=RETRIEVAL_NOTE, device="cpu", threads=torch.get_num_threads(), torch=torch.__version__,
        date=datetime.date.today().isoformat(), commit=git("rev-parse", "--short", "HEAD"),
        dirty=bool(git("status", "--porcelain")), command="python bench/long_history.py " + " ".join(argv),
        load_start=round(load_start, 2), load_end=round(os.getloadavg()[0], 2), cpus=os.cpu_count(),
        model_note=f"checkpoint {args.ckpt}" if args.ckpt else "untrained (ingest and decode cost do not depend on "
        "the weights)", gpt=dataclasses.asdict(model.gpt.config), mc=dataclasses.asdict(cfg),
        gistnet=model.gistnet.describe(), ingested=ingested, ingest_s=ingest_s, decode_steps=args.decode, rows=rows)
    write_results(args.out, result, markdown(result))
    return result


def write_results(prefix: str, result: dict, md: str):
    """<prefix>.json and <prefix>.md (folders made as needed); the markdown also goes to stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for ext, text in (("json", json.dumps(result, indent=1)), ("md", md)):
        with open(f"{prefix}.{ext}", "w") as f:
            f.write(text)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
