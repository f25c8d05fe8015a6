"""Does LensNet gain from reading the predicted next gist? (issue 19, deliverable 2a: lens_plan). For each seed, the
lens stage is trained twice from the same base and GistNet with the same arguments, once as it is and once with
lens_plan (the Indexer also reads, per tail token, the gist MegaPrediction's frozen LOD1 head plans for the next K
tokens), and both checkpoints answer the same harness (bench/longctx.py: book NLL on the long-range tokens, the five
retrieval tasks); the arms are compared pooled over seeds. The plan is kept only if it helps.

    python bench/lens_plan.py --base out/mc_demo/base/ckpt.pt --gist out/mc_demo/gist/ckpt.pt \
        --heads out/megaprediction_heads.pt --data-dir data/pg1k --seeds 1337,1338      # ~20 min on 2 cores

--heads: a predict-stage checkpoint or a bench/megaprediction.py --save-heads file for this base and GistNet. The
defaults are the CPU demo's oracle-teacher lens stage (bench/mc_demo.sh) and its harness at budget 128, 30 prompts per
(task, history). Each run lives in --run/<arm>_s<seed>/ (ckpt.pt, harness.json): finished ones are skipped, so an
interrupted comparison resumes. Writes <out>.json (summary = {"retrieval": {arm: accuracy}, "difference": plan -
plain with a Newcombe 95% interval, "nll_long_range": {arm: mean lens - truncation nats}, "verdict"}) and <out>.md.
"""
import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

from retrieval import wilson  # noqa: E402
from train import fail  # noqa: E402

ARMS = ("plain", "plan")
LENS = ("configs/mc_demo.py --stage=lens --lens_teacher=oracle --block_size=4096 --batch_size=4 --lr=3e-3 "
        "--min_lr=3e-4 --warmup_iters=10 --eval_interval=50 --eval_iters=2 --log_interval=10")
HARNESS = ("--split test --methods full,truncation,lens --retrieval-methods lens --controls '' --decode 0 --no-plot "
           "--in-block-trials 0 --tasks passkey,multikey,multivalue,multiquery,vartrack --retrieval-histories "
           "1024,4096 --trials 30")
PLAN = ["--gist_predict=mlp", "--lens_plan=True"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="base-stage checkpoint")
    p.add_argument("--gist", required=True, help="gist-stage checkpoint (its GistNet)")
    p.add_argument("--heads", required=True, help="MegaPrediction heads for this base and GistNet")
    p.add_argument("--data-dir", required=True, help="prepared data")
    p.add_argument("--seeds", default="1337,1338", help="lens-stage seeds, comma-separated")
    p.add_argument("--iters", type=int, default=100, help="lens-stage steps")
    p.add_argument("--lens-args", default=LENS, help="train.py's config and arguments of the lens stage")
    p.add_argument("--harness-args", default=HARNESS, help="bench/longctx.py's arguments")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of each run")
    p.add_argument("--run", default="out/lens_plan", help="runs' folder")
    p.add_argument("--out", default="bench/results/lens_plan_cpu", help="output path prefix")
    return p.parse_args(argv)


def call(cmd: list[str], env: dict):
    print("+ " + shlex.join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=REPO, env=env)
    if r.returncode:
        fail(f"{cmd[1]} exited with {r.returncode}: {shlex.join(cmd)}")


def train_cmd(a, arm: str, seed: int, out: str, init: str) -> list[str]:
    return ([sys.executable, "train.py", *shlex.split(a.lens_args), f"--data_dir={a.data_dir}", f"--out_dir={out}",
             f"--max_iters={a.iters}", f"--init_from={init}", f"--base_ckpt={a.base}", f"--gist_ckpt={a.gist}",
             f"--seed={seed}"] + ([f"--predict_heads={a.heads}", *PLAN] if arm == "plan" else []))


def run_arm(a, arm: str, seed: int, env: dict) -> dict:
    """Train (or resume, or skip) the arm's lens stage and run (or skip) its harness; returns the harness's JSON."""
    out = os.path.join(a.run, f"{arm}_s{seed}")
    ck = os.path.join(out, "ckpt.pt")
    step = torch.load(ck, map_location="cpu", weights_only=False)["step"] if os.path.isfile(ck) else None
    if step is None or step < a.iters:
        call(train_cmd(a, arm, seed, out, "scratch" if step is None else "resume"), env)
    harness = os.path.join(out, "harness")
    if not os.path.isfile(harness + ".json"):
        call([sys.executable, "bench/longctx.py", "--ckpt", ck, "--data-dir", a.data_dir, *shlex.split(a.harness_args),
              "--threads", str(a.threads), "--out", harness], env)
    with open(harness + ".json") as f:
        return json.load(f)


def cells(result: dict) -> dict:
    """{(task, history): (hits, trials)} of the lens arm's question-last retrieval cells."""
    return {(r["task"], r["history"]): (r["hits"], r["trials"]) for r in result["retrieval"]
            if r["method"] == "lens" and r["control"] is None}


def long_range(result: dict):
    """The lens arm's row of book NLL on the long-range tokens (nll, delta_trunc and its CI, gap_share), or None."""
    rows = [r for r in result.get("nll_long_range", []) if r["method"] == "lens"]
    return rows[0] if rows else None


def newcombe(h1: int, n1: int, h2: int, n2: int) -> list[float]:
    """95% interval of p2 - p1 from the two Wilson intervals (Newcombe's method 10)."""
    p1, p2 = h1 / n1, h2 / n2
    (_, l1, u1), (_, l2, u2) = wilson(h1, n1), wilson(h2, n2)
    d = p2 - p1
    return [d - ((p2 - l2) ** 2 + (u1 - p1) ** 2) ** 0.5, d + ((u2 - p2) ** 2 + (p1 - l1) ** 2) ** 0.5]


