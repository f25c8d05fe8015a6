"""Unbounded history on one CPU (issue 11): a 16M-token history streamed into a MegaContext session, with ingest speed,
resident memory, tree size on disk against the format's prediction, decode latency per token by history length, and
retrieval at chosen lengths with the demo's model and harness arms.

    python bench/long_history.py                                   # untrained model of the demo's shape, 16M tokens
    python bench/long_history.py --ckpt out/demo/ckpt.pt           # a train.py checkpoint (its GistNet/LensNet if any)
    python bench/long_history.py --lengths 65536,1048576 --decode 32 --out /tmp/lh   # a quick look
    python bench/long_history.py --ckpt out/mc_demo/lens_counterfactual/ckpt.pt --data-dir data/pg1k \
        --retrieval 65536,1048576,16777216 --retrieval-budget 256 --decode 64   # bench/results/long_history_cpu

Model: --ckpt, or an untrained model of the demo's shape (vocab 1024, 4 layers x 4 heads x 128, block 512; K = 8,
budget 128, tail 32, GistNet 2 layers, LensNet width 64; flags below). Ingest and decode cost do not depend on the
weights, so an untrained model measures them. History: random token ids, or with --data-dir book text (the test, val,
then train splits), streamed with session.ingest_stream in 64k chunks, the session saved to a tree directory every
--save-every tokens (the tree's RAM tail stays bounded). At each length of --lengths the stream pauses: the session is
saved and reopened from disk (memory-mapped, checksums verified), the data files' bytes are compared to the format's
prediction (4 bytes per token, d values of the gist dtype per gist, every level), and --decode tokens are decoded
greedily after --warmup (refocus every K tokens; each token timed with its refocus). Peak RSS (ru_maxrss, Linux) is
read at each length: flat memory means equal peaks.

Retrieval (--retrieval lengths, before the decode at that stop): --trials prompts per task (retrieval.py's five),
built as retrieval.make_prompt builds them but planted into the saved history instead of re-ingesting it: the needles
(and look-alikes) written over the book text by MegaContextTree.rewrite (retrieval.needle_positions: the deepest
needed needle at a relative depth, the others before it, none overlapping), in memory (the gists above them remade,
depth x K GistNet work; the files untouched), the question appended, then bench/longctx.py's arms: lens and recency
sessions (cold start over the history, the question ingested, refocus until the working context stops changing,
greedy decode with a refocus until stable before each answer token), oracle (the recency session zoomed exactly onto
the needles: what a perfect LensNet reaches with this base, GistNet and allocator, i.e. the gate that the base can
answer at that distance) and truncation (the newest budget tokens). Wilson 95% intervals; refocus steps, expansions
and the share of prompts whose needles all end raw per cell. Gate: a task runs at a length only if
--retrieval-budget can hold its needles zoomed to their tokens anywhere in it (tiling.zoom_entries: the tail, the
coarsest tiling and the zoom paths, ~ tail + (1 + 2 needles) x depth x (K - 1)); at K = 8 and a tail of 32 the demo's
budget of 128 holds one needle to about 64k tokens, so the issue's run uses --retrieval-budget 256 (the base's block
is 512).

Writes <out>.json and <out>.md (default bench/results/long_history_cpu); the JSON's top-level `summary` is
{"ingest_tokens_per_s": x, "peak_rss_mb": {tokens: mb}, "tasks": {task: {method: {tokens: accuracy}}},
"retrieval": the pass key's {method: {tokens: accuracy}}}.
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

import longctx  # noqa: E402
import prepare  # noqa: E402
import retrieval  # noqa: E402
from checkpoint import mc_model  # noqa: E402
from decode_latency import rss_mb  # noqa: E402
from megacontext import MegaContextConfig, MegaContextModel  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from session import Session, ingest_stream  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402
from tiling import zoom_entries  # noqa: E402
from tree import GIST_DTYPES, MegaContextTree, level_file  # noqa: E402

RETRIEVAL_METHODS = ("lens", "recency", "oracle", "truncation")  # bench/longctx.py's arms that need no full attention


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
    p.add_argument("--resume", action="store_true", help="go on from the tree already in --tree (a run cut short, or "
                   "a stop measured again): its tokens are not ingested again (nor timed), the text skips as many")
    r = p.add_argument_group("retrieval at stop lengths (needs --ckpt with GistNet and LensNet, and --data-dir)")
    r.add_argument("--data-dir", default=None, help="stream book text from these prepared data (test, val, then "
                   "train splits) instead of random ids")
    r.add_argument("--text-passes", type=int, default=1, help="stream the data's text up to this many times over "
                   "when the longest length needs more tokens than it holds (recorded in the results)")
    r.add_argument("--retrieval", default="", help="stop lengths at which to run the retrieval cells ('' = none)")
    r.add_argument("--trials", type=int, default=30, help="prompts per (task, length)")
    r.add_argument("--depths", default="0.1,0.3,0.5,0.7", help="needle depths in [0, 1), in rotation")
    r.add_argument("--tasks", default="passkey,multikey", help="retrieval tasks, of " + ",".join(retrieval.TASKS))
    r.add_argument("--tasks-at", action="append", default=[], metavar="LENGTH=TASKS", help="other tasks at one "
                   "stop length (e.g. 67108864=passkey: only the pass key at 64M tokens); repeatable")
    r.add_argument("--retrieval-methods", default="lens,recency,oracle,truncation", help="arms, of "
                   + ",".join(RETRIEVAL_METHODS))
    r.add_argument("--distractors", type=int, default=None, help="look-alike kv needles (vartrack: chains) per "
                   "prompt (default: retrieval.py's)")
    r.add_argument("--retrieval-budget", type=int, default=None, help="working-context budget of the retrieval "
                   "sessions (default: the model's); a length whose zoom path it cannot hold is skipped (the gate)")
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
        args.retrieval = sorted(int(x) for x in args.retrieval.split(",") if x.strip())
        args.depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError as e:
        fail(f"--lengths, --retrieval and --depths must be comma-separated numbers ({e})")
    if args.lengths[0] < 1 or min(args.decode, args.warmup) < 0 or args.save_every < 1:
        fail("need lengths >= 1, decode and warmup >= 0 and save-every >= 1")
    args.tasks = [k for k in args.tasks.split(",") if k]
    try:
        args.tasks_at = {int(k): [t for t in v.split(",") if t]
                         for k, _, v in (x.partition("=") for x in args.tasks_at)}
    except ValueError:
        fail(f"--tasks-at takes LENGTH=TASKS (e.g. 67108864=passkey), got {args.tasks_at}")
    args.retrieval_methods = [m for m in args.retrieval_methods.split(",") if m]
    if args.retrieval:
        if not (args.ckpt and args.data_dir):
            fail("--retrieval needs --ckpt (a checkpoint with GistNet and LensNet) and --data-dir (book text)")
        if set(args.retrieval) - set(args.lengths):
            fail(f"--retrieval lengths must be among --lengths {args.lengths}, got {args.retrieval}")
        if set(args.tasks_at) - set(args.retrieval):
            fail(f"--tasks-at lengths must be among --retrieval {args.retrieval}, got {sorted(args.tasks_at)}")
        every = set(args.tasks).union(*args.tasks_at.values())
        if every - set(retrieval.TASKS) or set(args.retrieval_methods) - set(RETRIEVAL_METHODS) or \
                not args.tasks or not all(args.tasks_at.values()) or not args.retrieval_methods:
            fail(f"--tasks must be from {','.join(retrieval.TASKS)} and --retrieval-methods from "
                 f"{','.join(RETRIEVAL_METHODS)}")
        if not args.depths or any(not 0 <= d < 1 for d in args.depths) or args.trials < 1 or \
                (args.distractors or 0) < 0:
            fail("--depths must be in [0, 1), --trials >= 1 and --distractors >= 0")
    return args


def build_model(args) -> tuple[MegaContextModel, dict | None]:
    """(model, checkpoint): the checkpoint's GPT (and GistNet/LensNet/config when trained) or (an untrained model of
    the demo's shape, None)."""
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        gpt = GPT(GPTConfig(**ckpt["model_args"]))
        gpt.load_state_dict(ckpt["model"])
        ns = types.SimpleNamespace(block=args.block, budget=args.budget, recent=args.recent, policy=args.policy)
        return mc_model(ckpt, ns, gpt.eval()), ckpt
    torch.manual_seed(args.seed)
    gpt = GPT(GPTConfig(vocab_size=args.vocab, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
                        n_embd=args.n_embd)).eval()
    cfg = MegaContextConfig(block_k=args.block or 8, w_max=args.budget or 128, recent_tokens=args.recent or 32,
                            policy=args.policy or "lens", gist_layers=args.gist_layers, lens_width=args.lens_width,
                            gist_dtype=args.gist_dtype)
    return MegaContextModel(gpt, cfg).eval(), None


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
# retrieval at the stop lengths, with the demo's harness pieces (bench/longctx.py)


