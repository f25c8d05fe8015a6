"""sm_90 compile check, no GPU needed: every Triton kernel, at the shapes the GPU tier and the benchmarks use, in
every config its autotuner keeps there, compiled ahead of time for an H100 (capability 90; triton ships ptxas).

    python bench/compile_sm90.py                  # all cases -> bench/results/compile_sm90.{json,md}
    python bench/compile_sm90.py --subset ci      # the default test tier's subset (tests/test_compile_sm90.py)
    python bench/compile_sm90.py --list           # the cases and the configs each would compile

How: the launchers run on "meta" tensors (shapes and dtypes, no data) with kernels._util.LAUNCH_HOOK recording each
launch instead of running it; each recorded launch gives the autotuner, its arguments and its kept configs (the
launcher's own prune), and each distinct (kernel, signature, constexprs, config) is compiled once with
triton.compile(..., target=GPUTarget("cuda", 90, 32)). Per compile: registers, spill stores/loads and stack frame
(ptxas -v), shared memory (Triton's allocation), and SASS instructions per inner-loop tile: the innermost loops that
hold tensor-core instructions (HGMMA/HMMA; FFMA for fp32 IEEE dots), with their MMA, MUFU and global-load counts.
Failures (exit 1): a compile error; a spill in a 16-bit config the launcher keeps; shared memory over 227 KB; a
kept config above the launcher's shared-memory estimate (the pruning must be an upper bound). The RoPE probe compiles
the strategies kernels/lod_attention.py chose between (rotate once vs. per-tile rotation vs. tables) in the same
attention inner loop. Needs TRITON_INTERPRET unset: run it as its own process.
"""
import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if __name__ == "__main__":  # compiled kernels only: the interpreter's jit objects cannot be compiled
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kernels import _util  # noqa: E402
from kernels.gist_pool import GistPoolFn  # noqa: E402
from kernels.lod_attention import LodAttentionFn, _Meta, smem_bytes  # noqa: E402
from kernels.rope import GaussRopeFn  # noqa: E402
from kernels.schedule import busy, ctas_per_sm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
MMA = re.compile(r"^(HGMMA|HMMA|WGMMA)")


# ------------------------------------------------------------------------------------------------------------ cases
def _t(*shape, dtype=BF16, grad=False):
    return torch.empty(shape, dtype=dtype, device="meta", requires_grad=grad)


def rope_case(B, T, Hq, Hk, D, dtype, mu_dtype=FP32):
    """mu_dtype float64: a working context reaching past 2**24 tokens (the angles formed in float64)."""
    q, k = _t(B, T, Hq, D, dtype=dtype, grad=True), _t(B, T, Hk, D, dtype=dtype, grad=True)
    qo, ko = GaussRopeFn.apply(q, k, _t(B, T, dtype=mu_dtype), _t(B, T, dtype=FP32), 10000.0, 0, 0)
    torch.autograd.backward([qo, ko], [torch.empty_like(qo), torch.empty_like(ko)])


def gist_case(B, T, H, D, K, dtype):
    x, query = _t(B, T, H, D, dtype=dtype, grad=True), _t(H, D, dtype=FP32, grad=True)
    out = GistPoolFn.apply(x, query, K)
    out.backward(torch.empty_like(out))


