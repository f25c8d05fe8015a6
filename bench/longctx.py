"""Long-context evaluation (DESIGN §10; issue 9's fair harness): book NLL between truncation and full attention,
retrieval far beyond the working context with controls and intervals, allocator telemetry.

    python bench/longctx.py --ckpt out/mc_demo/lens/ckpt.pt --split val       # the demo's sizes (bench/mc_demo.sh)
    python bench/longctx.py --ckpt out/mc_demo/base/ckpt.pt --gate 0.95       # the in-block retrieval gate only
    python bench/longctx.py --ckpt C --budgets 256,1024 --histories 1024 --retrieval-histories 8192,65536

Methods (a budget W is the number of entries the base model reads; W above the base's trained block is refused:
PoSE trains positions, not spans):
  full        every history token raw, only where the history fits the base's block (so it is an upper bound)
  truncation  the newest W tokens
  recency     MegaContext session with the static recency pyramid (policy 'recency', no LensNet)
  lens        MegaContext session with LensNet (policy 'lens') and the checkpoint's GistNet
  mean        the lens session with mean-pooled gists (RMS-normalised mean of the children: the GistNet ablation)
  oracle      (retrieval only) the recency session refocused by scores that zoom exactly the needle's gists: what a
              perfect LensNet would reach with this base, GistNet and allocator, the upper bound of the lens arm

Book NLL: per document, --windows windows of `history` tokens at evenly spaced offsets; the last H (--horizon) tokens
are scored teacher-forced after a representation of the first history - H tokens in W - H entries (sessions: a
cold-start ingest, then the newest --stream tokens K at a time with a refocus after each), in the same KV cache, so
every prediction reads at most W - 1 entries. Per-document means; 95% bootstrap intervals over documents, paired for
the differences to truncation and for the share of the truncation -> full gap, (trunc - method) / (trunc - full).

Retrieval (retrieval.py's five tasks, prompts of exactly `history` tokens of the split's book text): the needles the
answer needs sit where the truncation window cannot see them, (1 - depth) * history > W + 16 for the deepest and the
others before it; the question closes the prompt. Controls: query_first (question first, a bare <|query|> last: the
final cue names nothing) and no_needle. Sessions ingest the prompt (cold start, then the newest --stream tokens
streamed), then refocus until the working context stops changing, then decode greedily, refocusing until stable again
before each answer token (a variable-tracking hop is named by the answer token before it); correct when the answer's
every token matches. Accuracy with Wilson 95% intervals per (task, control, history, method), depths in rotation;
telemetry per cell: refocus steps after the question, expansions, and how often every needle the answer needs was raw
(LOD0) in the working context while the answer was decoded (the focus's own success, whatever the base answers).

Gate (--gate A): full-attention retrieval at history = the base's block (needles inside it) must reach A on held-out
prompts of the --gate-tasks (default: every task asked), or the run exits 1 saying so: a harness whose base cannot
retrieve in its own window measures nothing. Every task's in-block accuracy is reported, gated or not: a task the base
cannot answer in its block measures the base, not the focus, in its far cells.
Writes <out>.json (with a `summary`), <out>.md and, with matplotlib, <out>.png.
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import os
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
import retrieval  # noqa: E402
from checkpoint import check_tokenizer, mc_model  # noqa: E402
from decode_latency import baseline, pick_device, timed  # noqa: E402
from megacontext import RECENCY_UNIT, MegaContextConfig, MegaContextModel, check_capacity, recency_scores  # noqa
from model import GPT, GPTConfig  # noqa: E402
from session import Session  # noqa: E402
from tree import depth_of  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402

METHODS = ("full", "truncation", "recency", "lens", "mean", "oracle")
SESSION_METHODS = ("recency", "lens", "mean")  # ('oracle' is a retrieval-only session arm)
CONTROL_NAMES = {None: "question last", "query_first": "query first (control)", "no_needle": "no needle (control)"}
DEFAULTS = dict(histories="512", budgets="128", docs=20, windows=4, horizon=32, retrieval_histories="1024,4096",
                retrieval_budget=128, depths="0.1,0.3,0.5,0.7", trials=30, decode=16)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint written by train.py (base-only or with MC stages)")
    p.add_argument("--data-dir", default=None, help="prepared data (default: the checkpoint's data_dir)")
    p.add_argument("--split", default="val", choices=["val", "test"], help="held-out split (tune on val only)")
    p.add_argument("--histories", default=DEFAULTS["histories"], help="NLL history lengths, tokens ('' = skip NLL)")
    p.add_argument("--budgets", default=DEFAULTS["budgets"], help="NLL working-context budgets W, entries")
    p.add_argument("--docs", type=int, default=DEFAULTS["docs"], help="documents for NLL (at most)")
    p.add_argument("--windows", type=int, default=DEFAULTS["windows"], help="NLL windows per document")
    p.add_argument("--horizon", type=int, default=DEFAULTS["horizon"], help="H: scored tokens at each window's end")
    p.add_argument("--methods", default="full,truncation,recency,lens,mean", help="NLL arms, of " + ",".join(METHODS))
    p.add_argument("--retrieval-methods", default="full,truncation,recency,lens,oracle", help="retrieval arms")
    p.add_argument("--control-methods", default="truncation,lens", help="arms that also answer the control prompts")
    p.add_argument("--control-trials", type=int, default=None, help="prompts per control cell (default --trials)")
    p.add_argument("--block", type=int, default=None, help="K (default: the checkpoint's mc_config, else 32)")
    p.add_argument("--recent", type=int, default=None, help="protected tail (default: mc_config, else 64)")
    p.add_argument("--stream", type=int, default=None, help="newest tokens streamed with refocus (default 4K)")
    p.add_argument("--retrieval-histories", default=DEFAULTS["retrieval_histories"],
                   help="retrieval prompt lengths, tokens ('' = skip retrieval)")
    p.add_argument("--retrieval-budget", type=int, default=DEFAULTS["retrieval_budget"], help="W for retrieval")
    p.add_argument("--depths", default=DEFAULTS["depths"], help="needle depths in [0, 1] (illegal ones are dropped)")
    p.add_argument("--trials", type=int, default=DEFAULTS["trials"], help="prompts per (task, control, history)")
    p.add_argument("--tasks", default="passkey,multikey", help="retrieval tasks, of " + ",".join(retrieval.TASKS))
    p.add_argument("--gate-tasks", default=None, help="tasks the gate requires (default: --tasks)")
    p.add_argument("--controls", default="query_first,no_needle", help="control prompts ('' = none)")
    p.add_argument("--distractors", type=int, default=None, help="look-alike kv needles (vartrack: look-alike "
                   f"chains) per prompt (default: retrieval.py's, {retrieval.LOOKALIKES} / 1)")
    p.add_argument("--gate", type=float, default=None, help="only check in-block retrieval >= this, exit 1 if not")
    p.add_argument("--in-block-trials", type=int, default=50, help="in-block prompts per task (the gate's at least "
                   "100; 0 = skip where not gating)")
    p.add_argument("--decode", type=int, default=DEFAULTS["decode"], help="timed decode steps (0 = skip)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output path prefix (default bench/results/longctx_<tag>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: after them no new document or prompt "
                   "starts; the cells cut short are kept and marked partial (mc_demo.sh's time budget)")
    a = p.parse_args(argv)
    try:
        ints = lambda s: sorted({int(x) for x in s.split(",") if x.strip()})  # noqa: E731
        a.histories, a.budgets, a.retrieval_histories = ints(a.histories), ints(a.budgets), ints(a.retrieval_histories)
        a.depths = [float(x) for x in a.depths.split(",") if x.strip()]
    except ValueError as e:
        fail(f"bad list argument ({e})")
    a.methods, a.retrieval_methods, a.control_methods = ([m for m in v.split(",") if m] for v in (
        a.methods, a.retrieval_methods, a.control_methods))
    a.tasks = [k for k in a.tasks.split(",") if k]
    a.gate_tasks = a.tasks if a.gate_tasks is None else [k for k in a.gate_tasks.split(",") if k]
    a.controls = [None] + [c for c in a.controls.split(",") if c]
    if set(a.methods + a.retrieval_methods + a.control_methods) - set(METHODS) or "oracle" in a.methods or \
            set(a.tasks + a.gate_tasks) - set(retrieval.TASKS) or set(a.controls) - set(retrieval.CONTROLS):
        fail(f"--methods must be from {','.join(METHODS[:-1])} (oracle is for retrieval only), the retrieval and "
             f"control arms from {','.join(METHODS)}, --tasks from {','.join(retrieval.TASKS)} and --controls from "
             "query_first,no_needle")
    if a.horizon < 1 or a.docs < 1 or a.windows < 1 or a.trials < 1 or (a.distractors or 0) < 0:
        fail("--horizon, --docs, --windows and --trials must be >= 1 and --distractors >= 0")
    if a.histories and min(a.histories) <= a.horizon:
        fail(f"history {min(a.histories)} must be longer than the horizon H={a.horizon}")
    if any(not 0 <= d <= 1 for d in a.depths) or not a.depths:
        fail("--depths must be one or more values in [0, 1]")
    if a.gate is not None and not 0 <= a.gate <= 1:  # a share of the needles: 2 could never pass, nan always fails
        fail(f"--gate must be in [0, 1] (the share of in-block needles retrieved), got {a.gate}")
    if a.time_limit is not None and not a.time_limit >= 0:
        fail(f"--time-limit must be >= 0 seconds, got {a.time_limit}")
    return a


class Deadline:
    """--time-limit: once it has passed no new document or prompt starts; `cut` lists each cell cut short."""

    def __init__(self, seconds):
        self.at, self.cut = None if seconds is None else time.time() + seconds, []

    def passed(self, cell: str) -> bool:
        """True (and `cell`, e.g. 'retrieval passkey at 65,536 tokens: 3/30 prompts', is recorded) once past it."""
        if self.at is None or time.time() < self.at:
            return False
        self.cut.append(cell)
        return True


# ----------------------------------------------------------------------------------------------------------------
# models and sessions


def mean_gist_model(ckpt, gpt, cfg: MegaContextConfig) -> MegaContextModel:
    """The GistNet ablation: gists are the RMS-normalised mean of their children (no blocks, identity projection),
    read by the same allocator and LensNet as the lens arm."""
    cfg = dataclasses.replace(cfg, gist_pool="mean", gist_layers=0, gist_proj="linear", policy="lens")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mc = MegaContextModel(gpt, cfg)
    for name in ("lensnet", "predictor"):
        if name in ckpt and hasattr(mc, name):
            getattr(mc, name).load_state_dict(ckpt[name])
    return mc.to(gpt.wte.weight.device).eval()


def session_model(ckpt, gpt, method, w_max, K, recent) -> MegaContextModel:
    """MegaContextModel for a session method with a budget of w_max entries (ValueError on an impossible one)."""
    policy = "recency" if method == "recency" else "lens"
    ns = types.SimpleNamespace(block=K, budget=w_max, recent=recent, policy=policy)
    mc = mc_model(ckpt, ns, gpt).to(gpt.wte.weight.device)
    return mean_gist_model(ckpt, gpt, mc.cfg) if method == "mean" else mc


def stream_session(mc, ids, stream: int, settle: bool = False, scorer=None) -> Session:
    """A session over `ids`: one cold-start ingest, then the newest `stream` tokens K at a time with a refocus after
    each, as a reader streaming a book would; `settle`: then refocus until the working context stops changing (a
    question has arrived), with `scorer` (Session.refocus) if given."""
    s, K = Session(mc), mc.cfg.K
    cut = max(0, len(ids) - stream)
    for i in range(0, cut, 65536):
        s.ingest(ids[i:min(cut, i + 65536)])
    for i in range(cut, len(ids), K):
        s.ingest(ids[i:i + K])
        s.refocus()
    if settle or cut == len(ids):
        s.refocus(until_stable=settle, scorer=scorer)
    s.wc.check_invariants(mc.cfg.target)  # 100% budget compliance, or this raises
    return s


# ----------------------------------------------------------------------------------------------------------------
# book NLL


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


def book_windows(data_dir, split, history, n_docs, per_doc):
    """[(doc index, [windows (history,) int64])] for up to n_docs documents of >= history tokens; a document's
    windows start at evenly spaced offsets and do not overlap when it is long enough."""
    tokens, offsets = prepare.load_split(data_dir, split)
    lens = np.diff(offsets)
    docs = [i for i in range(len(lens)) if lens[i] > history][:n_docs]
    if not docs:
        raise ValueError(f"history {history:,} tokens is longer than every document of {data_dir}/{split} (the "
                         f"longest has {int(lens.max()):,}); pass shorter --histories")
    out = []
    for i in docs:
        starts = np.linspace(1, lens[i] - history, per_doc).astype(np.int64)  # 1: after the <|bos|>
        out.append((i, [np.asarray(tokens[offsets[i] + s:offsets[i] + s + history], np.int64) for s in starts]))
    return out


def long_range(win, H: int, W: int) -> np.ndarray:
    """Bool (H,) over the scored tokens of window `win`: those a copy from beyond the truncation window predicts and
    a copy from inside it does not: the token and the two before it occur earlier as a run starting before the
    newest W - H history tokens (what truncation reads), and not as a run inside [L - W, here). Method-independent."""
    L, out = len(win), np.zeros(H, dtype=bool)
    seen_far = {tuple(win[j:j + 3]) for j in range(0, L - W - 2)}
    for i, p in enumerate(range(L - H, L)):
        tri = tuple(win[p - 2:p + 1])
        near = {tuple(win[j:j + 3]) for j in range(max(0, L - W), p - 2)}
        out[i] = tri in seen_far and tri not in near
    return out


def run_nll(gpt, ckpt, args, telemetry, deadline=None):
    """Per-document mean NLL for every (history, budget, method), over all scored tokens and over the long-range
    ones (`long_range`; documents without any are left out there): ({(L, W, method): [nll per doc]}, same, models).
    Past the deadline the remaining documents are skipped."""
    H, K, T = args.horizon, args.block, gpt.config.block_size
    out, far, models = {}, {}, {(W, m): session_model(ckpt, gpt, m, W - H + K, K, args.recent)  # target = W - H
                                for W in args.budgets for m in args.methods if m in SESSION_METHODS}
    for L in args.histories:
        t0 = time.perf_counter()
        docs = book_windows(args.data_dir, args.split, L, args.docs, args.windows)
        for i, (doc, windows) in enumerate(docs):
            if deadline and deadline.passed(f"nll at {L:,} tokens: {i}/{len(docs)} documents"):
                break
            acc = {}  # (L, W, method) -> [(per-token NLL (H,), long-range mask (H,))] over the document's windows
            for win in windows:
                prefix, tail = win[:L - H], win[L - H:]
                if "full" in args.methods and L <= T:
                    full = horizon_nll(gpt, *token_prefix(gpt, prefix, 0), tail, L - H)
                for W in args.budgets:
                    mask = long_range(win, H, W)
                    if "full" in args.methods and L <= T:
                        acc.setdefault((L, W, "full"), []).append((full, mask))
                    if "truncation" in args.methods:
                        n = min(W - H, len(prefix))
                        nll = horizon_nll(gpt, *token_prefix(gpt, prefix[-n:], L - H - n), tail, L - H)
                        acc.setdefault((L, W, "truncation"), []).append((nll, mask))
                    for m in (m for m in SESSION_METHODS if m in args.methods):
                        s = stream_session(models[W, m], prefix, args.stream)
                        nll = horizon_nll(gpt, *session_prefix(s), tail, L - H)
                        acc.setdefault((L, W, m), []).append((nll, mask))
                        telemetry.setdefault((W, m), []).append(dict(history=L, **s.alloc.summary(),
                                                                     utilisation=len(s.wc) / (W - H)))
            for key, v in acc.items():
                nll, mask = torch.stack([a for a, _ in v]).numpy(), np.stack([b for _, b in v])
                out.setdefault(key, []).append(float(nll.mean()))
                if mask.any():
                    far.setdefault(key, []).append(float(nll[mask].mean()))
        print(f"[nll] history {L:>8,}: {time.perf_counter() - t0:6.1f}s", file=sys.stderr)
    return out, far, models


def bootstrap(values, fn=np.mean, n=2000, seed=0):
    """(point, lo, hi): fn over documents with a 95% percentile-bootstrap interval (values: (docs,) or (k, docs))."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, v.shape[-1], (n, v.shape[-1]))
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