def compare(results: dict) -> dict:
    """results {(arm, seed): harness JSON} -> per-seed cells and pooled accuracy, the plan - plain difference with its
    interval, long-range NLL per arm, and the verdict: 'helps' / 'hurts' when the retrieval interval excludes 0
    (and the long-range NLL does not move the other way), else 'no detectable effect'."""
    seeds = sorted({s for _, s in results})
    per = {f"{arm}_s{s}": {f"{t}@{h}": list(v) for (t, h), v in cells(results[arm, s]).items()}
           for arm in ARMS for s in seeds}
    pooled = {arm: [sum(v[i] for s in seeds for v in cells(results[arm, s]).values()) for i in (0, 1)]
              for arm in ARMS}
    acc = {arm: h / n for arm, (h, n) in pooled.items()}
    ci = newcombe(*pooled["plain"], *pooled["plan"])
    nll = {}
    for arm in ARMS:
        rows = [long_range(results[arm, s]) for s in seeds]
        rows = [r for r in rows if r]
        nll[arm] = sum(r["delta_trunc"] for r in rows) / len(rows) if rows else None
    nll_rows = {f"{arm}_s{s}": long_range(results[arm, s]) for arm in ARMS for s in seeds}
    nll_worse = nll["plan"] is not None and nll["plain"] is not None and nll["plan"] > nll["plain"]
    verdict = ("helps" if ci[0] > 0 and not nll_worse else "hurts" if ci[1] < 0 else "no detectable effect")
    return dict(seeds=seeds, cells=per, pooled={arm: dict(hits=h, trials=n) for arm, (h, n) in pooled.items()},
                nll_rows=nll_rows, summary=dict(retrieval=acc, difference=acc["plan"] - acc["plain"],
                                                difference_ci=ci, nll_long_range=nll, verdict=verdict,
                                                kept=verdict == "helps"))


def markdown(result: dict) -> str:
    s, seeds = result["summary"], result["seeds"]
    keys = sorted(next(iter(result["cells"].values())), key=lambda k: (int(k.split("@")[1]), k))
    cols = [f"{arm}_s{seed}" for seed in seeds for arm in ARMS]
    lines = [f"# LensNet with and without the predicted next gist (lens_plan), {result['date']}", "",
             f"`{result['command']}` — {result['device']}, torch {result['torch']}, commit {result['commit']}. Each "
             "seed trains the lens stage twice from the same base and GistNet; both checkpoints answer the same "
             "harness (test split).", "",
             "## Retrieval: lens arm, question last (hits / prompts)", "",
             "| task @ history | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join("{}/{}".format(*result["cells"][c][k]) for c in cols) + " |")
    total = {c: [sum(v[i] for v in result["cells"][c].values()) for i in (0, 1)] for c in cols}
    lines.append("| **all** | " + " | ".join(f"**{h / n:.3f}**" for h, n in total.values()) + " |")
    p = result["pooled"]
    lines += ["", "| arm | pooled accuracy | Wilson 95% |", "|---|---|---|"]
    for arm in ARMS:
        _, lo, hi = wilson(p[arm]["hits"], p[arm]["trials"])
        lines.append(f"| {arm} | {p[arm]['hits']}/{p[arm]['trials']} = {s['retrieval'][arm]:.3f} | "
                     f"[{lo:.2f}, {hi:.2f}] |")
    lo, hi = s["difference_ci"]
    lines += ["", f"plan − plain: {s['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] (Newcombe 95%, prompts pooled over "
              "seeds; the seeds differ more than the prompts' binomial noise, see the per-run totals)", "",
              "## Book NLL on the long-range tokens: lens − truncation (nats/token, 95% bootstrap over "
              "documents) and share of the truncation → full gap", "",
              "| run | docs | lens − truncation | gap share |", "|---|---|---|---|"]
    for c in cols:
        r = result["nll_rows"][c]
        if r:
            lines.append(f"| {c} | {r['docs']} | {r['delta_trunc']:+.3f} [{r['delta_trunc_ci'][0]:+.3f}, "
                         f"{r['delta_trunc_ci'][1]:+.3f}] | {r['gap_share']:.2f} [{r['gap_share_ci'][0]:.2f}, "
                         f"{r['gap_share_ci'][1]:.2f}] |")
    nll = s["nll_long_range"]
    lines += ["", "Mean lens − truncation over seeds: " + ", ".join(
        f"{arm} {nll[arm]:+.3f}" if nll[arm] is not None else f"{arm} –" for arm in ARMS) + ".", "",
              f"**Verdict: {s['verdict']}** — lens_plan is {'kept' if s['kept'] else 'not kept'} (off by default)."]
    return "\n".join(lines) + "\n"


def main(argv):
    a = parse_args(argv)
    for key in ("base", "gist", "heads"):
        if not os.path.isfile(getattr(a, key)):
            fail(f"--{key} not found: {getattr(a, key)}")
    try:
        seeds = [int(v) for v in a.seeds.split(",")]
    except ValueError:
        fail(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    results = {(arm, s): run_arm(a, arm, s, env) for s in seeds for arm in ARMS}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    result = dict(compare(results), command="python bench/lens_plan.py " + shlex.join(argv), commit=commit,
                  device=results[ARMS[0], seeds[0]]["device"], torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  harness_args=a.harness_args, lens_args=a.lens_args, iters=a.iters, heads=a.heads)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