def lod_case(B, T, H, Hk, D, K, W0, W1, dtype, focus=0, fb=128):
    """T tokens with their complete LOD1, LOD2 gists (the training layout); W0=None: causal over T entries."""
    n1, n2 = (0, 0) if W0 is None else (T // K, T // (K * K))
    N = T + n1 + n2
    q, k, v = _t(B, N, H, D, dtype=dtype, grad=True), _t(B, N, Hk, D, dtype=dtype, grad=True), _t(
        B, N, Hk, D, dtype=dtype, grad=True)
    foc = _t(B, -(-T // fb), focus, 2, dtype=torch.int32) if focus else None
    m = _Meta(N if W0 is None else T, n1, n2, K, W0, W1, fb, D ** -0.5, W0 is None)
    o = LodAttentionFn.apply(q, k, v, _t(B, N, dtype=FP32), _t(B, N, dtype=FP32), foc, m, (10000.0, 0, 0))
    o.backward(torch.empty_like(o))


# (name, callable, arguments, in the CI subset): the GPU tier's shapes (tests/test_*.py -m gpu), the benchmarks'
# (bench/bench_*.py) and the training-throughput models (configs/small.py, medium.py: B 32/16, T 2048, D 64)
CASES = [
    ("rope gpu B4-T4096-Hq32-Hk8-D128 bf16", rope_case, (4, 4096, 32, 8, 128, BF16), True),
    ("rope gpu B1-T8192-H12-D64 bf16", rope_case, (1, 8192, 12, 12, 64, BF16), False),
    ("rope gpu B2-T8000-Hq16-Hk4-D64 fp16", rope_case, (2, 8000, 16, 4, 64, FP16), False),
    ("rope gpu B1-T8191-Hq6-Hk2-D128 fp32", rope_case, (1, 8191, 6, 2, 128, FP32), False),
    ("rope gpu int64 T65544-Hq256-Hk1-D128 bf16", rope_case, (1, 65544, 256, 1, 128, BF16), False),
    ("rope bench B8-T1024-H12-D64 bf16", rope_case, (8, 1024, 12, 12, 64, BF16), False),
    ("rope train small B32-T2048-H8-D64 bf16", rope_case, (32, 2048, 8, 8, 64, BF16), False),
    ("rope train medium B16-T2048-H12-D64 bf16", rope_case, (16, 2048, 12, 12, 64, BF16), False),
    ("rope far decode B1-T1024-H12-D64 bf16 mu64", rope_case, (1, 1024, 12, 12, 64, BF16, torch.float64), False),
    ("rope p-RoPE mc_demo_gpu B32-T1024-H8-D64 bf16", rope_case, (32, 1024, 8, 8, 64, BF16), False),
    ("gist gpu B4-T8192-H12-D64-K32 bf16", gist_case, (4, 8192, 12, 64, 32, BF16), True),
    ("gist gpu B2-T8192-H8-D128-K64 bf16", gist_case, (2, 8192, 8, 128, 64, BF16), False),
    ("gist gpu B2-T4096-H16-D64-K8 fp16", gist_case, (2, 4096, 16, 64, 8, FP16), False),
    ("gist gpu B1-T8160-H6-D128-K32 fp32", gist_case, (1, 8160, 6, 128, 32, FP32), False),
    ("gist bench B4-T8192-H16-D128-K64 bf16", gist_case, (4, 8192, 16, 128, 64, BF16), False),
    ("lod bench T65536-H16-D128-W1024.256 bf16", lod_case, (1, 65536, 16, 16, 128, 32, 1024, 256, BF16), True),
    ("lod bench T65536-H16-D64-W1024.256 bf16", lod_case, (1, 65536, 16, 16, 64, 32, 1024, 256, BF16), False),
    ("lod gpu T8192-H8-Hk2-D128-W512.2 bf16", lod_case, (1, 8192, 8, 2, 128, 32, 512, 2, BF16), False),
    ("lod gpu T4096-H4-D64-K16-W256.4 fp16", lod_case, (1, 4096, 4, 4, 64, 16, 256, 4, FP16), False),
    ("lod gpu T2048-H2-D64-W256.1 fp32", lod_case, (1, 2048, 2, 2, 64, 32, 256, 1, FP32), False),
    ("lod gpu T8192-H4-D128 causal bf16", lod_case, (1, 8192, 4, 4, 128, 32, None, 0, BF16), False),
    ("lod gpu T4096-H4-D64-W256.2 focus8 bf16", lod_case, (2, 4096, 4, 4, 64, 32, 256, 2, BF16, 8), True),
]


def record_launches(case):
    """[(autotuner, args, kwargs)] of every kernel launch the case makes (nothing runs)."""
    launches = []
    _util.LAUNCH_HOOK = lambda tuned, grid, args, kwargs: launches.append((tuned, args, kwargs))
    try:
        case[1](*case[2])
    finally:
        _util.LAUNCH_HOOK = None
    return launches


def kernel_name(tuned, kwargs):
    name = tuned.fn.__name__.replace("_kernel", "").lstrip("_")
    return name.replace("lod_attn_fwd", "lod_attn_dq") if kwargs.get("BWD") else name


# ---------------------------------------------------------------------------------------------------------- compile
def compile_sm90(fn, args, kwargs, fresh=True):
    """triton.compile for sm_90 with the runtime's own specialization of (args, kwargs); returns (kernel, ptxas log).
    fresh: bypass Triton's cache so that ptxas runs (its log has the registers and spills)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,  # as JITFunction.run adds them:
                  instrumentation_mode=knobs.compilation.instrumentation_mode)  # same options, same cache key
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = fresh, fresh
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    return kernel, log.getvalue()


def sass_lines(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", f.name], capture_output=True, text=True).stdout
    insts, labels = [], {}
    for line in out.splitlines():
        if re.match(r"^\.L_x_\d+:", line):
            labels[line[:-1]] = len(insts)
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);", line)
        if m:
            insts.append((m.group(2), m.group(3)))
    return insts, labels


def tile_loops(cubin, fp32_dots):
    """Innermost loops holding matrix instructions: [{insts, mma, mufu, ldg}] per loop body, in code order."""
    insts, labels = sass_lines(cubin)
    loops = []
    for i, (op, rest) in enumerate(insts):
        t = re.search(r"\(\.L_x_\d+\)", rest)
        if op.startswith("BRA") and t and labels.get(t.group(0)[1:-1], i + 1) <= i:
            loops.append((labels[t.group(0)[1:-1]], i))
    is_mma = (lambda op: op.startswith("FFMA")) if fp32_dots else (lambda op: bool(MMA.match(op)))
    with_mma = [(a, z) for a, z in loops if any(is_mma(op) for op, _ in insts[a:z + 1])]
    inner = [(a, z) for a, z in with_mma if not any(a <= a2 and z2 <= z and (a2, z2) != (a, z) for a2, z2 in with_mma)]
    body = lambda a, z, f: sum(1 for op, _ in insts[a:z + 1] if f(op))  # noqa: E731
    return [dict(insts=z - a + 1, mma=body(a, z, is_mma), mufu=body(a, z, lambda op: op.startswith("MUFU")),
                 ldg=body(a, z, lambda op: op.startswith(("LDG", "LDGSTS", "UTMALDG"))))
            for a, z in sorted(inner)], len(insts)


def measure(fn, args, kwargs):
    t0 = time.time()
    kernel, log = compile_sm90(fn, args, kwargs)
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0  # noqa: E731
    dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    loops, n = tile_loops(kernel.asm["cubin"], fp32_dots=dtype == FP32 and "PREC" in kwargs)
    regs = num(r"Used (\d+) registers")
    return dict(registers=regs, spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                smem=kernel.metadata.shared, ctas_per_sm=ctas_per_sm(regs, kwargs.get("num_warps", 4),
                                                                     kernel.metadata.shared),
                sass_insts=n, tile_loops=loops, compile_s=round(time.time() - t0, 1))


def cfg_str(c):
    return " ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w{c.num_warps} s{c.num_stages}"


def plan(cases):
    """Distinct compiles: {key: dict(kernel, config, dtype, args, kwargs, shapes[], kept, smem_est)}."""
    jobs = {}
    for case in cases:
        for tuned, args, kwargs in record_launches(case):
            nargs = dict(zip(tuned.arg_names, args))
            prune = tuned.early_config_prune
            kept = prune(tuned.configs, nargs, **kwargs) if prune else tuned.configs
            name = kernel_name(tuned, kwargs)
            dtype = str(args[0].dtype).replace("torch.", "")
            for cfg in tuned.configs:
                kw = {**kwargs, **cfg.all_kwargs()}
                sig = tuple((a.dtype, a.is_floating_point()) if isinstance(a, torch.Tensor) else
                            (int(a) == 1, int(a) % 16 == 0) if isinstance(a, int) else type(a) for a in args)
                key = (name, dtype, sig, tuple(sorted((k, str(v)) for k, v in kw.items())))
                job = jobs.setdefault(key, dict(kernel=name, dtype=dtype, config=cfg_str(cfg), fn=tuned.fn, args=args,
                                                kwargs=kw, shapes=[], kept=cfg in kept, consts=_consts(kwargs)))
                job["kept"] |= cfg in kept
                job["shapes"].append(case[0])
                if name in ("lod_attn_fwd", "lod_attn_dq", "lod_attn_dkdv"):
                    kind = name.split("_")[-1]
                    job["smem_est"] = smem_bytes(kind, cfg, kwargs["D"], args[0].element_size())
    return jobs


def _consts(kwargs):
    return " ".join(f"{k}={v}" for k, v in kwargs.items() if k in ("D", "K", "HQ", "HK", "H", "KB", "CAUSAL",
                                                                    "HAS_FOCUS", "BACKWARD", "BLOCK_HQ", "BLOCK_D"))


def verdict(r):
    """Why a compiled record fails the check ('' when it passes)."""
    if not r["kept"]:  # compiled only with --pruned, to see what the prune saves
        return ""
    if "error" in r:
        return "compile error: " + r["error"]
    if r["dtype"] in ("bfloat16", "float16") and (r["spill_stores"] or r["spill_loads"]):
        return f"spills {r['spill_stores']} B stores / {r['spill_loads']} B loads in a kept 16-bit config"
    if r["smem"] > _util.SMEM_LIMIT:
        return f"shared memory {r['smem']} B > {_util.SMEM_LIMIT} B"
    if r.get("smem_est") is not None and r["smem"] > r["smem_est"]:
        return f"shared memory {r['smem']} B above the launcher's estimate {r['smem_est']} B"
    return ""


# ------------------------------------------------------------------------------------------------------- RoPE probe
@triton.jit
def _probe_kernel(Q, KX, CS, V, O, NK, MODE: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The attention forward inner loop (half-split dots, as a fused rotation needs) with the key rotation done three
    ways: MODE 0 keys rotated beforehand; 1 Gaussian RoPE recomputed from positions (exp, sin, cos per pair: the old
    kernel); 2 per-entry cos/sin tables in fp32 (two extra [BN, D/2] loads and 4 FMAs per pair)."""
    HALF: tl.constexpr = D // 2
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    j = tl.arange(0, HALF)
    q1 = tl.load(Q + rm[:, None] * D + j[None, :])
    q2 = tl.load(Q + rm[:, None] * D + HALF + j[None, :])
    acc = tl.zeros([BM, D], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    for start in range(0, NK, BN):
        rn = start + tl.arange(0, BN)
        k1 = tl.load(KX + rn[:, None] * D + j[None, :])
        k2 = tl.load(KX + rn[:, None] * D + HALF + j[None, :])
        if MODE > 0:
            if MODE == 1:
                w = tl.exp2(j.to(tl.float32) * (-13.287712 / HALF))
                ang = rn.to(tl.float32)[:, None] * w[None, :]
                sw = (rn.to(tl.float32) * 0.01)[:, None] * w[None, :]
                att = tl.exp(-0.5 * sw * sw)
                c, s = tl.cos(ang) * att, tl.sin(ang) * att
            else:
                c = tl.load(CS + rn[:, None] * D + j[None, :])
                s = tl.load(CS + rn[:, None] * D + HALF + j[None, :])
            f1, f2 = k1.to(tl.float32), k2.to(tl.float32)
            k1, k2 = (f1 * c - f2 * s).to(q1.dtype), (f1 * s + f2 * c).to(q1.dtype)
        v = tl.load(V + rn[:, None] * D + tl.arange(0, D)[None, :])
        s_ = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
        m_new = tl.maximum(m_i, tl.max(s_, 1))
        p = tl.math.exp2(s_ - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    tl.store(O + rm[:, None] * D + tl.arange(0, D)[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


def rope_probe():
    x, f = torch.empty(16, dtype=BF16, device="meta"), torch.empty(16, dtype=FP32, device="meta")
    rows = []
    for mode, what in enumerate(["rotate once (pre-rotated keys)", "recompute per tile", "cos/sin tables per tile"]):
        r = measure(_probe_kernel, (x, x, f, x, x, 65536), dict(MODE=mode, D=128, BM=128, BN=64, num_warps=8,
                                                                   num_stages=3))
        rows.append(dict(strategy=what, **{k: r[k] for k in ("registers", "spill_stores", "smem")},
                         tile=r["tile_loops"][0] if r["tile_loops"] else None))
    return rows


# ----------------------------------------------------------------------------------------------------------- report
def markdown(records, probe):
    """A short table per (kernel, dtype) over every compiled config, the attention configs at the headline shape, and
    the RoPE probe; every config's figures are in the JSON."""
    rng = lambda v: f"{min(v)}" if min(v) == max(v) else f"{min(v)}–{max(v)}"  # noqa: E731
    out = ["# sm_90 compile check", "",
           f"`python bench/compile_sm90.py` (triton {triton.__version__}, target sm_90, no GPU involved): every kernel "
           "at "
           "the shapes of the GPU tier, the benchmarks and the training configs, in every config its autotuner keeps "
           "there (the launchers prune the rest before compiling). Tile instructions: SASS instructions in the "
           "innermost loops that hold matrix instructions (unmasked interior … masked boundary loops), with the "
           "matrix (HGMMA, or FFMA for fp32 IEEE dots) and MUFU instructions per tile.", "",
           "| kernel | dtype | configs | registers | spill B | smem KB | tile insts | mma / tile | mufu / tile | "
           "compile s | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in records:
        groups.setdefault((r["kernel"], r["dtype"]), []).append(r)
    for (kernel, dtype), rs in groups.items():
        ok = [r for r in rs if "error" not in r]
        tiles = [t for r in ok for t in r["tile_loops"]]
        bad = [verdict(r) for r in rs if verdict(r)]
        out.append(f"| {kernel} | {dtype} | {len(rs)} | {rng([r['registers'] for r in ok])} | "
                   f"{max(r['spill_stores'] for r in ok)} | {max(r['smem'] for r in ok) / 1024:.0f} | "
                   f"{rng([t['insts'] for t in tiles]) if tiles else '-'} | "
                   f"{rng([t['mma'] for t in tiles]) if tiles else '-'} | "
                   f"{rng([t['mufu'] for t in tiles]) if tiles else '-'} "
                   f"| {max(r['compile_s'] for r in ok):.0f} | {'; '.join(bad) or 'ok'} |")
    head = [r for r in records if any("T65536-H16-D128" in sh for sh in r["shapes"]) and r["kernel"].startswith("lod")]
    if head:
        out += ["", "Pyramidal attention at the headline shape (T = 65,536, 16 heads, D = 128, bf16), each kept "
                "config, "
                "with the programs one SM holds (registers, shared memory) and the schedule model's busy fraction "
                "(kernels/schedule.py: ideal / makespan on 132 SMs at that occupancy; the forward grid also serves "
                "dq) at 64k and 256k tokens:", "",
                "| kernel | config | registers | spill B | smem KB (estimate) | CTAs/SM | busy 64k | busy 256k | "
                "tile insts (mma) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in head:
            tl_ = ", ".join(f"{t['insts']} ({t['mma']})" for t in r.get("tile_loops", []))
            b64, b256 = (headline_busy(r, T) for T in (65536, 262144))
            out.append(f"| {r['kernel']} | {r['config']} | {r.get('registers')} | {r.get('spill_stores')} | "
                       f"{r.get('smem', 0) / 1024:.0f} ({r.get('smem_est', 0) / 1024:.0f}) | {r.get('ctas_per_sm')} | "
                       f"{b64} | {b256} | {tl_} |")
        v1 = busy("fwd_v1", 65536, 16, ctas=1)[0]
        out += ["", f"The forward before issue 22 (per-level query tiles, BLOCK_M 128, BLOCK_N 64, 1 CTA/SM, as Nsight "
                f"Compute measured it): busy {v1:.2f} at 64k in the model (measured on the H200: 0.58 of the elapsed "
                f"cycles with SMs active)."]
    if probe:
        out += ["", "RoPE strategy probe: the attention forward inner loop (D = 128, 128x64 tile, 8 warps, bf16) with "
                "the key rotation done three ways (kernels/lod_attention.py chose the first).", "",
                "| strategy | registers | spill B | smem KB | tile insts | mma | mufu | global loads |",
                "|---|---|---|---|---|---|---|---|"]
        for p in probe:
            t = p["tile"] or {}
            out.append(f"| {p['strategy']} | {p['registers']} | {p['spill_stores']} | {p['smem'] / 1024:.0f} | "
                       f"{t.get('insts')} | {t.get('mma')} | {t.get('mufu')} | {t.get('ldg')} |")
    return "\n".join(out) + "\n"


def headline_busy(r, T):
    """The schedule model's busy fraction of a headline-shape record's grid at T tokens (16 heads, K 32, W0 1024,
    W1 256), at the occupancy its compile allows; '-' without a compile."""
    if "error" in r or not r.get("ctas_per_sm"):
        return "-"
    cfg = dict(kv.split("=") for kv in r["config"].split() if "=" in kv)
    kind = "dkdv" if r["kernel"] == "lod_attn_dkdv" else "fwd"
    return f"{busy(kind, T, 16, BM=int(cfg['BLOCK_M']), BN=int(cfg['BLOCK_N']), ctas=r['ctas_per_sm'])[0]:.3f}"


def _cases(subset, only=""):
    """The cases of a subset whose names contain any of the comma-separated patterns in `only` (all when empty)."""
    pats = [p for p in only.split(",") if p]
    return [c for c in CASES if (subset == "all" or c[3]) and (not pats or any(p in c[0] for p in pats))]


def _warm_worker(args):
    index, workers, subset, only = args
    jobs = [j for j in plan(_cases(subset, only)).values() if j["kept"]]
    for j in jobs[index::workers]:
        try:
            compile_sm90(j["fn"], j["args"], j["kwargs"], fresh=False)
        except Exception:  # noqa: BLE001 - reported by the compile check; a warm-up only fills the cache
            pass
    return len(jobs[index::workers])


def warm(workers, subset, only=""):
    """Fill Triton's cache (on the GPU machine: same target, same keys as the launches) in parallel processes, so the
    test tier and the benchmarks start without compiling."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return sum(pool.map(_warm_worker, [(i, workers, subset, only) for i in range(workers)]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subset", choices=["ci", "all"], default="all", help="ci: one kernel set at its largest shapes")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "compile_sm90"),
                   help="output path without extension: writes .json and .md")
    p.add_argument("--list", action="store_true", help="print the planned compiles and exit")
    p.add_argument("--only", default="", help="only the cases whose name contains one of these (comma-separated)")
    p.add_argument("--pruned", action="store_true", help="also compile the configs the prune drops (not checked)")
    p.add_argument("--no-probe", action="store_true", help="skip the RoPE strategy probe")
    p.add_argument("--warm", type=int, default=0, metavar="N", help="only fill Triton's cache, with N processes")
    args = p.parse_args(argv)
    if args.warm:
        t0 = time.time()
        n = warm(args.warm, args.subset, args.only)
        print(f"warmed {n} kernels in {time.time() - t0:.0f} s with {args.warm} processes")
        return 0
    cases = _cases(args.subset, args.only)
    jobs = plan(cases)
    todo = [j for j in jobs.values() if j["kept"] or args.pruned]
    if args.subset == "ci":  # the largest kept config of each kernel (and focus variant): the most likely to spill
        best = {}
        for j in todo:
            k = (j["kernel"], "HAS_FOCUS=True" in j["consts"])
            size = sum(v for kk, v in j["kwargs"].items() if kk.startswith(("BLOCK", "ROWS", "GB")))
            if k not in best or size > best[k][0]:
                best[k] = (size, j)
        todo = [j for _, j in best.values()]
    if args.list:
        for j in todo:
            print(f"{j['kernel']:<16} {j['dtype']:<9} {j['consts']:<60} {j['config']:<40} kept={j['kept']}")
        return 0
    records, t0 = [], time.time()
    for j in todo:
        r = {k: j[k] for k in ("kernel", "dtype", "consts", "config", "kept", "shapes")}
        if "smem_est" in j:
            r["smem_est"] = j["smem_est"]
        try:
            r.update(measure(j["fn"], j["args"], j["kwargs"]))
        except Exception as e:  # noqa: BLE001 - a compile error is a result here
            r["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        records.append(r)
        print(f"{r['kernel']:<16} {r['dtype']:<9} {r['config']:<34} regs={r.get('registers', '-'):<4} "
              f"spill={r.get('spill_stores', '-')} smem={r.get('smem', '-')} {verdict(r) or 'ok'}", flush=True)
    probe = [] if args.no_probe else rope_probe()
    result = dict(target="cuda sm_90", triton=triton.__version__, torch=torch.__version__, subset=args.subset,
                  smem_limit=_util.SMEM_LIMIT, seconds=round(time.time() - t0, 1), records=records, rope_probe=probe)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(records, probe))
    bad = [(r["kernel"], r["config"], verdict(r)) for r in records if verdict(r)]
    print(f"{len(records)} compiles in {result['seconds']} s, {len(bad)} failing -> {args.out}.json / .md")
    for b in bad:
        print("FAIL", *b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
