"""The short table of a bench/run_gpu.sh run: GPU tier result, kernel figures against the issue-10 targets, training
throughput and MFU; every kernel figure also as a fraction of the copy bandwidth / bf16 GEMM rate measured in the run.

    python bench/gpu_summary.py bench/results --tag NVIDIA_H100_80GB_HBM3_2026-11-30_abc1234

Reads <dir>/gpu_tests_<tag>.xml (junit), <dir>/kernels_*_<tag>.json (pytest-benchmark) and <dir>/train_*_<tag>.json
(bench/train_throughput.py) when they exist, writes <dir>/summary_<tag>.json and prints the table.
"""
import argparse
import glob
import json
import os
import sys
import xml.etree.ElementTree as ET

# (name, benchmark group, provider, figure, target, reference provider for a speedup or None)
TARGETS = [
    ("RoPE fwd+bwd, copy-bandwidth fraction", "rope-4x4096x32/8x128-full", "triton", "frac_copy_bw", 0.9, None),
    ("RoPE fwd+bwd vs torch.compile", "rope-4x4096x32/8x128-full", "triton", "speedup", 1.0, "compiled"),
    ("gist pooling fwd+bwd, copy-bandwidth fraction", "gist_pool-8x8192x12x64-K32-full", "triton", "frac_copy_bw",
     0.85, None),
    ("pyramid T=65536 fwd vs dense SDPA", "lod_attention-T65536-H16-D128-W1024.256-fwd", "triton", "speedup", 10.0,
     "sdpa"),
    ("pyramid T=65536 fwd vs FlexAttention", "lod_attention-T65536-H16-D128-W1024.256-fwd", "triton", "speedup", 3.0,
     "flex"),
    ("pyramid T=65536 fwd+bwd vs dense SDPA", "lod_attention-T65536-H16-D128-W1024.256-full", "triton", "speedup",
     4.0, "sdpa"),
    ("pyramid T=65536 fwd visited tiles, GEMM fraction", "lod_attention-T65536-H16-D128-W1024.256-fwd", "triton",
     "frac_bf16_matmul", 0.5, None),
]
MFU_TARGET = ("medium", 0.45)


def kernel_rows(bench):
    """{(group, provider): extra_info + name} from a pytest-benchmark JSON."""
    rows = {}
    for b in bench.get("benchmarks", []):
        provider = b.get("params", {}).get("provider")
        rows[(b["group"], provider)] = dict(b["extra_info"], name=b["name"])
    return rows


def evaluate(rows):
    out = []
    for name, group, prov, fig, target, ref in TARGETS:
        mine, other = rows.get((group, prov)), rows.get((group, ref)) if ref else None
        if mine is None or (ref and other is None):
            value = None
        elif fig == "speedup":
            value = other["ms_p50"] / mine["ms_p50"]
        else:
            value = mine.get(fig)
        out.append(dict(figure=name, value=value, target=target, ok=None if value is None else value >= target))
    return out


def junit(path):
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


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


def summarize(directory, tag):
    result = dict(tag=tag, gpu_tests=None, ceilings=None, kernels=[], targets=[], train=[], broken=[])
    broken = result["broken"]
    tests = os.path.join(directory, f"gpu_tests_{tag}.xml")
    if os.path.exists(tests):
        result["gpu_tests"] = read(tests, junit, broken)
    rows = {}
    for path in sorted(glob.glob(os.path.join(directory, f"kernels_*_{tag}.json"))):  # one file per kernel family
        rows.update(read(path, lambda p: kernel_rows(_json(p)), broken) or {})
    for (group, prov), info in sorted(rows.items(), key=lambda kv: kv[0][0] + str(kv[0][1])):
        result["ceilings"] = result["ceilings"] or {k: info.get(k) for k in ("copy_bw_TBps", "bf16_matmul_TFLOPs")}
        result["kernels"].append({k: info.get(k) for k in ("name", "device", "torch", "triton", "git_sha", "ms_p50",
                                                            "GBps", "frac_copy_bw", "TFLOPs", "frac_bf16_matmul")})
    result["targets"] = evaluate(rows)
    for p in sorted(glob.glob(os.path.join(directory, f"train_*_{tag}.json"))):
        r = read(p, _json, broken)
        if r is not None:
            result["train"].append(r)
    with open(os.path.join(directory, f"summary_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def table(result):
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    lines = [f"== run {result['tag']}"]
    t = result["gpu_tests"]
    lines.append("GPU tier: not run" if t is None else
                 f"GPU tier: {t['tests'] - t['failures'] - t['errors'] - t['skipped']} passed, {t['failures']} "
                 f"failed, {t['errors']} errors, {t['skipped']} skipped")
    if result["ceilings"]:
        c = result["ceilings"]
        lines.append(f"measured: copy {fmt(c['copy_bw_TBps'])} TB/s, bf16 GEMM {fmt(c['bf16_matmul_TFLOPs'])} TFLOP/s")
    lines.append(f"{'figure':<52} {'value':>8} {'target':>8}  ok")
    for r in result["targets"]:
        lines.append(f"{r['figure']:<52} {fmt(r['value']):>8} {fmt(r['target']):>8}  "
                     f"{'-' if r['ok'] is None else 'yes' if r['ok'] else 'NO'}")
    for r in result["train"]:
        cfg, mfu = r.get("config", "?"), r.get("mfu")
        want = f">= {MFU_TARGET[1]:.0%}" if cfg == MFU_TARGET[0] else ""
        lines.append(f"train {cfg:<14} {r['tokens_per_s']:>12,.0f} tok/s   MFU {'-' if mfu is None else f'{mfu:.1%}'} "
                     f"{want}")
    lines += [f"broken: {b}" for b in result.get("broken", [])]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", help="where bench/run_gpu.sh wrote its JSON ($OUT or bench/results)")
    p.add_argument("--tag", required=True, help="<device>_<date>_<commit> of the run")
    args = p.parse_args(argv)
    result = summarize(args.directory, args.tag)
    print(table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