def summarise_nll(per_doc):
    rows = []
    for (L, W, m), vals in sorted(per_doc.items(), key=lambda kv: (kv[0][0], kv[0][1], METHODS.index(kv[0][2]))):
        mean, lo, hi = bootstrap(vals)
        row = dict(history=L, budget=W, method=m, docs=len(vals), nll=mean, ci=[lo, hi], per_doc=vals,
                   delta_trunc=None, delta_trunc_ci=None, gap=None, gap_ci=None, gap_share=None, gap_share_ci=None)
        trunc, full = per_doc.get((L, W, "truncation")), per_doc.get((L, W, "full"))
        if trunc is not None:  # paired over documents: far tighter than the per-method intervals
            d, dlo, dhi = bootstrap(np.subtract(vals, trunc))
            row["delta_trunc"], row["delta_trunc_ci"] = d, [dlo, dhi]
        if trunc is not None and full is not None:
            row["gap"], *row["gap_ci"] = bootstrap(np.subtract(trunc, full))  # > 0: full attention helps
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


def legal_depths(depths, history: int, budget: int) -> list[float]:
    """The depths whose needle the truncation window of `budget` tokens cannot see: (1 - depth) * history > W + 16."""
    return [d for d in depths if (1 - d) * history > budget + 16]


def raw_spans(wc, spans) -> list[bool]:
    """Per needle span [(start, length)]: whether every one of its tokens is a LOD0 entry of wc."""
    raw = wc.lod == 0
    return [int((raw & (wc.start >= a) & (wc.start < a + n)).sum()) == n for a, n in spans]


