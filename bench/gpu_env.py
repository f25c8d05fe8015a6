"""The device's ceilings and the run's environment, measured once per GPU run and shared by its phases.

    python bench/gpu_env.py OUT.json        # ceilings (copy TB/s, bf16 GEMM TFLOP/s), versions, git, nvidia-smi

Phases read the ceilings back through MC_CEILINGS=OUT.json (bench/conftest.py, bench/pyramid_sweep.py), so every
figure of a run is a fraction of what that machine did in that run. Without CUDA: stand-in ceilings, flagged
(`ceilings_measured` false), so that the plumbing runs on a CPU.
"""
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STANDIN = dict(copy_bw_TBps=0.01, bf16_matmul_TFLOPs=0.1, ceilings_measured=False)  # round numbers, not measured


def measure_ceilings() -> dict:
    """Copy bandwidth (read + write of 1 GiB, TB/s) and bf16 GEMM rate (8192^3, TFLOP/s), do_bench medians."""
    if not torch.cuda.is_available():
        return dict(STANDIN)
    from triton.testing import do_bench
    x = torch.empty(2**29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    copy_ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gemm_ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    del x, y, a, b
    torch.cuda.empty_cache()
    return dict(copy_bw_TBps=2 * 2**29 * 2 / (copy_ms * 1e-3) / 1e12,
                bf16_matmul_TFLOPs=2 * 8192**3 / (gemm_ms * 1e-3) / 1e12, ceilings_measured=True)


def ceilings() -> dict:
    """This run's ceilings: MC_CEILINGS's file when set (measured once by the run's first phase), else measured."""
    path = os.environ.get("MC_CEILINGS")
    if path and os.path.exists(path):
        with open(path) as f:
            return {k: v for k, v in json.load(f)["ceilings"].items()}
    return measure_ceilings()


def _sh(*cmd):
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def env_info() -> dict:
    import triton
    return dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton.__version__, git=_sh("git", "rev-parse", "HEAD") or os.environ.get("MC_COMMIT", ""),
                git_status=_sh("git", "status", "--porcelain"), nvidia_smi=_sh("nvidia-smi"),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


def main(argv):
    out = argv[0]
    t0 = time.time()
    result = dict(env=env_info(), ceilings=measure_ceilings())
    result["seconds"] = round(time.time() - t0, 1)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    c = result["ceilings"]
    print(f"{result['env']['device']}: copy {c['copy_bw_TBps']:.3g} TB/s, bf16 GEMM {c['bf16_matmul_TFLOPs']:.4g} "
          f"TFLOP/s{'' if c['ceilings_measured'] else ' (stand-ins: no GPU)'}")


if __name__ == "__main__":
    main(sys.argv[1:])
