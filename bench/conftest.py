"""Benchmark tier (GPU only): skip rules, the device's ceilings measured in the run, one helper that records physics.

Run on the GPU box:  pytest bench/ --benchmark-json bench/results/<gpu>_<date>_<commit>.json
Without CUDA, or under TRITON_INTERPRET=1 (do_bench and autotune need a driver), every benchmark is skipped, except in
the stand-in mode MC_BENCH_STANDIN=1 (CPU): only the tiny `standin` cases run, timed by a host-clock stand-in for
do_bench against stand-in ceilings, so the whole harness (fixtures, record(), pytest-benchmark's JSON, the summary)
runs in the CPU test tier (tests/test_bench_harness.py, bash bench/run_gpu.sh dry). Its figures are not measurements.
"""
import functools
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `import kernels` from the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_env

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU = torch.cuda.is_available() and not INTERPRET
STANDIN = os.environ.get("MC_BENCH_STANDIN", "0") == "1" and not GPU  # CPU plumbing check, not a measurement
STANDIN_CEILINGS = dict(copy_bw_TBps=0.01, bf16_matmul_TFLOPs=0.1)  # round stand-ins: fractions stay readable


def pytest_collect_file(parent, file_path):
    """Collect bench_*.py when given `bench/` (pytest's default pattern is test_*.py); explicit paths collect anyway."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    why = "benchmarks need a CUDA GPU" + (" (TRITON_INTERPRET=1 is set)" if INTERPRET else "")
    for item in items:
        if not (STANDIN and "standin" in item.name):
            item.add_marker(pytest.mark.skip(reason=why + ("; stand-in mode runs the standin cases" if STANDIN
                                                           else "")))


def _env_info() -> dict:
    import triton
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = ""
    device = torch.cuda.get_device_name() if GPU else "cpu (stand-in timer)"
    return dict(device=device, torch=torch.__version__, triton=triton.__version__,
                git_sha=sha or os.environ.get("MC_COMMIT", "unknown"))


@functools.cache
def measured_ceilings() -> dict:
    """This device's copy bandwidth (TB/s) and bf16 GEMM rate (TFLOP/s), measured once per run (bench/gpu_env.py;
    MC_CEILINGS names the file of the run's first phase), so every figure is also a fraction of what this machine
    does (ceilings.json: the 2026-11-23 H100). Stand-ins without a GPU."""
    if not GPU:
        return dict(STANDIN_CEILINGS, ceilings_measured=False)
    import gpu_env
    return gpu_env.ceilings()


def device_quantiles(fn) -> tuple[float, float, float]:
    """p20, p50, p80 in ms: do_bench on the device clock; in stand-in mode, three host-clock calls."""
    if GPU:
        from triton.testing import do_bench
        return tuple(do_bench(fn, quantiles=[0.2, 0.5, 0.8]))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def record(benchmark, fn, nbytes: float = None, flops: float = None):
    """Time `fn` twice: do_bench's p20/p50/p80 on the device clock, and pytest-benchmark on the host clock (synced).

    nbytes: bytes the op must move at least (memory-bound ops, judged against the copy bandwidth);
    flops: useful FLOPs (compute-bound ops, judged against the bf16 GEMM rate). Both ceilings are measured in this
    run (measured_ceilings); derived numbers use p50. MC_BENCH_ROUNDS sets the host-clock rounds (default 50).
    """
    ceil = measured_ceilings()
    p20, p50, p80 = device_quantiles(fn)
    info = benchmark.extra_info
    info.update(_env_info())
    info.update(ceil)
    info.update(ms_p20=p20, ms_p50=p50, ms_p80=p80)
    if nbytes is not None:
        gbps = nbytes / (p50 * 1e-3) / 1e9
        info.update(bytes=nbytes, GBps=gbps, frac_copy_bw=gbps / (ceil["copy_bw_TBps"] * 1e3))
    if flops is not None:
        tflops = flops / (p50 * 1e-3) / 1e12
        info.update(flops=flops, TFLOPs=tflops, frac_bf16_matmul=tflops / ceil["bf16_matmul_TFLOPs"])

    def fn_sync():
        fn()
        if GPU:
            torch.cuda.synchronize()  # pytest-benchmark reads the host clock: wait for the kernels

    rounds = 1 if STANDIN else int(os.environ.get("MC_BENCH_ROUNDS", "50"))
    benchmark.pedantic(fn_sync, rounds=rounds, warmup_rounds=0 if STANDIN else max(1, rounds // 5))
    return info


@pytest.fixture
def bench_record(benchmark):
    """record() bound to this test's benchmark; a fixture, so bench files need not import a module named conftest."""
    return lambda fn, **kw: record(benchmark, fn, **kw)


@pytest.fixture
def bench_device():
    """Where the benchmark's tensors live: cuda, or cpu in stand-in mode."""
    return "cuda" if GPU else "cpu"


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (interpreted on CPU) for one test, then restore the previous backend."""
    import kernels
    previous = kernels.backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(previous)