@torch.no_grad()
def answer_in_session(s: Session, n_new: int, scorer=None, spans=()):
    """(greedy answer ids, whether every needle span was raw at some point of the answer) of a session whose history
    ends with the question (already settled): read the next token, then refocus until stable again before every
    later answer token (each is in the history when the focus looks again: a variable-tracking hop, or multivalue's
    key before its next value). A needle counts as read once it was raw when a token was decoded (the focus's own
    success, whatever the base then answers; later budget collapses do not undo that)."""
    out, seen = [], [False] * len(spans)
    for j in range(n_new):
        if j:
            s.refocus(until_stable=True, scorer=scorer)
        seen = [a or b for a, b in zip(seen, raw_spans(s.wc, spans))]
        tok = int(s.logits().argmax())
        s.ingest([tok])
        out.append(tok)
    return out, bool(spans) and all(seen)


@torch.no_grad()
def answer(method, gpt, mc, prompt, budget, stream):
    """(greedy continuation of prompt['ids'] as long as its answer, telemetry or None) under one method."""
    ids, n_new, dev = prompt["ids"], len(prompt["answer"]), gpt.wte.weight.device
    if method in ("full", "truncation"):
        ctx = ids if method == "full" else ids[-budget:]
        x = torch.as_tensor(ctx, device=dev)[None]
        cache = gpt.make_cache(1, len(ctx) + n_new)
        return [int(t) for t in gpt.generate(x, n_new, temperature=0.0, cache=cache)], None
    scorer = oracle_scorer(prompt["needles"]) if method == "oracle" else None
    s = stream_session(mc, ids, stream, settle=True, scorer=scorer)
    tel = dict(steps=s.telemetry["steps"], expands=s.telemetry["expands"])
    got, raw = answer_in_session(s, n_new, scorer, prompt["needles"])
    return got, dict(tel, needle_raw=raw)


