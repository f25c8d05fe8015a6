"""Gist pooling throughput (memory-bound: judged as a fraction of the measured copy bandwidth).

Bytes, with N = B*T*H*D elements of x, e their element size, K rows per group:
    fwd  = N e + (N/K) e                              read x; write out (query: H*D*4, negligible)
    bwd  = N e + (N/K) e + N e                        read x and dout; write dx (dquery: one [D] atomic per program)
    full = fwd + bwd
Providers: reference (eager gist_pool_ref), compiled (torch.compile of it), triton (the kernels via gist_pool).
"""
import functools

import pytest
import torch

from kernels.gist_pool import gist_pool, gist_pool_ref

SHAPES = [  # (B, T, H, D, K)
    pytest.param((8, 8192, 12, 64, 32), id="B8-T8192-H12-D64-K32"),  # GPT-2-small width, LOD1 blocks
    pytest.param((4, 8192, 16, 128, 64), id="B4-T8192-H16-D128-K64"),
    pytest.param((8, 8192, 12, 64, 8), id="B8-T8192-H12-D64-K8"),
    pytest.param((2, 96, 3, 32, 8), id="standin-B2-T96-H3-D32-K8"),  # CPU plumbing check (MC_BENCH_STANDIN=1)
]


@functools.cache
def _compiled():
    return torch.compile(gist_pool_ref, dynamic=False)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bench_gist_pool(benchmark, bench_record, bench_device, triton_backend, shape, provider, mode):
    B, T, H, D, K = shape
    dev = bench_device
    if provider == "compiled" and dev == "cpu":
        pytest.skip("stand-in mode: torch.compile is the GPU's comparison")
    x = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=mode != "fwd")
    query = torch.randn(H, D, device=dev, requires_grad=mode != "fwd")
    op = {"reference": gist_pool_ref, "compiled": _compiled(), "triton": gist_pool}[provider]
    dout = torch.randn(B, T // K, H, D, device=dev, dtype=torch.bfloat16)

    if mode == "fwd":
        fn = lambda: op(x, query, K)  # noqa: E731
    elif mode == "bwd":
        out = op(x, query, K)
        fn = lambda: torch.autograd.grad(out, (x, query), dout, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(op(x, query, K), (x, query), dout)  # noqa: E731

    N, e = B * T * H * D, x.element_size()
    fwd_bytes = N * e + N // K * e
    bwd_bytes = 2 * N * e + N // K * e
    benchmark.group = f"gist_pool-{B}x{T}x{H}x{D}-K{K}-{mode}"
    bench_record(fn, nbytes={"fwd": fwd_bytes, "bwd": bwd_bytes, "full": fwd_bytes + bwd_bytes}[mode])
