"""The MegaContext demonstration's report (bench/mc_demo.sh's last step): the harness results on the val and test
splits (bench/longctx.py JSON) and the LensNet-teacher selection (made on val only) -> <out>.json with a top-level
`summary` (the test split's) and the run's device, versions, date, commit and command, <out>.md (tables and each
target met or missed) and <out>.png (test split). With --base-log, the base stage's throughput and MFU (medians over
its logged steps; MFU is n/a on a CPU).

    python bench/mc_report.py --out bench/results/mc_demo_cpu --val V.json --test T.json \
        --select counterfactual=S1.json attention=S2.json --kept counterfactual --seconds 1700
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import longctx  # noqa: E402
import retrieval  # noqa: E402


def paired(result, a: str, b: str):
    """(mean, lo, hi) of NLL(a) - NLL(b) per document at the summary's NLL cell, bootstrapped (None if missing)."""
    s = result["summary"]["nll"]
    rows = {r["method"]: r for r in result["nll"] if (r["history"], r["budget"]) == (s.get("history"), s.get("budget"))}
    if a not in rows or b not in rows:
        return None
    return longctx.bootstrap(np.subtract(rows[a]["per_doc"], rows[b]["per_doc"]))


def pooled(result, method: str, multiple: str):
    """(hits, trials) of `method` at a history of `multiple` x the budget, question last, both kinds."""
    W = result["args"]["retrieval_budget"]
    cells = [r for r in result["retrieval"] if r["control"] is None and r["method"] == method
             and f"{r['history'] // W}x" == multiple]
    return sum(r["hits"] for r in cells), sum(r["trials"] for r in cells)


def targets(result) -> list[tuple[str, bool, str]]:
    """Issue 9's targets on one split: (target, met, the figures)."""
    out, s = [], result["summary"]
    for mult in sorted({k for v in s["retrieval"].values() for k in v}, key=lambda m: int(m[:-1])):
        ci = {m: retrieval.wilson(*pooled(result, m, mult)) for m in ("truncation", "recency", "lens")
              if pooled(result, m, mult)[1]}
        if len(ci) < 3:
            continue
        t, r, lens = ci["truncation"], ci["recency"], ci["lens"]
        out += [(f"{mult}: truncation <= 0.05", t[0] <= 0.05, f"{t[0]:.2f} [{t[1]:.2f}, {t[2]:.2f}]"),
                (f"{mult}: recency pyramid <= 0.2", r[0] <= 0.2, f"{r[0]:.2f} [{r[1]:.2f}, {r[2]:.2f}]"),
                (f"{mult}: LensNet >= 0.8", lens[0] >= 0.8, f"{lens[0]:.2f} [{lens[1]:.2f}, {lens[2]:.2f}]"),
                (f"{mult}: LensNet >= recency + 0.5, intervals apart", lens[0] >= r[0] + 0.5 and lens[1] > r[2],
                 f"{lens[0] - r[0]:+.2f}")]
    ctl = [r for r in result["retrieval"] if r["control"] == "no_needle" and r["method"] == "lens"]
    if ctl:
        hits, n = sum(r["hits"] for r in ctl), sum(r["trials"] for r in ctl)
        out.append(("no-needle control at chance (LensNet)", hits / n <= 0.05, f"{hits}/{n}"))
    nll = s["nll"]
    if nll:
        gap, (lo, hi) = nll["gap_nats"], nll["gap_ci"]
        out.append(("full beats truncation by >= 0.1 nats, interval excludes 0", gap >= 0.1 and lo > 0,
                    f"{gap:.3f} [{lo:.3f}, {hi:.3f}]"))
        share = nll["gap_share"].get("lens")
        out.append(("LensNet recovers >= 40% of the gap", share is not None and share >= 0.4,
                    "–" if share is None else f"{share:.2f}"))
        for other in ("recency", "mean"):
            d = paired(result, "lens", other)
            if d:
                out.append((f"LensNet beats {other} on NLL (paired interval < 0)", d[2] is not None and d[2] < 0,
                            f"{d[0]:+.3f} [{d[1]:.3f}, {d[2]:.3f}]"))
    tel = [t for t in result["telemetry"] if t["method"] == "lens"]
    if tel:
        t = tel[0]
        out.append(("swap rate 0.05-0.20 on book text", 0.05 <= t["swap_rate"] <= 0.2, f"{t['swap_rate']:.3f}"))
        out.append(("residency >= 3", (t["residency"] or 0) >= 3, longctx.fmt(t["residency"], 2)))
    raw = [r for r in result["retrieval"] if r["method"] == "lens" and r["control"] is None and "telemetry" in r]
    if raw:
        share = np.mean([r["telemetry"]["needle_raw"] for r in raw])
        out.append(("needle reaches LOD0 within the bounded refocus loop (LensNet)", share >= 0.8, f"{share:.2f}"))
    return out