def oracle_scorer(spans):
    """Scores of a perfect LensNet for needles at token spans [(start, length)]: the recency pyramid's, plus, for
    every entry that holds a needle token, more than the pyramid's largest level mismatch (the history's depth + 1
    levels), so such a gist is expanded first; its siblings score at least 0, so a group that holds part of a needle
    (which may straddle two blocks) is never collapsed back (a control prompt without a needle gets plain
    recency)."""
    def scores(wc):
        s = recency_scores(wc, wc.w_max - wc.K)
        hold, sibling = torch.zeros(len(wc), dtype=torch.bool), torch.zeros(len(wc), dtype=torch.bool)
        up = wc.K ** (wc.lod + 1)  # the parent's span
        for at, n in spans:
            hold |= (wc.start < at + n) & (wc.end > at)
            sibling |= (wc.start - wc.start % up < at + n) & (wc.start - wc.start % up + up > at)
        return torch.where(sibling, s.clamp(min=0), s) + (depth_of(wc.cursor, wc.K) + 2) * RECENCY_UNIT * hold
    return scores


class SharedGists:
    """make_gists, memoised per prompt: the session arms that share GistNet's weights (recency, lens, oracle) pool the
    same blocks of the same prompt once. Install with `mc.make_gists = shared` on each arm's model."""

    def __init__(self, make_gists):
        self.make_gists, self.memo = make_gists, {}

    def __call__(self, lod, x):
        key = (lod, tuple(x.shape), hashlib.sha1(x.detach().float().cpu().numpy().tobytes()).digest())
        if key not in self.memo:
            self.memo[key] = self.make_gists(lod, x)
        return self.memo[key]


