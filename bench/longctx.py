"""Long-context evaluation (DESIGN §10, issue 5): book NLL vs budget, planted-fact retrieval, telemetry.

    python bench/longctx.py --ckpt out/tiny/ckpt.pt --data-dir data/pg --quick         # CPU, a few minutes
    python bench/longctx.py --ckpt out/small/ckpt.pt --data-dir data/pg --device cuda  # full sizes, one GPU
    python bench/longctx.py --ckpt C --budgets 256,1024 --histories 4096,16384 --out bench/results/mine

Methods (a budget W is the number of entries the base model reads):
  full        every history token raw (only where the history <= --max-full; a base trained at block_size T never
              saw attention spans > T, PoSE trains positions, not spans, so full attention there is no oracle)
  truncation  the newest W tokens
  recency     MegaContext session with the static recency pyramid (policy 'recency', no LensNet)
  lens        MegaContext session with LensNet (policy 'lens') and the checkpoint's GistNet
  mean        the lens session with mean-pooled gists (RMS-normalised mean of the children: GistNet ablation)
A checkpoint without 'gistnet' / 'lensnet' keys runs them untrained (sample.mc_model) and the output says so.

Book NLL: per held-out document of the split, the same end point E = max(histories) tokens into the book; a history
of L tokens is the window [E - L, E). The last H (--horizon) tokens are scored teacher-forced: the method builds a
representation of the first L - H tokens in W - H entries (session methods: cold-start ingest, then the newest
--stream tokens streamed K at a time with a refocus after each, as at run time), then the H tokens follow raw in the
same KV cache, so every scored prediction reads at most W - 1 entries. The WC stays fixed across the horizon (the
dNLL@H setting of DESIGN §4). Reported: mean NLL per token with a 95% bootstrap CI over documents, and the share of
the truncation -> full gap each method recovers, (trunc - method) / (trunc - full), bootstrapped paired over docs
(undefined where full attention is unavailable or not better than truncation).

Retrieval: a needle ("The pass key is 12345. ..." or "The value of key fox-17 is 4821.", with --kv-distractors
other pairs at random depths) is planted at a relative depth of book text (the split's documents, <|bos|> removed),
the whole prompt exactly `history` tokens; the question closes it (query_last) or, as the control, opens it with only
the answer cue at the end (query_first: the question is not in LensNet's view at answer time). Greedy decode; correct
when the first number generated equals the value. Budget fixed (--retrieval-budget).

Telemetry (lens/recency/mean sessions of the NLL runs): allocator swap rate, residency, edits, utilisation
(entries / budget) and budget compliance; decode latency over --decode steps at the longest history against the base
model decoding a plain window of the same size (bench/decode_latency.baseline). Writes <out>.json, <out>.md and, with
matplotlib, <out>_nll.png and <out>_retrieval.png.
"""
import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import kernels  # noqa: E402
import prepare  # noqa: E402
from decode_latency import baseline, pick_device, timed  # noqa: E402
from megacontext import MegaContextConfig, MegaContextModel, check_capacity  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from sample import mc_model  # noqa: E402
from session import Session  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402

METHODS = ("full", "truncation", "recency", "lens", "mean")
SESSION_METHODS = ("recency", "lens", "mean")
QUICK = dict(histories="2048,8192", budgets="256,512", docs=4, retrieval_histories="1024,4096,16384",
             retrieval_budget=512, depths="0.1,0.5,0.9", trials=1, max_full=8192, decode=16)
FULL = dict(histories="4096,16384,65536", budgets="256,512,1024,2048", docs=16,
            retrieval_histories="1024,4096,16384,65536,262144,1048576", retrieval_budget=2048,
            depths="0,0.25,0.5,0.75,1", trials=4, max_full=65536, decode=64)
