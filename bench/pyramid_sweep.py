"""Pyramidal attention against dense causal SDPA and FlexAttention across context lengths (bench/run_gpu.sh's sweep).

    python bench/pyramid_sweep.py --out $OUT/pyramid_<tag>.json     # T = 2k .. 256k at D = 128 and 64
    python bench/pyramid_sweep.py --ncu                             # one forward at 64k, D 128 in an NVTX range "prof"
    python bench/pyramid_sweep.py --dry --out x.json                # CPU: tiny shapes, host timer (plumbing only)

Per (D, T), bf16, B = 1, H = 16, K = 32, W0 = 1024, W1 = 256 (T tokens, then T/32 LOD1 and T/1024 LOD2 gists),
do_bench medians (ms) of the forward (no grad) and of forward + backward (autograd.grad of q, k, v):
  triton  kernels.lod_attention as the model calls it (RoPE pre-pass + the pyramid kernels; T <= W0 + K: SDPA)
  sdpa    dense causal SDPA over the T tokens alone (the baseline the pyramid must beat)
  flex    FlexAttention with the pyramid's mask, at --flex-T only (each shape compiles for seconds)
FLOPs: 4 D per (query, key) pair forward, 3.5x that forward + backward, over the `useful` pairs (the mask's), the
`visited` pairs (the forward kernel's tiles: kernels/schedule.py with the autotuner's chosen config) or the `dense`
pairs (T (T + 1) / 2). Figures: TFLOP/s on visited pairs and their fraction of the run's bf16 GEMM ceiling
(bench/gpu_env.py, MC_CEILINGS), speed-ups over sdpa and flex. The JSON is rewritten after every measurement (a
timeout keeps what was done); --budget stops starting new shapes after that many seconds.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import gpu_env  # noqa: E402
from bench_lod_attention import _flex  # noqa: E402
import kernels  # noqa: E402
from kernels.lod_attention import lod_attention  # noqa: E402
from kernels.pyramid import layout_tensors  # noqa: E402
from kernels.schedule import fwd_costs, useful_pairs  # noqa: E402

H, K, W0, W1 = 16, 32, 1024, 256
SHAPES = [(128, T) for T in (65536, 8192, 4096, 2048, 16384, 262144)] + [(64, T) for T in (65536, 8192, 4096, 2048,
                                                                                            16384, 262144)]


def timer(fn, gpu):
    """Median ms: do_bench on the device clock; on the CPU three host-clock calls (plumbing only)."""
    if gpu:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def case(T, D, dev, k=K):
    start, end, lod = layout_tensors(T, k, dev)
    N = len(start)
    mu = ((start + end - 1) / 2).float()[None]
    sigma = torch.where(lod > 0, (end - start).float() / math.sqrt(12), 0.0)[None]
    q, kk, v, do = (torch.randn(1, N, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    for x in (q, kk, v):
        x.requires_grad_()
    return (q, kk, v, mu, sigma, start, end, lod), do


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "results", "pyramid_sweep.json"))
    p.add_argument("--budget", type=float, default=1e9, help="seconds after which no new shape starts")
    p.add_argument("--flex-T", default="8192,65536", help="lengths (at D = 128) where FlexAttention is measured")
    p.add_argument("--ncu", action="store_true", help="one profiled forward at 64k, D = 128, in NVTX range 'prof'")
    p.add_argument("--dry", action="store_true", help="CPU plumbing check: tiny shapes, host timer")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.dry
    dev = "cuda" if gpu else "cpu"
    if gpu:
        kernels.set_backend("triton")
    if args.ncu:
        inputs, _ = case(65536, 128, dev)
        with torch.no_grad():
            lod_attention(*inputs, K=K, W0=W0, W1=W1)  # autotunes outside the profiled range
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_push("prof")
            lod_attention(*inputs, K=K, W0=W0, W1=W1)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
        return None
    shapes, k_, w0, w1 = SHAPES, K, W0, W1
    flex_T = {int(t) for t in args.flex_T.split(",") if t}
    if args.dry:  # tiny pyramids through the torch reference
        shapes, k_, w0, w1, flex_T = [(32, 70), (32, 40)], 4, 8, 2, set()
    ceil = gpu_env.ceilings() if gpu else dict(gpu_env.STANDIN)
    result = dict(env=dict(device=torch.cuda.get_device_name() if gpu else "cpu (dry run)", torch=torch.__version__,
                           backend=kernels.backend()), ceilings=ceil, H=H, K=k_, W0=w0, W1=w1, rows=[])
    t_start = time.time()

    def save():
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)

    for D, T in shapes:
        if time.time() - t_start > args.budget:
            result["skipped"] = result.get("skipped", []) + [dict(D=D, T=T)]
            continue
        inputs, do = case(T, D, dev, k_)
        q, k, v = inputs[:3]
        N = q.shape[1]
        useful, dense = useful_pairs(T, k_, w0, w1), T * (T + 1) // 2
        kw = dict(K=k_, W0=w0, W1=w1)
        qs, ks, vs = (torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dos = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
        qt, kt, vt = (x.transpose(1, 2) for x in (qs, ks, vs))
        sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)  # noqa: E731
        ops = [("triton", lambda: lod_attention(*inputs, **kw), (q, k, v), do), ("sdpa", sdpa, (qs, ks, vs), dos)]
        if D == 128 and T in flex_T:
            try:
                flex = _flex(q, k, v, *inputs[5:], k_, w0, w1)
                ops.append(("flex", lambda: flex(q, k, v), (q, k, v), do))
            except Exception as e:  # noqa: BLE001 - a missing FlexAttention is a result, not a crash
                result["rows"].append(dict(D=D, T=T, provider="flex", error=f"{type(e).__name__}: {e}"[:200]))
        for provider, op, leaves, grad in ops:
            for mode in ("fwd", "full"):
                row = dict(D=D, T=T, N=N, provider=provider, mode=mode)
                try:
                    if mode == "fwd":
                        def fn():
                            with torch.no_grad():
                                op()
                    else:
                        def fn():
                            torch.autograd.grad(op(), leaves, grad)
                    fn()  # compile, autotune
                    row["ms"] = timer(fn, gpu)
                except Exception as e:  # noqa: BLE001 - one failing provider must not end the sweep
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    result["rows"].append(row)
                    save()
                    continue
                mult = 4 * D * H * (1.0 if mode == "fwd" else 3.5)
                if provider == "sdpa":
                    row.update(pairs=dense)
                else:
                    row.update(pairs=useful, useful_pairs=useful)
                if provider == "triton":
                    tuned = sys.modules["kernels.lod_attention"]._TUNED["fwd"]
                    cfg = getattr(tuned, "best_config", None)
                    bm, bn = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]) if cfg else (32, 32)
                    visited = int(fwd_costs(T, k_, w0, w1, bm, bn, "fwd", masked=1.0, overhead=0.0).sum()) * bm * bn
                    row.update(pairs=visited, visited_pairs=visited, config=str(cfg) if cfg else "interpreter")
                row["TFLOPs"] = mult * row["pairs"] / (row["ms"] * 1e-3) / 1e12
                row["frac_bf16_matmul"] = row["TFLOPs"] / ceil["bf16_matmul_TFLOPs"]
                row["dense_equiv_TFLOPs"] = mult * dense / (row["ms"] * 1e-3) / 1e12
                result["rows"].append(row)
                save()
                print(f"D={D} T={T} {provider:<6} {mode:<4} {row['ms']:9.3f} ms  {row['TFLOPs']:7.1f} TFLOP/s",
                      flush=True)
        del inputs, do, qs, ks, vs, dos, ops
        if gpu:
            torch.cuda.empty_cache()
    result["seconds"] = round(time.time() - t_start, 1)
    save()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
