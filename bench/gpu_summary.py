"""The short table of a bench/run_gpu.sh run: phases, GPU tier, the run's ceilings, issue 22's targets, the pyramid
sweep, training throughput and MFU; every kernel figure is also a fraction of the copy bandwidth / bf16 GEMM rate
measured in the run.

    python bench/gpu_summary.py $OUT --tag NVIDIA_H200_2026-12-05_abc1234 [--phases FILE --seconds S]

Reads <dir>/run_<tag>.json (bench/gpu_env.py), gpu_tests_<tag>.xml (junit), kernels*_<tag>.json (pytest-benchmark),
pyramid_<tag>.json (bench/pyramid_sweep.py), train_<tag>.jsonl and train_*_<tag>.json (bench/train_throughput.py),
ncu_<tag>.txt, whichever exist; an empty or broken file is named in one line. Writes <dir>/summary_<tag>.json (and
merges the phase log into run_<tag>.json) and prints the table.
"""
import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

BENCH = [  # (figure, pytest-benchmark group, provider, field, target, reference provider for a speed-up or None)
    ("RoPE fwd+bwd, copy-bandwidth fraction", "rope-4x4096x32/8x128-full", "triton", "frac_copy_bw", 0.8, None),
    ("RoPE fwd+bwd vs torch.compile", "rope-4x4096x32/8x128-full", "triton", "speedup", 4.0, "compiled"),
    ("gist pooling fwd+bwd, copy-bandwidth fraction", "gist_pool-8x8192x12x64-K32-full", "triton", "frac_copy_bw",
     0.7, None),
]
SWEEP = [  # (figure, D, T, mode, field, target, reference provider for a speed-up or None)
    ("pyramid fwd 64k D128, GEMM fraction (visited tiles)", 128, 65536, "fwd", "frac_bf16_matmul", 0.55, None),
    ("pyramid fwd 64k D128 vs dense SDPA", 128, 65536, "fwd", "speedup", 12.0, "sdpa"),
    ("pyramid fwd 64k D128 vs FlexAttention", 128, 65536, "fwd", "speedup", 3.0, "flex"),
    ("pyramid fwd+bwd 64k D128 vs dense SDPA", 128, 65536, "full", "speedup", 10.0, "sdpa"),
    ("pyramid fwd+bwd 64k D128 vs FlexAttention", 128, 65536, "full", "speedup", 2.5, "flex"),
    ("pyramid fwd 256k D128 vs dense SDPA", 128, 262144, "fwd", "speedup", 60.0, "sdpa"),
    ("pyramid fwd 4k D128 vs dense SDPA", 128, 4096, "fwd", "speedup", 1.0, "sdpa"),
    ("pyramid fwd+bwd 4k D128 vs dense SDPA", 128, 4096, "full", "speedup", 1.0, "sdpa"),
    ("pyramid fwd 8k D128 vs dense SDPA", 128, 8192, "fwd", "speedup", 1.5, "sdpa"),
    ("pyramid fwd+bwd 8k D128 vs dense SDPA", 128, 8192, "full", "speedup", 1.5, "sdpa"),
]
MFU = {"small": 0.40, "medium": 0.45, "mc_demo_gpu": 0.35}  # issue 22's training targets