KV_WORDS = "fox owl elk yak ram cod eel ant bee emu gnu hen jay kit".split()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (base-only or with MC stages)")
    p.add_argument("--data-dir", default=None, help="prepared data (default: the checkpoint's data_dir)")
    p.add_argument("--split", default="val", choices=["val", "test"], help="held-out split")
    p.add_argument("--quick", action="store_true", help="CPU sizes (defaults below come from QUICK, else FULL)")
    p.add_argument("--histories", default=None, help="NLL history lengths, tokens")
    p.add_argument("--budgets", default=None, help="working-context budgets W, entries")
    p.add_argument("--docs", type=int, default=None, help="documents per NLL point (at most)")
    p.add_argument("--horizon", type=int, default=64, help="H: scored tokens at the end of each history")
    p.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    p.add_argument("--max-full", type=int, default=None, help="full attention only up to this history")
    p.add_argument("--block", type=int, default=None, help="K (default: the checkpoint's mc_config, else 32)")
    p.add_argument("--recent", type=int, default=None, help="protected tail (default: mc_config, else 64)")
    p.add_argument("--stream", type=int, default=None, help="newest tokens streamed with refocus (default 8K)")
    p.add_argument("--retrieval-histories", default=None, help="retrieval prompt lengths, tokens ('' = skip)")
    p.add_argument("--retrieval-budget", type=int, default=None, help="fixed W for retrieval")
    p.add_argument("--depths", default=None, help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, default=None, help="needles per (kind, history, depth)")
    p.add_argument("--kinds", default="passkey,kv", help="retrieval tasks")
    p.add_argument("--kv-distractors", type=int, default=3, help="other key-value pairs planted per kv prompt")
    p.add_argument("--decode", type=int, default=None, help="timed decode steps for the overhead (0 = skip)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output path prefix (default bench/results/longctx_<tag>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    a = p.parse_args(argv)
    for k, v in (QUICK if a.quick else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    try:
        ints = lambda s: sorted({int(x) for x in s.split(",") if x.strip()})  # noqa: E731
        a.histories, a.budgets, a.retrieval_histories = ints(a.histories), ints(a.budgets), ints(a.retrieval_histories)
        a.depths = [float(x) for x in a.depths.split(",") if x.strip()]
    except ValueError as e:
        fail(f"bad list argument ({e})")
    a.methods = [m for m in a.methods.split(",") if m]
    a.kinds = [k for k in a.kinds.split(",") if k]
    if set(a.methods) - set(METHODS) or set(a.kinds) - {"passkey", "kv"}:
        fail(f"--methods must be from {','.join(METHODS)} and --kinds from passkey,kv")
    if not a.histories or not a.budgets or a.horizon < 1 or a.docs < 1 or a.trials < 1:
        fail("need at least one history and budget, --horizon >= 1, --docs >= 1 and --trials >= 1")
    if min(a.histories) <= a.horizon:
        fail(f"history {min(a.histories)} must be longer than the horizon H={a.horizon}")
    if any(not 0 <= d <= 1 for d in a.depths):
        fail("--depths must lie in [0, 1]")
    return a


# ----------------------------------------------------------------------------------------------------------------
# models


def mean_gist_model(ckpt, gpt, cfg: MegaContextConfig) -> MegaContextModel:
    """The GistNet ablation: gists are the RMS-normalised mean of their children (no blocks, identity projection),
    read by the same allocator and LensNet as the lens arm."""
    cfg = dataclasses.replace(cfg, gist_pool="mean", gist_layers=0, gist_proj="linear", policy="lens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mc = MegaContextModel(gpt, cfg)
    if "lensnet" in ckpt:
        mc.lensnet.load_state_dict(ckpt["lensnet"])
    return mc.to(gpt.wte.weight.device).eval()


def session_model(ckpt, gpt, method, w_max, K, recent) -> MegaContextModel:
    """MegaContextModel for a session method with a budget of w_max entries (ValueError on an impossible one)."""
    policy = "recency" if method == "recency" else "lens"
    ns = types.SimpleNamespace(block=K, budget=w_max, recent=recent, policy=policy)
    mc = mc_model(ckpt, ns, gpt).to(gpt.wte.weight.device)
    return mean_gist_model(ckpt, gpt, mc.cfg) if method == "mean" else mc


# ----------------------------------------------------------------------------------------------------------------
# book NLL


def stream_session(mc, ids, stream: int) -> Session:
    """A session over `ids`: one cold-start ingest, then the newest `stream` tokens K at a time, refocusing after
    each (at least one refocus), as a reader streaming a book would."""
    s, K = Session(mc), mc.cfg.K
    cut = max(0, len(ids) - stream)
    for i in range(0, cut, 65536):
        s.ingest(ids[i:min(cut, i + 65536)])
    for i in range(cut, len(ids), K):
        s.ingest(ids[i:i + K])
        s.refocus()
    if cut == len(ids):
        s.refocus()
    s.wc.check_invariants(mc.cfg.target)  # 100% budget compliance, or this raises
    return s


@torch.no_grad()
def horizon_nll(gpt, x, mu, sigma, tail, tail_pos: int) -> torch.Tensor:
    """NLL (H,) of the tokens `tail` (H,) after prefix entries x (n, d) at positions mu (n,) float64 with spreads
    sigma (n,); the tail is teacher-forced raw at positions tail_pos.. in the same KV cache."""
    dev, H = gpt.wte.weight.device, len(tail)
    tail = torch.as_tensor(np.asarray(tail, np.int64), device=dev)
    cache = gpt.make_cache(1, len(x) + H)
    logits, _ = gpt(embeds=x[None].to(dev), mu=mu[None].to(dev), sigma=sigma[None].to(dev), cache=cache,
                    last_only=True)
    nll = [F.cross_entropy(logits[0, -1:].float(), tail[:1], reduction="none")]
    if H > 1:
        pos = torch.arange(tail_pos, tail_pos + H - 1, device=dev)
        nll.append(gpt(tail[None, :-1], tail[None, 1:], mu=pos, cache=cache, reduction="none")[1][0])
    return torch.cat(nll).cpu()


def token_prefix(gpt, ids, start: int):
    """(x, mu, sigma) of raw tokens ids at positions start.."""
    x = gpt.wte(torch.as_tensor(np.asarray(ids, np.int64), device=gpt.wte.weight.device))
    return x, torch.arange(start, start + len(ids), dtype=torch.float64), torch.zeros(len(ids))


def session_prefix(s: Session):
    mu, sigma = s.wc.positions(s.model.sigma_scale)
    return s.wc.embeddings(s.tree), mu, sigma


def book_windows(data_dir, split, histories, n_docs):
    """[(doc index, window tokens (E,) int64)] for up to n_docs documents of >= E = max(histories) tokens."""
    tokens, offsets = prepare.load_split(data_dir, split)
    E, lens = max(histories), np.diff(offsets)
    docs = [i for i in range(len(lens)) if lens[i] >= E][:n_docs]
    if not docs:
        raise ValueError(f"history {E:,} tokens is longer than every document of {data_dir}/{split} (the longest "
                         f"has {int(lens.max()):,}); pass shorter --histories")
    return [(i, np.asarray(tokens[offsets[i]:offsets[i] + E], dtype=np.int64)) for i in docs]


def run_nll(gpt, ckpt, args, windows, telemetry):
    """Per-document NLL for every (history, budget, method): {(L, W, method): [nll per doc]}."""
    H, E, K = args.horizon, max(args.histories), args.block
    out = {}
    models = {(W, m): session_model(ckpt, gpt, m, W - H + K, K, args.recent)  # target = w_max - K = W - H
              for W in args.budgets for m in args.methods if m in SESSION_METHODS}
    for L in args.histories:
        for doc, toks in windows:
            win = toks[E - L:]
            prefix, tail = win[:L - H], win[L - H:]
            t0 = time.perf_counter()
            full = None
            if "full" in args.methods and L <= args.max_full:
                full = horizon_nll(gpt, *token_prefix(gpt, prefix, 0), tail, L - H).mean().item()
            for W in args.budgets:
                P = W - H  # prefix entries
                if full is not None:
                    out.setdefault((L, W, "full"), []).append(full)
                if "truncation" in args.methods:
                    n = min(P, len(prefix))
                    nll = horizon_nll(gpt, *token_prefix(gpt, prefix[-n:], L - H - n), tail, L - H)
                    out.setdefault((L, W, "truncation"), []).append(nll.mean().item())
                for m in SESSION_METHODS:
                    if m not in args.methods:
                        continue
                    s = stream_session(models[W, m], prefix, args.stream)
                    nll = horizon_nll(gpt, *session_prefix(s), tail, L - H)
                    out.setdefault((L, W, m), []).append(nll.mean().item())
                    tel = s.alloc.summary()
                    telemetry.setdefault((W, m), []).append(dict(history=L, entries=len(s.wc), **tel,
                                                                 utilisation=len(s.wc) / P))
            print(f"[nll] history {L:>8,} doc {doc:>3}: {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
    return out, models


def bootstrap(values, fn=np.mean, n=2000, seed=0):
    """(point, lo, hi): fn over documents with a 95% percentile-bootstrap interval (values: (docs,) or (k, docs))."""
    v = np.asarray(values, dtype=np.float64)
    docs = v.shape[-1]
    idx = np.random.default_rng(seed).integers(0, docs, (n, docs))
    boots = np.array([fn(v[..., i]) for i in idx], dtype=np.float64)
    boots = boots[np.isfinite(boots)]
    point = float(fn(v))
    if not boots.size:
        return point, None, None
    return point, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def gap_share(v):
    """v: (3, docs) of truncation, method, full NLLs -> (trunc - method) / (trunc - full) of the means."""
    t, m, f = v.mean(-1)
    return (t - m) / (t - f) if t - f > 1e-9 else np.nan


def summarise_nll(per_doc, args):
    rows = []
    for (L, W, m), vals in sorted(per_doc.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]))):
        mean, lo, hi = bootstrap(vals)
        row = dict(history=L, budget=W, method=m, docs=len(vals), nll=mean, ci=[lo, hi], per_doc=vals,
                   delta_trunc=None, delta_trunc_ci=None, gap=None, gap_share=None, gap_share_ci=None)
        trunc, full = per_doc.get((L, W, "truncation")), per_doc.get((L, W, "full"))
        if trunc is not None:  # paired over documents: far tighter than the per-method intervals
            d, dlo, dhi = bootstrap(np.subtract(vals, trunc))
            row["delta_trunc"], row["delta_trunc_ci"] = d, [dlo, dhi]
        if trunc is not None and full is not None:
            row["gap"] = float(np.mean(trunc) - np.mean(full))  # > 0: full attention helps
            if row["gap"] > 1e-9:
                share, slo, shi = bootstrap(np.array([trunc, vals, full]), gap_share)
                row["gap_share"], row["gap_share_ci"] = share, [slo, shi]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# retrieval


def haystack(data_dir, split, n: int) -> np.ndarray:
    """The split's tokens with every <|bos|> removed (book text, documents back to back); ValueError if < n."""
    tokens, _ = prepare.load_split(data_dir, split)
    bos = prepare.load_tokenizer(data_dir).encode_single_token(prepare.BOS)
    hay = np.asarray(tokens, dtype=np.int64)
    hay = hay[hay != bos]
    if len(hay) < n:
        raise ValueError(f"retrieval history {n:,} tokens is longer than all of {data_dir}/{split} "
                         f"({len(hay):,} tokens of text); pass shorter --retrieval-histories")
    return hay


def make_retrieval(hay, enc, kind: str, history: int, depth: float, rng, query_first=False, distractors=3):
    """One retrieval prompt of exactly `history` tokens. The needle starts at token `needle_at`, at relative depth
    `depth` of the book text (distractors included). Returns dict(ids, value, needle, needle_at, question, cue,
    query_first), token lists except ids (np.int64) and value (str)."""
    if kind == "passkey":
        value = str(int(rng.integers(10000, 100000)))
        needle, question, cue = prepare.passkey_text(value)
        others = []
    else:
        words = rng.permutation(KV_WORDS)[:distractors + 1]
        keys = [f"{w}-{int(rng.integers(10, 100))}" for w in words]
        vals = [str(int(rng.integers(1000, 10000))) for _ in keys]
        value = vals[0]
        needle = f" The value of key {keys[0]} is {value}. "
        question, cue = f" What is the value of key {keys[0]}?", f" The value of key {keys[0]} is"
        others = [enc.encode_ordinary(f" The value of key {k} is {v}. ") for k, v in zip(keys[1:], vals[1:])]
    needle_ids, q_ids, cue_ids = enc.encode_ordinary(needle), enc.encode_ordinary(question), enc.encode_ordinary(cue)
    fixed = len(needle_ids) + len(q_ids) + len(cue_ids) + sum(map(len, others))
    n_hay = history - fixed
    if n_hay < 1:
        raise ValueError(f"retrieval history {history} is shorter than the needle and question ({fixed} tokens)")
    start = int(rng.integers(0, len(hay) - n_hay + 1))
    text = list(hay[start:start + n_hay])
    for o in others:  # distractors first, then the needle at its exact depth
        at = int(rng.integers(0, len(text) + 1))
        text[at:at] = o
    at = round(depth * len(text))
    head = q_ids if query_first else []
    ids = head + text[:at] + needle_ids + text[at:] + ([] if query_first else q_ids) + cue_ids
    assert len(ids) == history
    return dict(ids=np.asarray(ids, np.int64), value=value, needle=needle_ids, needle_at=len(head) + at,
                question=q_ids, cue=cue_ids, query_first=query_first)


@torch.no_grad()
def answer(method, gpt, mc, ids, budget, n_new, stream) -> list[int]:
    """Greedy continuation (n_new token ids) of prompt ids under a method."""
    dev = gpt.wte.weight.device
    if method in ("full", "truncation"):
        ctx = ids if method == "full" else ids[-budget:]
        cache = gpt.make_cache(1, len(ctx) + n_new)
        x = torch.as_tensor(ctx, device=dev)[None]
        return [int(t) for t in gpt.generate(x, n_new, temperature=0.0, cache=cache)]
    s = stream_session(mc, ids, stream)
    return [s.step(0.0) for _ in range(n_new)]


def run_retrieval(gpt, ckpt, args, enc):
    hay = haystack(args.data_dir, args.split, max(args.retrieval_histories))
    W, K = args.retrieval_budget, args.block
    models = {m: session_model(ckpt, gpt, m, W, K, args.recent) for m in args.methods if m in SESSION_METHODS}
    rows, rng = [], np.random.default_rng(args.seed)
    for L in args.retrieval_histories:
        t0 = time.perf_counter()
        methods = [m for m in args.methods if m != "full" or L <= args.max_full]
        for kind in args.kinds:
            for depth in args.depths:
                for query_first in (False, True):
                    hits = {m: 0 for m in methods}
                    for _ in range(args.trials):
                        r = make_retrieval(hay, enc, kind, L, depth, rng, query_first, args.kv_distractors)
                        n_new = len(enc.encode_ordinary(" " + r["value"])) + 1
                        for m in methods:
                            text = enc.decode(answer(m, gpt, models.get(m), r["ids"], W, n_new, args.stream))
                            got = re.search(r"\d+", text)
                            hits[m] += bool(got and got.group() == r["value"])
                    rows += [dict(history=L, kind=kind, depth=depth, query_first=query_first, method=m,
                                  trials=args.trials, accuracy=hits[m] / args.trials) for m in methods]
        print(f"[retrieval] history {L:>9,}: {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# telemetry and decode overhead


def summarise_telemetry(tel, overhead):
    rows = []
    for (W, m), recs in sorted(tel.items()):
        res = [r["residency"] for r in recs if r["residency"] is not None]
        rows.append(dict(budget=W, method=m, sessions=len(recs),
                         swap_rate=statistics.mean(r["swap_rate"] for r in recs),
                         residency=statistics.mean(res) if res else None,
                         expands=statistics.mean(r["expands"] for r in recs),
                         collapses=statistics.mean(r["collapses"] for r in recs),
                         utilisation=statistics.mean(r["utilisation"] for r in recs), budget_compliance=1.0,
                         **overhead.get((W, m), {})))
    return rows


def decode_overhead(gpt, models, windows, args, device):
    """{(W, method): {mc_ms, base_ms, overhead, entries}}: decode steps of a session at the longest history against
    the base model over a KV window of the same number of entries."""
    out, L, H = {}, max(args.histories), args.horizon
    if not args.decode or not windows:
        return out
    warm = max(2, args.decode // 4)
    for (W, m), mc in models.items():
        if m == "mean":
            continue  # same cost as lens
        s = stream_session(mc, windows[0][1][:L - H], args.stream)  # the window of the longest history
        times, entries = [], []
        for i in range(warm + args.decode):
            dt_refocus = 0.0
            if s.pending >= mc.cfg.refocus_tokens:
                _, dt_refocus = timed(device, s.refocus)
            _, dt = timed(device, s.step, 0.0)
            if i >= warm:
                times.append(dt + dt_refocus)
                entries.append(len(s.wc))
        window = max(2 * (args.decode + warm), round(statistics.mean(entries)))
        base = baseline(gpt, window, args.decode, warm, L, device)
        mc_ms, base_ms = 1e3 * statistics.mean(times), 1e3 * statistics.mean(base)
        out[W, m] = dict(decode_entries=round(statistics.mean(entries), 1), decode_window=window, mc_ms=mc_ms,
                         base_ms=base_ms, overhead=mc_ms / base_ms - 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# output


def fmt(v, p=3):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{p}f}"


def markdown(result) -> str:
    nll, lines = result["nll"], [f"# Long-context evaluation: {result['checkpoint']}", ""]
    lines += [f"`{result['command']}`", "", f"{result['device']}, torch {result['torch']}, commit {result['commit']}"
              f"{' (dirty)' if result['dirty'] else ''}, {result['date']}", ""]
    lines += [f"- {n}" for n in result["notes"]] + [""]
    H = result["args"]["horizon"]
    lines += [f"## Book NLL on the last {H} tokens (nats/token, 95% bootstrap CI over documents)", ""]
    methods = [m for m in METHODS if any(r["method"] == m for r in nll)]
    lines += ["| history | budget | docs | " + " | ".join(methods) + " | gap trunc→full |",
              "|---" * (len(methods) + 4) + "|"]
    for L in result["args"]["histories"]:
        for W in result["args"]["budgets"]:
            cell = {r["method"]: r for r in nll if r["history"] == L and r["budget"] == W}
            if not cell:
                continue
            docs = next(iter(cell.values()))["docs"]
            row = [f"{L:,}", str(W), str(docs)]
            for m in methods:
                r = cell.get(m)
                row.append("–" if r is None else f"{r['nll']:.3f} [{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]")
            gap = next((r["gap"] for r in cell.values() if r["gap"] is not None), None)
            lines.append("| " + " | ".join(row + [fmt(gap)]) + " |")
    others = [m for m in methods if m != "truncation"]
    lines += ["", "Method − truncation, paired over documents (negative = better than truncation; 95% bootstrap CI):",
              "", "| history | budget | " + " | ".join(others) + " |", "|---" * (2 + len(others)) + "|"]
    for L in result["args"]["histories"]:
        for W in result["args"]["budgets"]:
            cell = {r["method"]: r for r in nll if r["history"] == L and r["budget"] == W}
            row = [f"{L:,}", str(W)]
            for m in others:
                r = cell.get(m)
                ok = r is not None and r["delta_trunc"] is not None
                row.append(f"{r['delta_trunc']:+.3f} [{fmt(r['delta_trunc_ci'][0])}, {fmt(r['delta_trunc_ci'][1])}]"
                           if ok else "–")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Share of the truncation→full gap recovered (1 = full attention, 0 = truncation; – where full "
              "attention is unavailable or not better than truncation):", "",
              "| history | budget | " + " | ".join(m for m in SESSION_METHODS if m in methods) + " |",
              "|---" * (2 + sum(m in methods for m in SESSION_METHODS)) + "|"]
    for L in result["args"]["histories"]:
        for W in result["args"]["budgets"]:
            cell = {r["method"]: r for r in nll if r["history"] == L and r["budget"] == W}
            row = [f"{L:,}", str(W)]
            for m in (m for m in SESSION_METHODS if m in methods):
                r = cell.get(m)
                ok = r is not None and r["gap_share"] is not None
                row.append(f"{r['gap_share']:.2f} [{fmt(r['gap_share_ci'][0], 2)}, {fmt(r['gap_share_ci'][1], 2)}]"
                           if ok else "–")
            lines.append("| " + " | ".join(row) + " |")
    if result["retrieval"]:
        lines += ["", f"## Retrieval accuracy, budget {result['args']['retrieval_budget']} "
                  f"({result['args']['trials']} trial(s) per cell, mean over depths "
                  f"{result['args']['depths']})", "",
                  "| kind | query | history | " + " | ".join(METHODS) + " |", "|---" * (3 + len(METHODS)) + "|"]
        ret = result["retrieval"]
        keys = sorted({(r["kind"], r["query_first"], r["history"]) for r in ret})
        for kind, qf, L in keys:
            row = [kind, "first (control)" if qf else "last", f"{L:,}"]
            for m in METHODS:
                acc = [r["accuracy"] for r in ret if (r["kind"], r["query_first"], r["history"], r["method"]) ==
                       (kind, qf, L, m)]
                row.append(f"{np.mean(acc):.2f}" if acc else "–")
            lines.append("| " + " | ".join(row) + " |")
        depths, shown = result["args"]["depths"], [m for m in METHODS if any(r["method"] == m for r in ret)]
        lines += ["", f"Per depth (query last; cells: {' / '.join(shown)}):", "",
                  "| kind | history | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
                  "|---" * (2 + len(depths)) + "|"]
        for kind, L in sorted({(r["kind"], r["history"]) for r in ret}):
            acc = {(r["depth"], r["method"]): r["accuracy"] for r in ret
                   if (r["kind"], r["history"], r["query_first"]) == (kind, L, False)}
            cells = [" / ".join("–" if (d, m) not in acc else f"{acc[d, m]:.2f}" for m in shown) for d in depths]
            lines.append(f"| {kind} | {L:,} | " + " | ".join(cells) + " |")
    lines += ["", "## Telemetry (NLL sessions; decode overhead at the longest history vs the base at equal WC size)",
              "", "| budget | method | swap rate | residency | expands | collapses | utilisation | compliance | "
              "mc ms/tok | base ms/tok | overhead |", "|---" * 11 + "|"]
    for t in result["telemetry"]:
        ov = t.get("overhead")
        lines.append(f"| {t['budget']} | {t['method']} | {fmt(t['swap_rate'])} | {fmt(t['residency'], 2)} | "
                     f"{t['expands']:.1f} | {t['collapses']:.1f} | {t['utilisation']:.3f} | "
                     f"{100 * t['budget_compliance']:.0f}% | {fmt(t.get('mc_ms'), 2)} | {fmt(t.get('base_ms'), 2)} | "
                     f"{'–' if ov is None else f'{100 * ov:+.1f}%'} |")
    return "\n".join(lines) + "\n"


def plot(result, prefix) -> list[str]:
    """PNG plots when matplotlib is importable; returns the paths written (none without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["notes"].append("matplotlib is not installed: no plots")
        return []
    paths, hist = [], result["args"]["histories"]
    fig, axes = plt.subplots(1, len(hist), figsize=(4.5 * len(hist), 3.6), squeeze=False)
    for ax, L in zip(axes[0], hist):
        ax.axhline(0, color="C1", lw=1, label="truncation")
        for i, m in enumerate(METHODS):
            rs = [r for r in result["nll"] if r["history"] == L and r["method"] == m and r["delta_trunc"] is not None]
            if rs and m != "truncation":
                y = np.array([r["delta_trunc"] for r in rs])
                lo, hi = (np.array([r["delta_trunc_ci"][j] for r in rs], dtype=float) for j in (0, 1))
                ax.errorbar([r["budget"] for r in rs], y, yerr=np.stack([y - lo, hi - y]), label=m, marker="o",
                            capsize=3, color=f"C{i}")
        ax.set(xscale="log", xlabel="budget W (entries)", title=f"history {L:,}",
               ylabel=f"NLL − truncation, last {result['args']['horizon']} tokens")
        ax.minorticks_off()
        ax.set_xticks(result["args"]["budgets"], [str(b) for b in result["args"]["budgets"]])
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(f"{prefix}_nll.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if result["retrieval"]:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        ret = result["retrieval"]
        for i, m in enumerate(METHODS):
            for qf, style in ((False, "-"), (True, ":")):
                Ls = sorted({r["history"] for r in ret if r["method"] == m and r["query_first"] == qf})
                acc = [np.mean([r["accuracy"] for r in ret if (r["method"], r["query_first"], r["history"]) ==
                                (m, qf, L)]) for L in Ls]
                if Ls:
                    ax.plot(Ls, acc, style, marker="o", color=f"C{i}", label=f"{m}{' (query first)' if qf else ''}")
        ax.minorticks_off()
        ax.set(xscale="log", xlabel="history (tokens)", ylabel="accuracy", ylim=(-0.05, 1.05),
               title=f"retrieval at budget {result['args']['retrieval_budget']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(f"{prefix}_retrieval.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ----------------------------------------------------------------------------------------------------------------


def main(argv):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    mc_saved = ckpt.get("mc_config", {})
    args.block = args.block or mc_saved.get("block_k", 32)
    args.recent = args.recent if args.recent is not None else mc_saved.get("recent_tokens", 64)
    args.stream = args.stream if args.stream is not None else 8 * args.block
    args.data_dir = args.data_dir or ckpt.get("config", {}).get("data_dir", "data/pg")
    H, K = args.horizon, args.block
    # every bad input fails here, in one line, before any compute
    try:
        enc = prepare.load_tokenizer(args.data_dir)
        windows = book_windows(args.data_dir, args.split, args.histories, args.docs)
        if args.retrieval_histories:
            haystack(args.data_dir, args.split, max(args.retrieval_histories))
        for W in args.budgets:
            if W - H < args.recent:
                raise ValueError(f"budget {W} minus the horizon H={H} leaves {W - H} entries, below the protected "
                                 f"tail of {args.recent} tokens")
            MegaContextConfig(block_k=K, w_max=W - H + K, recent_tokens=args.recent).validate()
            check_capacity(max(args.histories) - H, K, args.recent, W - H)
        if args.retrieval_histories:
            MegaContextConfig(block_k=K, w_max=args.retrieval_budget, recent_tokens=args.recent).validate()
            check_capacity(max(args.retrieval_histories) + 16, K, args.recent, args.retrieval_budget - K)
    except FileNotFoundError as e:
        fail(f"cannot read the prepared data in {args.data_dir!r} ({e.strerror or e}: {e.filename or ''}); "
             "run prepare.py or pass --data-dir")
    except (ValueError, KeyError, OSError) as e:
        fail(str(e))
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.to(device).eval()
    if enc.n_vocab > gpt.config.vocab_size:
        fail(f"tokenizer in {args.data_dir!r} has {enc.n_vocab} tokens but the model only {gpt.config.vocab_size}")
    print(kernels.banner(), file=sys.stderr)
    T = gpt.config.block_size
    trained = {k: k in ckpt for k in ("gistnet", "lensnet")}
    notes = [f"base model trained at block_size={T}: full attention over more than {T} tokens is outside its trained "
             f"attention span (PoSE trains positions up to {ckpt.get('config', {}).get('max_position', '?')}, not "
             "spans), so 'full' there is a measurement, not an upper bound",
             f"full attention computed only for histories <= --max-full={args.max_full}"]
    for k, ok in trained.items():
        if not ok:
            notes.append(f"{k.upper()} UNTRAINED: the checkpoint has no '{k}' weights (base-only); "
                         + ("gists come from an untrained GistNet (random blocks, mean-like pooling)" if k == "gistnet"
                            else "the 'lens' and 'mean' arms follow untrained LensNet scores"))
    for n in notes:
        print(f"[note] {n}", file=sys.stderr)
    if len(windows) < 10:
        notes.append(f"{len(windows)} documents per NLL point: percentile-bootstrap intervals over so few are "
                     "optimistic; the paired differences (method − truncation) are the figures to read")
    if len(windows) < args.docs:
        notes.append(f"only {len(windows)} documents of {args.split} hold {max(args.histories):,} tokens "
                     f"(asked for {args.docs})")

    t0 = time.perf_counter()
    telemetry = {}
    per_doc, models = run_nll(gpt, ckpt, args, windows, telemetry)
    overhead = decode_overhead(gpt, models, windows, args, device)
    t_nll = time.perf_counter() - t0
    retrieval = run_retrieval(gpt, ckpt, args, enc) if args.retrieval_histories else []
    t_ret = time.perf_counter() - t0 - t_nll

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
    result = dict(device=name, threads=torch.get_num_threads(), torch=torch.__version__,
                  triton=getattr(kernels._util.triton, "__version__", None), kernels=kernels.backend(),
                  date=datetime.date.today().isoformat(), commit=git("rev-parse", "--short", "HEAD"),
                  dirty=bool(git("status", "--porcelain")), command="python bench/longctx.py " + " ".join(argv),
                  checkpoint=args.ckpt, ckpt_step=ckpt.get("step"),
                  model=ckpt["model_args"], trained=trained, mc_config=mc_saved or None, notes=notes,
                  args={k: v for k, v in vars(args).items()}, documents=[d for d, _ in windows],
                  seconds=dict(nll=round(t_nll, 1), retrieval=round(t_ret, 1)),
                  nll=summarise_nll(per_doc, args), retrieval=retrieval,
                  telemetry=summarise_telemetry(telemetry, overhead))
    if args.out is None:
        ck = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
        tag = f"{ck}{'_quick' if args.quick else ''}_{name.replace(' ', '_')}_{result['date']}_{result['commit']}"
        args.out = os.path.join(REPO, "bench", "results", f"longctx_{tag}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result["plots"] = [] if args.no_plot else plot(result, args.out)
    with open(f"{args.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(f"{args.out}.md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.out}.json, .md{''.join(', ' + os.path.basename(p) for p in result['plots'])} "
          f"(nll {t_nll:.0f}s, retrieval {t_ret:.0f}s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