def base_throughput(path: str) -> dict:
    """Median tokens/s and MFU over the base stage's logged training steps (log.jsonl), and how many steps."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in rows if "loss" in r and "tok_per_s" in r]
    mfu = [r["mfu"] for r in steps if r.get("mfu") is not None]
    return dict(steps=len(steps), tokens_per_s=float(np.median([r["tok_per_s"] for r in steps])) if steps else None,
                mfu=float(np.median(mfu)) if mfu else None)


def gate_base_line(report) -> str:
    """One line: the gate's in-block retrieval and the base stage's throughput."""
    g, b, parts = report["gate"], report["base"], []
    if g:
        parts.append(f"Gate: in-block retrieval {g['hits']}/{g['trials']} = {g['accuracy']:.3f} "
                     f"[{g['ci'][0]:.3f}, {g['ci'][1]:.3f}] (threshold {g['threshold']}).")
    if b and b["tokens_per_s"]:
        mfu = "n/a" if b["mfu"] is None else f"{100 * b['mfu']:.1f}%"
        parts.append(f"Base stage: {b['tokens_per_s']:,.0f} tokens/s, MFU {mfu} (medians over {b['steps']} steps).")
    return " ".join(parts)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output prefix")
    p.add_argument("--val", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--select", nargs="+", default=[], help="TEACHER=PATH: val results of each LensNet teacher")
    p.add_argument("--kept", required=True, help="the teacher kept")
    p.add_argument("--seconds", type=float, default=None, help="wall time of the whole demonstration")
    p.add_argument("--size", default="cpu", help="the demonstration's size (mc_demo.sh --size)")
    p.add_argument("--gate", default=None, help="the gate's JSON (longctx.py --gate ... --out)")
    p.add_argument("--base-log", default=None, help="the base stage's log.jsonl: throughput and MFU")
    p.add_argument("--command", default=None, help="the command that ran the demonstration")
    a = p.parse_args(argv)
    res = {split: json.load(open(path)) for split, path in (("val", a.val), ("test", a.test))}
    teachers = {}
    for item in a.select:
        name, _, path = item.partition("=")
        teachers[name] = json.load(open(path))["summary"]["retrieval"].get("lens")
    meta = {k: res["test"].get(k) for k in ("device", "threads", "torch", "triton", "kernels", "date", "commit",
                                              "dirty")}
    report = dict(size=a.size, command=a.command, **meta, gate=json.load(open(a.gate)) if a.gate else None,
                  base=base_throughput(a.base_log) if a.base_log else None,
                  summary=res["test"]["summary"], summary_val=res["val"]["summary"], lens_teacher=dict(
        kept=a.kept, val_retrieval=teachers), seconds=a.seconds, partial={
        split: r.get("partial", []) for split, r in res.items() if r.get("partial")}, targets={
        split: [dict(target=t, met=bool(m), value=v) for t, m, v in targets(r)] for split, r in res.items()}, **res)
    with open(f"{a.out}.json", "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# MegaContext demonstration ({a.size}, {meta['device']}): {a.kept} LensNet teacher", "",
             f"Wall time {a.seconds / 60:.1f} min for the whole chain (`{a.command or 'bash bench/mc_demo.sh'}`; "
             f"torch {meta['torch']}, triton {meta['triton']}, kernels {meta['kernels']}, {meta['date']}, commit "
             f"{meta['commit']})." if a.seconds else "",
             "", gate_base_line(report), "",
             *([f"**Partial**: the harness's time limit cut "
                f"{', '.join(f'{len(v)} cells on {s}' for s, v in report['partial'].items())} short (marked * in the "
                "tables; listed under each split).", ""] if report["partial"] else []),
             "LensNet teacher chosen on val retrieval (lens arm, question last, both kinds): " + ", ".join(
                 f"{t} {', '.join(f'{k} {v:.2f}' for k, v in acc.items())}" for t, acc in teachers.items() if acc), ""]
    for split in ("test", "val"):
        lines += [f"## Targets, {split} split", "", "| target | met | value |", "|---|---|---|"]
        lines += [f"| {t} | {'yes' if m else 'NO'} | {v} |" for t, m, v in targets(res[split])]
        lines += ["", longctx.markdown(res[split]).replace("\n# ", "\n### ").replace("\n## ", "\n### "), ""]
    with open(f"{a.out}.md", "w") as f:
        f.write("\n".join(lines))
    longctx.plot(res["test"], f"{a.out}.png")
    print("\n".join(lines[:4]))
    for t, m, v in targets(res["test"]):
        print(f"{'met   ' if m else 'MISSED'} {t}: {v}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