class BookText:
    """Book text for the history: the test, val, then train splits of a prepared-data directory, documents back to
    back with <|bos|> removed (held-out text first; train text only past it), read from the memory-mapped shards, so
    it takes no resident memory worth counting. With passes > 1 the whole text is streamed again after it is used up
    (a 64M-token history from a 56M-token corpus); `passes_used` says how many passes were started."""

    def __init__(self, data_dir: str, passes: int = 1):
        if passes < 1:
            raise ValueError(f"--text-passes must be >= 1, got {passes}")
        self.bos = prepare.load_tokenizer(data_dir).encode_single_token(prepare.BOS)
        self.splits = [prepare.load_split(data_dir, s)[0] for s in ("test", "val", "train")]
        self.data_dir, self.split, self.at, self.passes, self.passes_used = data_dir, 0, 0, passes, 1

    def take(self, n: int) -> np.ndarray:
        """The next <= n tokens (int64, at least one); ValueError once every split is used up `passes` times."""
        while True:
            while self.split < len(self.splits):
                tokens = self.splits[self.split]
                part = np.asarray(tokens[self.at:self.at + n], np.int64)
                self.at += len(part)
                if self.at >= len(tokens):
                    self.split, self.at = self.split + 1, 0
                part = part[part != self.bos]
                if len(part):
                    return part
            if self.passes_used >= self.passes:
                break
            self.split, self.passes_used = 0, self.passes_used + 1
        raise ValueError(f"{self.data_dir} has too little book text in all its splits for the longest length; "
                         "pass shorter --lengths or more --text-passes")