def read(path, parse, broken):
    """parse(path), or None with one line in `broken` saying what is wrong with the file (a phase that timed out or
    crashed leaves an empty or partial file; the table must still come out)."""
    try:
        if os.path.getsize(path) == 0:
            raise ValueError("empty file")
        return parse(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ET.ParseError) as e:
        broken.append(f"{os.path.basename(path)}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def _json(path):
    with open(path) as f:
        return json.load(f)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def junit(path):
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def kernel_rows(bench):
    """{(group, provider): extra_info + name} from a pytest-benchmark JSON."""
    return {(b["group"], b.get("params", {}).get("provider")): dict(b["extra_info"], name=b["name"])
            for b in bench.get("benchmarks", [])}


def sweep_rows(sweep):
    """{(D, T, provider, mode): row} of the pyramid sweep."""
    return {(r["D"], r["T"], r["provider"], r["mode"]): r for r in sweep.get("rows", [])}


def ncu_figures(path):
    """A few lines of Nsight Compute's report of the pyramid forward (SM active / elapsed, registers, occupancy)."""
    with open(path) as f:
        text = f.read()
    def get(name):
        m = re.search(rf"{name}\s+\S*\s+([\d.,]+)", text)
        return m.group(1).replace(",", "") if m else None

    active, elapsed = get("SM Active Cycles"), get("Elapsed Cycles")
    if not (active and elapsed):
        return dict(note=text.strip().splitlines()[0][:200] if text.strip() else "empty report")
    return dict(registers=get("Registers Per Thread"), achieved_occupancy=get("Achieved Occupancy"),
                sm_busy=float(active) / float(elapsed))


def evaluate(bench, sweep):
    out = []
    for name, group, prov, field, target, ref in BENCH:
        mine, other = bench.get((group, prov)), bench.get((group, ref)) if ref else None
        value = None if mine is None or (ref and other is None) else (
            other["ms_p50"] / mine["ms_p50"] if field == "speedup" else mine.get(field))
        out.append(dict(figure=name, value=value, target=target))
    for name, D, T, mode, field, target, ref in SWEEP:
        mine, other = sweep.get((D, T, "triton", mode)), sweep.get((D, T, ref, mode)) if ref else None
        ok = mine is not None and "ms" in mine and (ref is None or (other is not None and "ms" in other))
        value = None if not ok else other["ms"] / mine["ms"] if field == "speedup" else mine.get(field)
        out.append(dict(figure=name, value=value, target=target))
    for r in out:
        r["ok"] = None if r["value"] is None else r["value"] >= r["target"]
    return out


def summarize(directory, tag, phases=None, seconds=None):
    broken = []
    result = dict(tag=tag, seconds=seconds, phases=[], env=None, gpu_tests=None, ceilings=None, kernels=[],
                  sweep=[], targets=[], train=[], ncu=None, broken=broken)
    p = lambda name: os.path.join(directory, name)  # noqa: E731
    run = read(p(f"run_{tag}.json"), _json, broken) if os.path.exists(p(f"run_{tag}.json")) else None
    if phases and os.path.exists(phases):
        with open(phases) as f:
            result["phases"] = [dict(zip(("phase", "given_s", "used_s", "status"), line.rstrip("\n").split("\t")))
                                for line in f if line.strip()]
        if run is not None:  # the run's own record gets the phase log
            run.update(phases=result["phases"], seconds=seconds)
            with open(p(f"run_{tag}.json"), "w") as f:
                json.dump(run, f, indent=1)
    if run is not None:
        result["env"] = {k: run["env"].get(k) for k in ("device", "torch", "triton", "cuda", "git")}
        result["ceilings"] = run.get("ceilings")
    if os.path.exists(p(f"gpu_tests_{tag}.xml")):
        result["gpu_tests"] = read(p(f"gpu_tests_{tag}.xml"), junit, broken)
    bench = {}
    for path in sorted(glob.glob(p(f"kernels*_{tag}.json"))):
        bench.update(read(path, lambda x: kernel_rows(_json(x)), broken) or {})
    for (group, prov), info in sorted(bench.items(), key=lambda kv: kv[0][0] + str(kv[0][1])):
        result["ceilings"] = result["ceilings"] or {k: info.get(k) for k in ("copy_bw_TBps", "bf16_matmul_TFLOPs")}
        result["kernels"].append({k: info.get(k) for k in ("name", "ms_p50", "GBps", "frac_copy_bw", "TFLOPs",
                                                            "frac_bf16_matmul")})
    sweep = {}
    if os.path.exists(p(f"pyramid_{tag}.json")):
        data = read(p(f"pyramid_{tag}.json"), _json, broken)
        if data is not None:
            sweep = sweep_rows(data)
            result["sweep"] = list(sweep.values())
            result["ceilings"] = result["ceilings"] or data.get("ceilings")
    result["targets"] = evaluate(bench, sweep)
    for path in sorted(glob.glob(p(f"train_*_{tag}.json"))):
        r = read(path, _json, broken)
        if r is not None:
            result["train"].append(r)
    if os.path.exists(p(f"train_{tag}.jsonl")):
        result["train"] += read(p(f"train_{tag}.jsonl"), _jsonl, broken) or []
    if os.path.exists(p(f"ncu_{tag}.txt")):
        result["ncu"] = read(p(f"ncu_{tag}.txt"), ncu_figures, broken)
    with open(p(f"summary_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def table(result):
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [f"== run {result['tag']}" + (f" ({result['seconds']} s)" if result.get("seconds") else "")]
    if result["phases"]:
        lines.append("phases: " + ", ".join(f"{x['phase']} {x['used_s']}/{x['given_s']} s"
                                            + ("" if x["status"] == "0" else f" [{x['status']}]")
                                            for x in result["phases"]))
    t = result["gpu_tests"]
    lines.append("GPU tier: not run" if t is None else
                 f"GPU tier: {t['tests'] - t['failures'] - t['errors'] - t['skipped']} passed, {t['failures']} "
                 f"failed, {t['errors']} errors, {t['skipped']} skipped")
    c = result["ceilings"]
    if c:
        lines.append(f"measured: copy {fmt(c.get('copy_bw_TBps'))} TB/s, bf16 GEMM {fmt(c.get('bf16_matmul_TFLOPs'))} "
                     f"TFLOP/s" + ("" if c.get("ceilings_measured", True) else " (stand-ins, not measured)"))
    if result["sweep"]:
        lines.append(f"{'pyramid D  T':<16} {'fwd ms':>9} {'x sdpa':>7} {'fwd+bwd ms':>11} {'x sdpa':>7} "
                     f"{'GEMM frac':>9}")
        rows = {(r["D"], r["T"], r["provider"], r["mode"]): r for r in result["sweep"]}
        for D, T in sorted({(r["D"], r["T"]) for r in result["sweep"]}, key=lambda x: (-x[0], x[1])):
            ms = lambda prov, mode: rows.get((D, T, prov, mode), {}).get("ms")  # noqa: E731
            sp = lambda mode: (ms("sdpa", mode) / ms("triton", mode)  # noqa: E731
                               if ms("sdpa", mode) and ms("triton", mode) else None)
            frac = rows.get((D, T, "triton", "fwd"), {}).get("frac_bf16_matmul")
            lines.append(f"{D:>4} {T:>10}  {fmt(ms('triton', 'fwd')):>9} {fmt(sp('fwd')):>7} "
                         f"{fmt(ms('triton', 'full')):>11} {fmt(sp('full')):>7} {fmt(frac):>9}")
    lines.append(f"{'figure':<52} {'value':>8} {'target':>8}  ok")
    for r in result["targets"]:
        lines.append(f"{r['figure']:<52} {fmt(r['value']):>8} {fmt(r['target']):>8}  "
                     f"{'-' if r['ok'] is None else 'yes' if r['ok'] else 'NO'}")
    n = result.get("ncu")
    if n and "note" in n:
        lines.append(f"ncu: {n['note']}")
    elif n:
        lines.append(f"ncu pyramid fwd 64k D128: SMs busy {fmt(n['sm_busy'])} of the elapsed cycles, {n['registers']} "
                     f"registers, achieved occupancy {n['achieved_occupancy']} %")
    lines += [f"broken: {b}" for b in result.get("broken", [])]
    for r in result["train"]:
        cfg, mfu = r.get("config", "?"), r.get("mfu")
        want = f">= {MFU[cfg]:.0%}" if cfg in MFU else ""
        lines.append(f"train {cfg:<14} {r['tokens_per_s']:>12,.0f} tok/s   MFU {'-' if mfu is None else f'{mfu:.1%}'} "
                     f"{want}{' (interrupted)' if r.get('interrupted') else ''}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="where bench/run_gpu.sh wrote its files ($OUT or bench/results)")
    p.add_argument("--tag", required=True, help="<device>_<date>_<commit> of the run")
    p.add_argument("--phases", default=None, help="the script's phase log (name, given s, used s, status per line)")
    p.add_argument("--seconds", type=int, default=None, help="the script's wall time")
    args = p.parse_args(argv)
    result = summarize(args.directory, args.tag, args.phases, args.seconds)
    print(table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