def run_retrieval(gpt, ckpt, args, needles, histories, methods, controls, trials, beyond_window=True, tasks=None,
                  deadline=None):
    """Rows {task, control, history, method, trials, hits, accuracy, ci, per_depth, telemetry} over `trials` prompts
    per (task, control, history), depths in rotation: only those beyond the truncation window unless not
    `beyond_window` (the in-block check, where the needle is inside the base's block by construction). Past the
    deadline no prompt starts: a cell cut short has `partial` set and the prompts it asked; one not reached no row."""
    if not histories:
        return []
    tasks = tasks or args.tasks
    hay = haystack(args.data_dir, args.split, max(histories))
    W, K = args.retrieval_budget, args.block
    models = {m: session_model(ckpt, gpt, "recency" if m == "oracle" else m, W, K, args.recent)
              for m in methods if m in SESSION_METHODS + ("oracle",)}
    gist_arms = [mc for m, mc in models.items() if m != "mean"]
    shared = SharedGists(gist_arms[0].make_gists) if gist_arms else None
    for m, mc in models.items():
        if m != "mean":  # (its gists are the children's means)
            mc.make_gists = shared
    rows, rng = [], np.random.default_rng(args.seed)
    for L in histories:
        t0 = time.perf_counter()
        depths = legal_depths(args.depths, L, W) if beyond_window else args.depths
        if not depths:
            print(f"[retrieval] history {L:,}: no depth in {args.depths} puts the needle outside the truncation "
                  f"window of {W}; skipped", file=sys.stderr)
            continue
        fits = [m for m in methods if m != "full" or L <= gpt.config.block_size]
        for task in tasks:
            for control in controls:
                here = fits if control is None else [m for m in fits if m in args.control_methods]
                hits = {m: {} for m in here}
                tel = {m: [] for m in here}
                n_trials, asked = (trials if control is None else args.control_trials or trials), 0
                for t in range(n_trials):
                    if deadline and deadline.passed(f"retrieval {task}, {CONTROL_NAMES[control]}, at {L:,} tokens: "
                                                    f"{t}/{n_trials} prompts"):
                        break
                    asked, depth = t + 1, depths[t % len(depths)]
                    p = retrieval.make_prompt(hay, needles, task, L, depth, rng, control, args.distractors)
                    if shared is not None:
                        shared.memo.clear()
                    for m in here:
                        got, tm = answer(m, gpt, models.get(m), p, W, args.stream)
                        hits[m].setdefault(depth, []).append(got == p["answer"])
                        if tm:
                            tel[m].append(tm)
                for m in here if asked else []:
                    k = sum(map(sum, hits[m].values()))
                    acc, lo, hi = retrieval.wilson(k, asked)
                    row = dict(task=task, control=control, history=L, method=m, trials=asked, hits=k, accuracy=acc,
                               ci=[lo, hi], per_depth={str(d): float(np.mean(v)) for d, v in hits[m].items()})
                    if asked < n_trials:
                        row["partial"] = True
                    if tel[m]:
                        row["telemetry"] = {key: float(np.mean([x[key] for x in tel[m]])) for key in tel[m][0]}
                    rows.append(row)
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


def decode_overhead(gpt, models, args, device):
    """{(W, method): {mc_ms, base_ms, overhead, entries}}: decode steps of a session over the longest NLL history
    against the base model over a KV window of the same number of entries."""
    out, L = {}, max(args.histories)
    if not args.decode:
        return out
    ids = book_windows(args.data_dir, args.split, L, 1, 1)[0][1][0]
    warm = max(2, args.decode // 4)
    for (W, m), mc in models.items():
        if m == "mean":
            continue  # same cost as lens
        s = stream_session(mc, ids, args.stream)
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


def summary(result) -> dict:
    """The headline a script can check: in-block retrieval (full attention, history = block; pooled and per task),
    retrieval per method at each history as a multiple of the budget (question last; `retrieval` pools the tasks,
    `tasks` = {task: {method: {"8x": accuracy}}}), and the NLL gap and shares at the longest history and smallest
    budget where full attention fits."""
    W = result["args"]["retrieval_budget"]
    ret = [r for r in result["retrieval"] if r["control"] is None]
    in_block = result.get("in_block", {})
    out = dict(in_block_retrieval=in_block.get("accuracy"), in_block_tasks=in_block.get("per_task"), retrieval={},
               tasks={}, nll={})
    for r in ret:
        mult = f"{r['history'] // W}x"
        cell = out["retrieval"].setdefault(r["method"], {}).setdefault(mult, [0, 0])
        cell[0], cell[1] = cell[0] + r["hits"], cell[1] + r["trials"]
        out["tasks"].setdefault(r["task"], {}).setdefault(r["method"], {})[mult] = r["accuracy"]
    out["retrieval"] = {m: {k: h / n for k, (h, n) in v.items()} for m, v in out["retrieval"].items()}
    out["nll"] = nll_summary(result["nll"])
    out["nll_long_range"] = nll_summary(result.get("nll_long_range", []))
    return out


def nll_summary(rows) -> dict:
    """Gap (with its interval) and gap shares at the longest history and smallest budget where full attention fits."""
    gaps = [r for r in rows if r["gap"] is not None]
    if not gaps:
        return {}
    L, W = max(r["history"] for r in gaps), min(r["budget"] for r in gaps)
    cell = [r for r in gaps if (r["history"], r["budget"]) == (L, W)]
    return dict(history=L, budget=W, docs=cell[0]["docs"], gap_nats=cell[0]["gap"], gap_ci=cell[0]["gap_ci"],
                gap_share={r["method"]: r["gap_share"] for r in cell if r["method"] in SESSION_METHODS},
                gap_share_ci={r["method"]: r["gap_share_ci"] for r in cell if r["method"] in SESSION_METHODS})


def fmt(v, p=3):
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{p}f}"