def plan_prompt(tree, needles, task: str, depth: float, rng: np.random.Generator, distractors: int | None,
                raw_window: int = 1024) -> dict:
    """One retrieval prompt for a history tree, as retrieval.make_prompt builds them: the task's needles to write over
    the book text (retrieval.needle_positions: the deepest needed one at relative depth `depth`, jittered, the others
    before it, look-alikes anywhere, none overlapping); word tokens avoid the tokens a base reads raw near each needed
    needle and at the end. Returns dict(spots [(position, ids)], question, answer, needles [(start, length)] of the
    needed ones)."""
    n = len(tree)
    shape = needles.task(task, np.random.default_rng(0), distractors=distractors)  # lengths only
    pos = retrieval.needle_positions(n, shape, depth, rng)
    avoid = set(tree.tokens(n - raw_window, n).tolist())
    for p, need in zip(pos, shape.needed):
        if need:
            avoid |= set(tree.tokens(max(0, p - raw_window // 2), min(n, p + raw_window // 2)).tolist())
    t = needles.task(task, rng, avoid, distractors)
    spots = [(p, needle) for p, needle in zip(pos, t.needles)]
    return dict(spots=spots, question=t.question, answer=t.answer,
                needles=[(p, len(needle)) for p, needle, need in zip(pos, t.needles, t.needed) if need])


@torch.no_grad()
def answer_far(method: str, mc, tree_dir: str, plan: dict, budget: int):
    """(greedy answer ids, telemetry or None) of one arm for a prompt planted into the saved tree at tree_dir: the
    tree opened memory-mapped, the needles planted in memory, then truncation (the base on the newest budget - |q|
    tokens and the question) or a cold-start session that ingests the question, refocuses until stable (oracle: by
    the needles' positions) and decodes (longctx.answer_in_session)."""
    gpt, n_new = mc.gpt, len(plan["answer"])
    tree, _ = MegaContextTree.open(tree_dir, *tree_args(mc), verify=False)
    for pos, ids in plan["spots"]:
        tree.rewrite(pos, ids)
    q = plan["question"]
    if method == "truncation":
        ctx = np.concatenate([tree.tokens(len(tree) - (budget - len(q)), len(tree)), q])
        x = torch.as_tensor(ctx, device=gpt.wte.weight.device)[None]
        cache = gpt.make_cache(1, len(ctx) + n_new)
        return [int(t) for t in gpt.generate(x, n_new, temperature=0.0, cache=cache)], None
    s = Session(mc, tree)
    s.ingest(q)
    scorer = longctx.oracle_scorer(plan["needles"]) if method == "oracle" else None
    s.refocus(until_stable=True, scorer=scorer)
    tel = dict(steps=s.telemetry["steps"], expands=s.telemetry["expands"])
    got, raw = longctx.answer_in_session(s, n_new, scorer, plan["needles"])
    return got, dict(tel, needle_raw=raw)


def retrieval_rows(ckpt, gpt, tree_dir: str, args, rng: np.random.Generator, tasks) -> list[dict]:
    """Rows {task, history, method, trials, hits, accuracy, ci, per_depth, telemetry} at the tree saved in tree_dir:
    --trials prompts per task, depths in rotation, every arm on the same planted prompts."""
    needles, W = retrieval.needles_for(args.data_dir), args.retrieval_budget
    models = {m: longctx.session_model(ckpt, gpt, "lens" if m == "lens" else "recency", W, args.block or 8,
                                       args.recent) for m in args.retrieval_methods}  # (truncation: its GPT, tree)
    history, _ = MegaContextTree.open(tree_dir, *tree_args(next(iter(models.values()))), verify=False)
    rows, n = [], len(history)
    for task in tasks:
        hits = {m: {} for m in args.retrieval_methods}
        tel = {m: [] for m in args.retrieval_methods}
        for t in range(args.trials):
            depth = args.depths[t % len(args.depths)]
            plan = plan_prompt(history, needles, task, depth, rng, args.distractors)
            for m in args.retrieval_methods:
                got, tm = answer_far(m, models[m], tree_dir, plan, W)
                hits[m].setdefault(depth, []).append(got == plan["answer"])
                if tm:
                    tel[m].append(tm)
        for m in args.retrieval_methods:
            k = sum(map(sum, hits[m].values()))
            acc, lo, hi = retrieval.wilson(k, args.trials)
            row = dict(task=task, history=n, method=m, trials=args.trials, hits=k, accuracy=acc, ci=[lo, hi],
                       per_depth={str(d): float(np.mean(v)) for d, v in hits[m].items()})
            if tel[m]:
                row["telemetry"] = {key: float(np.mean([x[key] for x in tel[m]])) for key in tel[m][0]}
            rows.append(row)
            print(f"[retrieval] {n:>11,} tokens {task:>10} {m:>10}: {k}/{args.trials} [{lo:.2f}, {hi:.2f}]"
                  + (f" | steps {row['telemetry']['steps']:.1f}, needles raw {row['telemetry']['needle_raw']:.2f}"
                     if tel[m] else ""), file=sys.stderr)
    return rows


def accuracies(rows, task: str) -> dict:
    """{method: {history: accuracy}} of one task's retrieval rows (the summary's layout)."""
    out = {}
    for r in rows:
        if r["task"] == task:
            out.setdefault(r["method"], {})[r["history"]] = r["accuracy"]
    return out


def tree_args(mc):
    """MegaContextTree.open's model arguments for a MegaContextModel (K, d, vocabulary, identity, embed, gist)."""
    gpt = mc.gpt
    return mc.cfg.K, gpt.config.n_embd, gpt.config.vocab_size, mc.identity(), mc.embed_tokens, mc.make_gists


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
              f"History: {r['text']}.", ""]
    for g in r["retrieval_gate"]:
        lines.append(f"Retrieval gate at {g['history']:,} tokens, {g['task']}: its needles need at most "
                     f"{g['zoom_entries']} entries to be zoomed to their tokens, the budget leaves {g['target']}: "
                     + ("run." if g["zoom_entries"] <= g["target"] else "**skipped**."))
    if r["retrieval_gate"]:
        lines.append("")
    if r["retrieval"]:
        lines += ["Retrieval (needles planted into the saved history in memory; budget "
                  f"{r['retrieval_budget']}; Wilson 95% intervals; refocus steps after the question, expansions, and "
                  "the share of prompts whose needles all end raw in the working context):", "",
                  "| task | history | method | accuracy [95% CI] | per depth | steps | expands | needles raw |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in r["retrieval"]:
            t = x.get("telemetry")
            depth = ", ".join(f"{d}: {v:.2f}" for d, v in x["per_depth"].items())
            lines.append(f"| {x['task']} | {x['history']:,} | {x['method']} | {x['hits']}/{x['trials']} = "
                         f"{x['accuracy']:.2f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}] | {depth} | "
                         + (f"{t['steps']:.1f} | {t['expands']:.1f} | {t['needle_raw']:.2f} |" if t else "- | - | - |"))
        lines.append("")
    return "\n".join(lines)


def main(argv):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, ckpt = build_model(args)
        text = BookText(args.data_dir, args.text_passes) if args.data_dir else None
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    args.retrieval_budget = args.retrieval_budget or model.cfg.w_max
    if args.retrieval and args.retrieval_budget > model.gpt.config.block_size:
        fail(f"--retrieval-budget {args.retrieval_budget} is above the base's {model.gpt.config.block_size}-token "
             "block: it never attended over that many entries")
    cfg, d = model.cfg, model.gpt.config.n_embd
    tmp = tempfile.TemporaryDirectory() if args.tree is None else None
    tree_dir = args.tree or os.path.join(tmp.name, "tree")
    held = os.path.exists(os.path.join(tree_dir, "meta.json"))
    if held != args.resume:
        fail(f"--tree {tree_dir} already holds a tree; give a new directory or --resume" if held else
             f"--resume needs --tree with a saved tree, and {tree_dir} holds none")
    try:
        session = Session.open(model, tree_dir) if held else Session(model)
    except ValueError as e:  # a tree of another model or a damaged one
        fail(str(e))
    if held and text:
        skip = len(session.tree)
        while skip > 0:
            skip -= len(text.take(min(1 << 22, skip)))
    print(f"[long_history] {session.describe()}", file=sys.stderr)
    rng, rows, ingest_s, ingested, found, gates = np.random.default_rng(args.seed), [], 0.0, 0, [], []
    resumed_from = len(session.tree) if held else None  # tokens of the tree at the start (not ingested by this run)
    load_start = os.getloadavg()[0]

    def results() -> dict:
        """The results so far (written after every stop, so a run cut short keeps the stops it finished)."""
        git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
        result = dict(
            summary=dict(ingest_tokens_per_s=ingested / max(ingest_s, 1e-9),
                         peak_rss_mb={r["history"]: round(r["peak_rss_mb"], 1) for r in rows},
                         tasks={task: accuracies(found, task) for task in dict.fromkeys(r["task"] for r in found)},
                         retrieval=accuracies(found, "passkey")),
            retrieval=found, retrieval_budget=args.retrieval_budget, retrieval_gate=gates, device="cpu",
            threads=torch.get_num_threads(), torch=torch.__version__,
            date=datetime.date.today().isoformat(), commit=git("rev-parse", "--short", "HEAD"),
            dirty=bool(git("status", "--porcelain")), command="python bench/long_history.py " + " ".join(argv),
            load_start=round(load_start, 2), load_end=round(os.getloadavg()[0], 2), cpus=os.cpu_count(),
            text=f"book text of {args.data_dir} (test, val, then train splits"
            + (f"; {text.passes_used} passes over it)" if text.passes_used > 1 else ")") if args.data_dir else
            "random token ids", resumed_from=resumed_from,
            model_note=f"checkpoint {args.ckpt}" if args.ckpt else "untrained (ingest and decode "
            "cost do not depend on the weights)", gpt=dataclasses.asdict(model.gpt.config), mc=dataclasses.asdict(cfg),
            gistnet=model.gistnet.describe(), text_passes=text.passes_used if text else None, ingested=ingested,
            ingest_s=ingest_s, decode_steps=args.decode, rows=rows)
        return result

    for L in args.lengths:
        n = L - len(session.tree)
        if n > 0:
            t0 = time.perf_counter()
            left = n
            while left > 0:  # ids made (or read) 4M at a time, so they take no memory worth counting
                try:
                    ids = text.take(min(1 << 22, left)) if text else rng.integers(0, model.gpt.config.vocab_size,
                                                                                    min(1 << 22, left))
                except ValueError as e:  # the data hold less book text than the longest length
                    fail(str(e))
                ingest_stream(session, ids, save_to=tree_dir, save_every=args.save_every)
                left -= len(ids)
            ingest_s, ingested = ingest_s + time.perf_counter() - t0, ingested + n
        peak = rss_mb()[1]  # peak of the ingest up to here (before the decode below)
        session.save(tree_dir)
        if L in args.retrieval:  # the needles are planted in memory: the saved tree is not touched
            run = []
            for task in args.tasks_at.get(L, args.tasks):
                shape = retrieval.needles_for(args.data_dir).task(task, np.random.default_rng(0))
                need = zoom_entries(L + len(shape.question), cfg.K, cfg.recent_tokens, sum(shape.needed))
                gates.append(dict(history=L, task=task, zoom_entries=need,
                                  target=args.retrieval_budget - cfg.refocus_tokens))
                if need <= gates[-1]["target"]:
                    run.append(task)
                else:
                    print(f"[retrieval] {L:,} tokens, {task} skipped: its needles may need {need} entries to be zoomed "
                          f"to their tokens (tail, coarsest tiling, zoom paths), the budget leaves "
                          f"{gates[-1]['target']}", file=sys.stderr)
            found += retrieval_rows(ckpt, model.gpt, tree_dir, args, rng, run)
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
        write_results(args.out, (r := results()), markdown(r))
    if tmp is not None:
        tmp.cleanup()
    return r


def write_results(prefix: str, result: dict, md: str):
    """<prefix>.json and <prefix>.md (folders made as needed); the markdown also goes to stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for ext, text in (("json", json.dumps(result, indent=1)), ("md", md)):
        with open(f"{prefix}.{ext}", "w") as f:
            f.write(text)
    print(md)


if __name__ == "__main__":
    main(sys.argv[1:])
