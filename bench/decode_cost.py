"""What decoding with MegaContext costs against the plain base reading as many entries (issue 19), on the CPU, with
the CPU demo's trained model, over book text.

    nice -n 10 python bench/decode_cost.py --ckpt /work/main/out/mc_demo/lens_oracle/ckpt.pt     # ~15 min, 2 cores
    python bench/decode_cost.py --ckpt ... --histories 65536 --runs 1 --tokens 32                    # a smoke run

The history (--histories, book text of the data's --split) is ingested once per length, saved, and opened by one
session per budget (memory-mapped, as a long session runs). Each arm then reads the next --tokens tokens of the book
(teacher-forced, so every arm reads the same text; each step is a full decode step: refocus when due, the logits over
the working context, the token appended), after --warmup untimed steps. Times are the process's CPU seconds (torch on
one thread): the machine is shared, and wall time counts the waits for a core too (wall ratios are kept as well).
The baseline is the base GPT alone with a KV cache
holding as many entries as the session's mean working context (prefilled with the same book, half the timed tokens
before and after), reading the same tokens one at a time, run right after each session arm in every round, so the
machine's noise hits both alike; the overhead of an arm is the median over --runs rounds of its time
per token / the baseline's in the same round. Reuse is the mean over refocuses of entries kept in the KV cache /
entries it held when the edits began (Session telemetry). Beside it, the reuse of a refocus whose forced collapses
all sit next to the protected tail: a full context must collapse N/(K-1) groups per N new tokens to make room, and
no group nearer the end can collapse, so reuse stays near or below it whatever the allocator does.
Writes <out>.json (summary = {"overhead": {tokens: ratio}, "reuse": {tokens: fraction}} of the --headline arm, every
arm's figures, device, versions, date, command, commit) and <out>.md.
"""
import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import longctx  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from session import Session  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402

# arm name -> (budget, refocus every (0 = K), edit_cost); the base arm at each budget is added automatically
ARMS = {"b128_n8": (128, 0, 0.0), "b128_n8_cost": (128, 0, 4.0),
        "b512_n8_cost": (512, 0, 4.0),
        "b512_n64_cost": (512, 64, 4.0)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="the CPU demo's lens-stage checkpoint")
    p.add_argument("--data-dir", default="data/pg1k", help="prepared book text")
    p.add_argument("--split", default="val", help="its split (val holds ~4M tokens; 16M of history needs train)")
    p.add_argument("--histories", default="65536,1048576", help="tokens of history, ascending")
    p.add_argument("--arms", default=",".join(ARMS), help=f"session arms among {', '.join(ARMS)}")
    p.add_argument("--headline", default="b128_n8_cost", help="the arm whose figures make the summary")
    p.add_argument("--tokens", type=int, default=128, help="timed decode steps per arm and round")
    p.add_argument("--warmup", type=int, default=64, help="untimed steps before them (a config's first refocuses)")
    p.add_argument("--runs", type=int, default=3, help="rounds (each arm once per round, in turn)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for every arm")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "decode_cpu"))
    a = p.parse_args(argv)
    a.histories = [int(x) for x in a.histories.split(",")]
    a.arms = [x for x in a.arms.split(",") if x]
    if any(x not in ARMS for x in a.arms) or a.headline not in a.arms:
        p.error(f"--arms must name arms among {', '.join(ARMS)}, --headline one of them")
    return a


def arm_model(ckpt, gpt, name):
    w_max, every, cost = ARMS[name]
    mc = longctx.session_model(ckpt, gpt, "lens", w_max, ckpt["mc_config"]["block_k"],
                               ckpt["mc_config"]["recent_tokens"])
    mc.cfg = dataclasses.replace(mc.cfg, refocus_every=every, edit_cost=cost).validate()
    return mc


@torch.no_grad()
def run_session(s: Session, book, warmup: int, n: int) -> dict:
    """Read book[:warmup + n] token by token through the session; time the last n steps and gather their refocuses."""
    refocuses, t0 = [], None
    for i, tok in enumerate(book[:warmup + n]):
        if i == warmup:
            t0, c0 = time.perf_counter(), time.process_time()
        if s.pending >= s.cfg.refocus_tokens:
            t = s.refocus()
            if i >= warmup:
                refocuses.append(t)
        s.logits()
        s.ingest([int(tok)])
        if i >= warmup:
            entries = entries + len(s.wc) if i > warmup else len(s.wc)
    cpu, seconds = time.process_time() - c0, time.perf_counter() - t0
    return dict(s_per_token=cpu / n, wall_per_token=seconds / n, entries=entries / n, refocuses=refocuses)