def nll_tables(nll, title) -> list[str]:
    """Markdown lines: NLL per method with intervals and the truncation->full gap; deltas to truncation and shares."""
    if not nll:
        return []
    methods = [m for m in METHODS if any(r["method"] == m for r in nll)]
    lines = [f"## {title} (nats/token; 95% bootstrap CI over documents)", "",
             "| history | budget | docs | " + " | ".join(methods) + " | gap trunc→full |",
             "|---" * (len(methods) + 4) + "|"]
    cells = sorted({(r["history"], r["budget"]) for r in nll})
    for L, W in cells:
        cell = {r["method"]: r for r in nll if (r["history"], r["budget"]) == (L, W)}
        row = [f"{L:,}", str(W), str(next(iter(cell.values()))["docs"])]
        row += ["–" if m not in cell else f"{cell[m]['nll']:.3f} [{fmt(cell[m]['ci'][0])}, {fmt(cell[m]['ci'][1])}]"
                for m in methods]
        g = next((r for r in cell.values() if r["gap"] is not None), None)
        row.append("–" if g is None else f"{g['gap']:+.3f} [{fmt(g['gap_ci'][0])}, {fmt(g['gap_ci'][1])}]")
        lines.append("| " + " | ".join(row) + " |")
    others = [m for m in methods if m != "truncation"]
    lines += ["", "Method − truncation, paired over documents (negative = better), and the share of the "
              "truncation→full gap it recovers (1 = full attention):", "",
              "| history | budget | " + " | ".join(f"{m} Δ | {m} share" for m in others) + " |",
              "|---" * (2 + 2 * len(others)) + "|"]
    for L, W in cells:
        cell = {r["method"]: r for r in nll if (r["history"], r["budget"]) == (L, W)}
        row = [f"{L:,}", str(W)]
        for m in others:
            r = cell.get(m)
            d, s = r and r["delta_trunc"] is not None, r and r["gap_share"] is not None
            row.append(f"{r['delta_trunc']:+.3f} [{fmt(r['delta_trunc_ci'][0])}, {fmt(r['delta_trunc_ci'][1])}]"
                       if d else "–")
            row.append(f"{r['gap_share']:.2f} [{fmt(r['gap_share_ci'][0], 2)}, {fmt(r['gap_share_ci'][1], 2)}]"
                       if s else "–")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def markdown(result) -> str:
    lines = [f"# Long-context evaluation: {result['checkpoint']} ({result['args']['split']} split)", "",
             f"`{result['command']}`", "", f"{result['device']}, torch {result['torch']}, commit {result['commit']}"
             f"{' (dirty)' if result['dirty'] else ''}, {result['date']}", ""]
    lines += [f"- {n}" for n in result["notes"]] + [""]
    if result.get("partial"):
        lines += [f"**Partial: --time-limit {result['args']['time_limit']:g} s cut these cells short** (* below; "
                  "their figures cover the prompts and documents asked): " + "; ".join(result["partial"]) + ".", ""]
    if result.get("in_block"):
        ib = result["in_block"]
        lines += [f"In-block retrieval (full attention, history {ib['history']} = the base's block, needle inside): "
                  f"{ib['hits']}/{ib['trials']} = {ib['accuracy']:.3f} [{ib['ci'][0]:.3f}, {ib['ci'][1]:.3f}]", ""]
    H = result["args"]["horizon"]
    lines += nll_tables(result["nll"], f"Book NLL on the last {H} tokens")
    lines += nll_tables(result.get("nll_long_range", []), f"Book NLL on the long-range tokens among the last {H}: "
                        "those a copy from beyond the truncation window predicts and one from inside it does not")
    ret = result["retrieval"]
    if ret:
        shown = [m for m in METHODS if any(r["method"] == m for r in ret)]
        lines += ["", f"## Retrieval, budget {result['args']['retrieval_budget']} entries (accuracy, Wilson 95% CI; "
                  f"{result['args']['trials']} prompts per cell, depths {result['args']['depths']} in rotation)", "",
                  "| task | prompt | history | " + " | ".join(shown) + " |", "|---" * (3 + len(shown)) + "|"]
        for task, control, L in sorted({(r["task"], r["control"] or "", r["history"]) for r in ret},
                                       key=lambda c: (retrieval.TASKS.index(c[0]), c[1], c[2])):
            cell = {r["method"]: r for r in ret if (r["task"], r["control"] or "", r["history"]) == (task, control, L)}
            row = [task, CONTROL_NAMES[control or None], f"{L:,}"]
            row += ["–" if m not in cell else f"{cell[m]['accuracy']:.2f} [{cell[m]['ci'][0]:.2f}, "
                    f"{cell[m]['ci'][1]:.2f}]" + (f"* ({cell[m]['trials']})" if cell[m].get("partial") else "")
                    for m in shown]
            lines.append("| " + " | ".join(row) + " |")
        sess = [r for r in ret if "telemetry" in r and r["control"] is None]
        if sess:
            lines += ["", "Sessions after the question (question last): refocus steps until stable, expansions, share "
                      "of prompts whose needles were all read raw (LOD0) while answering; accuracy per depth:", "",
                      "| task | history | method | steps | expansions | needles raw | per depth |", "|---" * 7 + "|"]
            for r in sess:
                t = r["telemetry"]
                depth = ", ".join(f"{d}: {a:.2f}" for d, a in r["per_depth"].items())
                lines.append(f"| {r['task']} | {r['history']:,} | {r['method']} | {t['steps']:.2f} | "
                             f"{t['expands']:.2f} | {t['needle_raw']:.2f} | {depth} |")
    if result["telemetry"]:
        lines += ["", "## Allocator telemetry (NLL sessions on book text; decode overhead vs the base, same WC size)",
                  "", "| budget | method | swap rate | residency | expands | collapses | utilisation | compliance | "
                  "mc ms/tok | base ms/tok | overhead |", "|---" * 11 + "|"]
        for t in result["telemetry"]:
            ov = t.get("overhead")
            lines.append(f"| {t['budget']} | {t['method']} | {fmt(t['swap_rate'])} | {fmt(t['residency'], 2)} | "
                         f"{t['expands']:.1f} | {t['collapses']:.1f} | {t['utilisation']:.3f} | "
                         f"{100 * t['budget_compliance']:.0f}% | {fmt(t.get('mc_ms'), 2)} | {fmt(t.get('base_ms'), 2)}"
                         f" | {'–' if ov is None else f'{100 * ov:+.1f}%'} |")
    return "\n".join(lines) + "\n"


