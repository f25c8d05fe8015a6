"""Gaussian RoPE throughput (memory-bound: judged as a fraction of the measured copy bandwidth).

Bytes, with N = B*T*(Hq+Hk)*D elements of q and k, e their element size:
    fwd  = 2 N e + 8 B T          read q, k; write q_rot, k_rot; read mu, sigma (fp32)
    bwd  = 2 N e + 8 B T          read dq_rot, dk_rot; write dq, dk; read mu, sigma
    full = fwd + bwd
Providers: reference (eager gauss_rope_ref), compiled (torch.compile of it), triton (the kernel via gauss_rope).
"""
import functools
import math

import pytest
import torch

from kernels.rope import gauss_rope, gauss_rope_ref

SHAPES = [  # (B, T, Hq, Hk, D)
    pytest.param((4, 4096, 32, 8, 128), id="B4-T4096-Hq32-Hk8-D128"),  # Llama-3-8B-like GQA
    pytest.param((8, 1024, 12, 12, 64), id="B8-T1024-H12-D64"),  # GPT-2-small-like
    pytest.param((2, 33, 3, 1, 32), id="standin-B2-T33-Hq3-Hk1-D32"),  # CPU plumbing check (MC_BENCH_STANDIN=1)
]


def _ref_qk(q, k, mu, sigma):
    return gauss_rope_ref(q, mu, sigma), gauss_rope_ref(k, mu, sigma)


@functools.cache
def _compiled():
    return torch.compile(_ref_qk)


def _triton_qk(q, k, mu, sigma):
    return gauss_rope(q, k, mu, sigma)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
def test_bench_rope(benchmark, bench_record, bench_device, triton_backend, shape, provider, mode):
    B, T, Hq, Hk, D = shape
    dtype, dev = torch.bfloat16, bench_device
    if provider == "compiled" and dev == "cpu":
        pytest.skip("stand-in mode: torch.compile is the GPU's comparison")
    q = torch.randn(B, T, Hq, D, device=dev, dtype=dtype, requires_grad=mode != "fwd")
    k = torch.randn(B, T, Hk, D, device=dev, dtype=dtype, requires_grad=mode != "fwd")
    lod = torch.randint(0, 2, (B, T), device=dev)  # half tokens, half 32-token gists
    mu = torch.arange(T, device=dev, dtype=torch.float32).expand(B, T) - T
    sigma = torch.where(lod > 0, 32 / math.sqrt(12), 0.0)
    op = {"reference": _ref_qk, "compiled": _compiled(), "triton": _triton_qk}[provider]
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)

    if mode == "fwd":
        fn = lambda: op(q, k, mu, sigma)  # noqa: E731
    elif mode == "bwd":
        outs = op(q, k, mu, sigma)
        fn = lambda: torch.autograd.grad(outs, (q, k), (dq_out, dk_out), retain_graph=True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(op(q, k, mu, sigma), (q, k), (dq_out, dk_out))  # noqa: E731

    one_pass = 2 * B * T * (Hq + Hk) * D * q.element_size() + 8 * B * T
    benchmark.group = f"rope-{B}x{T}x{Hq}/{Hk}x{D}-{mode}"
    bench_record(fn, nbytes=one_pass * (2 if mode == "full" else 1))