@torch.no_grad()
def run_base(gpt, book, window: int, n: int, start: int) -> tuple[float, float]:
    """(CPU, wall) seconds per token of the base alone reading book[window - n//2 + i] over a KV cache of
    window - n//2 entries."""
    cache = gpt.make_cache(1, window + n)
    pre = window - n // 2
    gpt(torch.from_numpy(book[:pre])[None], mu=torch.arange(start, start + pre), cache=cache, last_only=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(pre, pre + n):
        logits, _ = gpt(torch.from_numpy(book[i:i + 1])[None], mu=torch.tensor([start + i]), cache=cache,
                        last_only=True)
        int(logits[0, -1].argmax())  # what a decode does with them
    return (time.process_time() - c0) / n, (time.perf_counter() - t0) / n


def tail_reuse(s: Session, entries: float) -> float:
    """The reuse of a refocus whose forced collapses all sit next to the protected tail: N new tokens need N/(K-1)
    collapses of K entries each (on average), and the recent_tokens after them are re-read too."""
    cfg = s.cfg
    return max(0.0, 1 - (cfg.recent_tokens + cfg.K * cfg.refocus_tokens / (cfg.K - 1)) / entries)


def main(argv):
    a = parse_args(argv)
    git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
    commit, dirty = git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain"))  # the code that runs
    torch.set_num_threads(a.threads)
    ckpt = load_checkpoint(a.ckpt)
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.eval()
    need = a.histories[-1] + a.runs * len(a.arms) * (a.warmup + a.tokens) + 4096
    try:
        book = longctx.haystack(a.data_dir, a.split, need)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    models = {name: arm_model(ckpt, gpt, name) for name in a.arms}
    writer = Session(models[a.arms[0]])  # ingests the history; sessions open copies of its saved tree
    tmp, rows = tempfile.TemporaryDirectory(), {}
    for L in a.histories:
        t0 = time.perf_counter()
        for i in range(len(writer.tree), L, 1 << 16):
            writer.ingest(book[i:min(L, i + (1 << 16))])
        ingest_rate = (L - 0) / (time.perf_counter() - t0) if L else 0.0
        path = os.path.join(tmp.name, f"tree{L}")
        writer.save(path)
        sessions = {name: Session.open(mc, path, verify=False) for name, mc in models.items()}
        pos = {name: L for name in a.arms}  # each session reads on from the end of the shared history
        res = {name: dict(ratio=[], wall_ratio=[], s_per_token=[], base_s_per_token=[], refocuses=[])
               for name in a.arms}
        for r in range(a.runs):
            for name, s in sessions.items():
                got = run_session(s, book[pos[name]:], a.warmup, a.tokens)
                pos[name] += a.warmup + a.tokens
                window = round(got["entries"])
                base, base_wall = run_base(gpt, book[L - window:], window, a.tokens, L - window)
                res[name]["ratio"].append(got["s_per_token"] / base)
                res[name]["wall_ratio"].append(got["wall_per_token"] / base_wall)
                res[name]["s_per_token"].append(got["s_per_token"])
                res[name]["base_s_per_token"].append(base)
                res[name]["refocuses"] += got["refocuses"]
                res[name]["entries"] = got["entries"]
                print(f"[{L:,} tokens, round {r + 1}/{a.runs}] {name}: {1e3 * got['s_per_token']:.1f} CPU ms/token "
                      f"vs base {1e3 * base:.1f} over {window} entries -> {got['s_per_token'] / base:.2f}x (wall "
                      f"{got['wall_per_token'] / base_wall:.2f}x)",
                      file=sys.stderr, flush=True)
        for name, v in res.items():
            tel = v.pop("refocuses")
            cached = [t["reused"] + t["recomputed"] for t in tel]
            v.update(overhead=statistics.median(v["ratio"]), wall_overhead=statistics.median(v["wall_ratio"]),
                     refocuses=len(tel),
                     reuse=statistics.mean(t["reused"] / c for t, c in zip(tel, cached) if c) if tel else None,
                     reuse_at_tail=tail_reuse(sessions[name], v["entries"]),
                     recomputed_per_refocus=statistics.mean(t["recomputed"] for t in tel) if tel else 0,
                     edits_per_refocus=statistics.mean(t["edits"] for t in tel) if tel else 0,
                     ms_per_refocus={k: 1e3 * statistics.median(t[k] for t in tel) if tel else 0
                                     for k in ("seconds", "score_s", "refocus_s", "recompute_s")},
                     base_ms_per_token=1e3 * statistics.median(v["base_s_per_token"]),
                     mc_ms_per_token=1e3 * statistics.median(v["s_per_token"]),
                     budget=sessions[name].cfg.w_max, refocus_every=sessions[name].cfg.refocus_tokens,
                     edit_cost=sessions[name].cfg.edit_cost)
        rows[L] = dict(ingest_tokens_per_s=ingest_rate, arms=res)
    tmp.cleanup()

    head = {str(L): rows[L]["arms"][a.headline] for L in a.histories}
    result = dict(summary=dict(overhead={L: v["overhead"] for L, v in head.items()},
                               reuse={L: v["reuse"] for L, v in head.items()}),
                  headline=a.headline, arms={k: dict(zip(("budget", "refocus_every", "edit_cost"), v))
                                             for k, v in ARMS.items() if k in a.arms},
                  results={str(L): v for L, v in rows.items()}, tokens=a.tokens, warmup=a.warmup, runs=a.runs,
                  threads=a.threads, device=f"cpu ({platform.processor() or platform.machine()}, "
                                            f"{os.cpu_count()} cores, shared)",
                  torch=torch.__version__, python=platform.python_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=commit, dirty=dirty,
                  command="python bench/decode_cost.py " + " ".join(argv), checkpoint=a.ckpt,
                  model=ckpt["model_args"], data=f"{a.data_dir}/{a.split}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(f"{a.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    with open(f"{a.out}.md", "w") as f:
        f.write(report(result))
    print(report(result))
    return result


def report(r) -> str:
    lines = [f"# Decode cost: MegaContext session vs the plain base (CPU, {r['date']}, {r['commit']})", "",
             f"`{r['command']}` — torch {r['torch']}, {r['threads']} thread(s), {r['device']}; {r['tokens']} timed "
             f"tokens per arm and round after {r['warmup']} untimed, median of {r['runs']} rounds (arms in turn).",
             "", f"Headline arm: `{r['headline']}`. Overhead = MegaContext time per token / base time per token over "
             "as many entries, in CPU seconds (wall in the JSON); reuse = KV entries kept per refocus / entries "
             "cached; "
             "at tail = the reuse when every forced collapse sits next to the protected tail; ms/refocus are wall.",
             "",
             "| history | arm | budget | refocus every | edit_cost | entries | mc ms/tok | base ms/tok | overhead | "
             "reuse | at tail | recomputed/refocus | edits/refocus | ms/refocus (score, re-read) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for L, row in r["results"].items():
        for name, v in row["arms"].items():
            ms = v["ms_per_refocus"]
            reuse = "-" if v["reuse"] is None else f"{v['reuse']:.2f}"
            lines.append(f"| {int(L):,} | {name} | {v['budget']} | {v['refocus_every']} | {v['edit_cost']} | "
                         f"{v['entries']:.0f} | {v['mc_ms_per_token']:.1f} | {v['base_ms_per_token']:.1f} | "
                         f"{v['overhead']:.2f}x | {reuse} | {v['reuse_at_tail']:.2f} | "
                         f"{v['recomputed_per_refocus']:.1f} | {v['edits_per_refocus']:.2f} | {ms['seconds']:.0f} "
                         f"({ms['score_s']:.0f}, {ms['recompute_s']:.0f}) |")
    lines.append("")
    lines.append("Ingest: " + ", ".join(f"{int(L):,} tokens at {row['ingest_tokens_per_s']:,.0f} tokens/s"
                                        for L, row in r["results"].items()) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