def plot(result, path) -> list[str]:
    """One PNG: retrieval accuracy vs history (question last, the tasks pooled) and NLL − truncation per method;
    returns the paths written (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        result["notes"].append("matplotlib is not installed: no plot")
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ret = [r for r in result["retrieval"] if r["control"] is None]
    for i, m in enumerate(METHODS):
        Ls = sorted({r["history"] for r in ret if r["method"] == m})
        if not Ls:
            continue
        hits = [sum(r["hits"] for r in ret if (r["method"], r["history"]) == (m, L)) for L in Ls]
        n = [sum(r["trials"] for r in ret if (r["method"], r["history"]) == (m, L)) for L in Ls]
        ci = np.array([retrieval.wilson(h, k) for h, k in zip(hits, n)])
        yerr = np.maximum(0, np.stack([ci[:, 0] - ci[:, 1], ci[:, 2] - ci[:, 0]]))  # (Wilson's ends round to p)
        ax1.errorbar(Ls, ci[:, 0], yerr=yerr, marker="o", capsize=3,
                     color=f"C{i}", label=m)
    ax1.set(xscale="log", xlabel="history (tokens)", ylabel="retrieval accuracy", ylim=(-0.05, 1.05),
            title=f"retrieval at a budget of {result['args']['retrieval_budget']} entries")
    ax1.minorticks_off()
    ax1.legend(fontsize=8)
    rows = [r for r in result["nll"] if r["delta_trunc"] is not None and r["method"] != "truncation"]
    labels = sorted({(r["history"], r["budget"]) for r in rows})
    for j, (L, W) in enumerate(labels):
        for i, m in enumerate(METHODS):
            r = next((r for r in rows if (r["history"], r["budget"], r["method"]) == (L, W, m)), None)
            if r:
                lo, hi = r["delta_trunc_ci"]
                ax2.errorbar([i + 0.1 * j], [r["delta_trunc"]], yerr=[[r["delta_trunc"] - lo], [hi - r["delta_trunc"]]],
                             marker="o", capsize=3, color=f"C{i}")
    ax2.axhline(0, color="C1", lw=1)
    ax2.set_xticks(range(len(METHODS)), METHODS)
    ax2.set(ylabel="NLL − truncation (nats/token)", title="book NLL " + ", ".join(f"{L} hist / {W} budget"
                                                                                  for L, W in labels))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------------------------------------------


def main(argv):
    args = parse_args(argv)
    deadline = Deadline(args.time_limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    mc_saved = ckpt.get("mc_config", {})
    args.block = args.block or mc_saved.get("block_k", 32)
    args.recent = args.recent if args.recent is not None else mc_saved.get("recent_tokens", 64)
    args.stream = args.stream if args.stream is not None else 4 * args.block
    args.data_dir = args.data_dir or ckpt.get("config", {}).get("data_dir", "data/pg")
    H, K, T = args.horizon, args.block, ckpt["model_args"]["block_size"]
    histories = [] if args.gate is not None else args.retrieval_histories
    # every bad input fails here, in one line, before any compute
    try:
        enc = prepare.load_tokenizer(args.data_dir)
        check_tokenizer(ckpt, args.data_dir, enc)
        needles = retrieval.Needles(enc)
        haystack(args.data_dir, args.split, max(histories + [T]))
        over = [W for W in args.budgets + [args.retrieval_budget] if W > T]
        if over:
            raise ValueError(f"budget {over[0]} is above the {T}-token block the base model was trained on: it never "
                             "attended over that many entries (PoSE trains positions, not spans); use a budget <= "
                             f"{T}")
        if args.gate is None:
            for L in args.histories:
                book_windows(args.data_dir, args.split, L, 1, 1)
            for W in args.budgets:
                if W - H < args.recent:
                    raise ValueError(f"budget {W} minus the horizon H={H} leaves {W - H} entries, below the protected "
                                     f"tail of {args.recent} tokens")
                MegaContextConfig(block_k=K, w_max=W - H + K, recent_tokens=args.recent).validate()
                check_capacity(max(args.histories, default=0) - H, K, args.recent, W - H)
            if histories:
                MegaContextConfig(block_k=K, w_max=args.retrieval_budget, recent_tokens=args.recent).validate()
                check_capacity(max(histories) + 16, K, args.recent, args.retrieval_budget - K)
    except FileNotFoundError as e:
        fail(f"cannot read the prepared data in {args.data_dir!r} ({e.strerror or e}: {e.filename or ''}); "
             "run prepare.py or pass --data-dir")
    except (ValueError, KeyError, OSError) as e:
        fail(str(e))
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.to(device).eval()
    print(kernels.banner(), file=sys.stderr)

    t0 = time.perf_counter()
    n_block = max(args.trials, args.in_block_trials, 50) if args.gate is not None else args.in_block_trials
    block_rows = run_retrieval(gpt, ckpt, args, needles, [T], ["full"], [None], n_block, False,
                               list(dict.fromkeys(args.tasks + args.gate_tasks))) if n_block else []
    in_block = {}
    if block_rows:
        gated = [r for r in block_rows if r["task"] in args.gate_tasks]
        hits, n = sum(r["hits"] for r in gated), sum(r["trials"] for r in gated)
        acc, lo, hi = retrieval.wilson(hits, n)
        in_block = dict(history=T, hits=hits, trials=n, accuracy=acc, ci=[lo, hi], gate_tasks=args.gate_tasks,
                        per_task={r["task"]: r["accuracy"] for r in block_rows})
        print(f"[gate] in-block retrieval (full attention, history {T}; {', '.join(args.gate_tasks)}): {hits}/{n} = "
              f"{acc:.3f} [{lo:.3f}, {hi:.3f}] ({', '.join(f'{k} {a:.2f}' for k, a in in_block['per_task'].items())})",
              file=sys.stderr)
    if args.gate is not None:
        if args.out:  # the gate's figures, met or not
            with open(f"{args.out}.json", "w") as f:
                json.dump(dict(in_block, threshold=args.gate, split=args.split, checkpoint=args.ckpt), f, indent=1)
        if not acc >= args.gate:  # (nan when nothing could be asked)
            fail(f"the base model retrieves {acc:.3f} < {args.gate} of the needles inside its own {T}-token window "
                 f"({args.split} split): the MegaContext stages would measure nothing; train the base longer")
        return in_block

    trained = {k: k in ckpt for k in ("gistnet", "lensnet")}
    notes = [f"base trained at block_size={T}; full attention only where the history fits it ({T} tokens)"]
    for k, ok in trained.items():
        if not ok:
            notes.append(f"{k.upper()} UNTRAINED: the checkpoint has no '{k}' weights (base-only); "
                         + ("gists come from an untrained GistNet (random blocks, mean-like pooling)" if k == "gistnet"
                            else "the 'lens' and 'mean' arms follow untrained LensNet scores"))
    for note in notes:
        print(f"[note] {note}", file=sys.stderr)
    telemetry = {}
    per_doc, per_doc_far, models = run_nll(gpt, ckpt, args, telemetry, deadline) if args.histories else ({}, {}, {})
    timed_decode = args.histories and args.decode and not deadline.passed("decode overhead: not measured")
    overhead = decode_overhead(gpt, models, args, device) if timed_decode else {}
    t_nll = time.perf_counter() - t0
    ret = run_retrieval(gpt, ckpt, args, needles, histories, args.retrieval_methods, args.controls, args.trials,
                        deadline=deadline)
    t_ret = time.perf_counter() - t0 - t_nll

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
    result = dict(device=name, threads=torch.get_num_threads(), torch=torch.__version__,
                  triton=getattr(kernels._util.triton, "__version__", None), kernels=kernels.backend(),
                  date=datetime.date.today().isoformat(), commit=git("rev-parse", "--short", "HEAD"),
                  dirty=bool(git("status", "--porcelain")), command="python bench/longctx.py " + " ".join(argv),
                  checkpoint=args.ckpt, ckpt_step=ckpt.get("step"), model=ckpt["model_args"], trained=trained,
                  mc_config=mc_saved or None, notes=notes, args=vars(args), in_block=in_block,
                  seconds=dict(nll=round(t_nll, 1), retrieval=round(t_ret, 1)), nll=summarise_nll(per_doc),
                  nll_long_range=summarise_nll(per_doc_far),
                  retrieval=ret, telemetry=summarise_telemetry(telemetry, overhead), partial=deadline.cut)
    result["summary"] = summary(result)
    if args.out is None:
        ck = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
        args.out = os.path.join(REPO, "bench", "results", f"longctx_{ck}_{args.split}_{result['date']}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result["plots"] = [] if args.no_plot else plot(result, f"{args.out}.png")
    with open(f"{args.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(f"{args.out}.md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {args.out}.json, .md{', .png' if result['plots'] else ''} (nll {t_nll:.0f}s, retrieval "
          f"{t_ret:.0f}s)", file=sys.stderr)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
