"""Pyramidal attention throughput (compute-bound: TFLOP/s against the bf16 matmul ceiling and SDPA's).

FLOPs, with P the (query, key) pairs a provider multiplies, per batch row and head (2 matmuls of D MACs per pair):
    fwd  = 4 P D B H          bwd = 2.5 fwd (5 matmuls instead of 2)          full = fwd + bwd = 3.5 fwd
Three counts of P are recorded:
    visited: P = sum over the forward's programs of BLOCK_M * BLOCK_N * (key tiles it loads) (kernels/schedule.py,
             tile config from the autotuner); the work the kernel does, the headline TFLOP/s (bwd and full reuse the
             forward's count: the dk/dv pass visits a similar, not identical, tile set)
    useful:  P = number of visible (query, key) pairs (the mask's popcount, computed arithmetically)
    dense:   P = T (T + 1) / 2, causal attention over the T tokens alone (what `sdpa` computes)
Providers: reference (lod_attention_ref: mask + SDPA, small T only), compiled (torch.compile of Gaussian RoPE + SDPA
with a precomputed mask, small T only), triton (the kernel), sdpa (dense causal over the T tokens: the baseline the
pyramid must beat), flex (FlexAttention with the same pyramid mask, where torch has it).
Headline: T = 65536 tokens + their gists, W0 = 1024, W1 = 256 blocks, K = 32, bf16, 16 heads, D = 64 and 128.
"""
import functools
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels.lod_attention import lod_attention, lod_attention_ref, lod_visibility
from kernels.pyramid import layout_tensors
from kernels.rope import gauss_rope_ref
from kernels.schedule import fwd_costs, useful_pairs

CASES = [  # (B, T, H, D, K, W0, W1)
    pytest.param((1, 65536, 16, 64, 32, 1024, 256), id="T65536-H16-D64-W1024-256"),
    pytest.param((1, 65536, 16, 128, 32, 1024, 256), id="T65536-H16-D128-W1024-256"),
    pytest.param((1, 8192, 16, 64, 32, 1024, 16), id="T8192-H16-D64-W1024-16"),
    pytest.param((1, 70, 3, 32, 4, 8, 2), id="standin-T70-H3-D32-K4-W8-2"),  # CPU plumbing check (MC_BENCH_STANDIN=1)
]
REF_MAX_N = 12000  # the references hold an N x N mask and fp32 scores per head


def _layout(T, K, device):
    start, end, lod = layout_tensors(T, K, device)  # what the gist stage passes: no metadata checks per call
    mu = (start + end - 1).float() / 2
    sigma = torch.where(lod > 0, (end - start).float() / math.sqrt(12), 0.0)
    return start, end, lod, mu[None], sigma[None]


@functools.cache
def _compiled():
    def rope_sdpa(q, k, v, mu, sigma, mask):
        qr = gauss_rope_ref(q.float(), mu, sigma).transpose(1, 2)
        kr = gauss_rope_ref(k.float(), mu, sigma).transpose(1, 2)
        o = F.scaled_dot_product_attention(qr, kr, v.float().transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2).to(q.dtype)
    return torch.compile(rope_sdpa)


def _flex(q, k, v, start, end, lod, K, W0, W1):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    b0 = ((start - W0).div(K, rounding_mode="floor") * K).clamp_min(0)
    b1 = ((b0 - W1 * K).div(K * K, rounding_mode="floor") * K * K).clamp_min(0)

    def mask_mod(b, h, i, j):
        c, s, e, l = start[i], start[j], end[j], lod[j]
        band = (((l == 0) & (b0[i] <= s) & (e <= c)) | ((l == 1) & (b1[i] <= s) & (e <= b0[i]))
                | ((l == 2) & (e <= b1[i])))
        return band | (i == j)

    N = q.shape[1]
    bm = create_block_mask(mask_mod, None, None, N, N, device=q.device, _compile=True)
    fa = torch.compile(flex_attention)
    return lambda qq, kk, vv: fa(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), block_mask=bm
                                 ).transpose(1, 2)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("provider", ["reference", "compiled", "triton", "sdpa", "flex"])
@pytest.mark.parametrize("case", CASES)
def test_bench_lod_attention(benchmark, bench_record, bench_device, triton_backend, case, provider, mode):
    B, T, H, D, K, W0, W1 = case
    dev, dtype = bench_device, torch.bfloat16
    if provider in ("compiled", "flex") and dev == "cpu":
        pytest.skip("stand-in mode: torch.compile and FlexAttention are the GPU's comparisons")
    start, end, lod, mu, sigma = _layout(T, K, dev)
    N = T if provider == "sdpa" else len(start)
    if provider in ("reference", "compiled") and N > REF_MAX_N:
        pytest.skip(f"{provider} materialises an N x N mask (N={N})")
    q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=dtype, requires_grad=mode != "fwd") for _ in range(3))
    kw = dict(K=K, W0=W0, W1=W1)
    if provider == "triton":
        op = lambda: lod_attention(q, k, v, mu, sigma, start, end, lod, **kw)  # noqa: E731
    elif provider == "reference":
        op = lambda: lod_attention_ref(q, k, v, mu, sigma, start, end, lod, **kw)  # noqa: E731
    elif provider == "compiled":
        mask = lod_visibility(start, end, lod, **kw)[:, None]
        op = lambda: _compiled()(q, k, v, mu, sigma, mask)  # noqa: E731
    elif provider == "sdpa":
        op = lambda: F.scaled_dot_product_attention(  # noqa: E731
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
    else:
        try:
            flex = _flex(q, k, v, start, end, lod, K, W0, W1)
        except (ImportError, RuntimeError) as e:
            pytest.skip(f"flex attention unavailable: {e}")
        op = lambda: flex(q, k, v)  # noqa: E731
    do = torch.randn(B, N, H, D, device=dev, dtype=dtype)
    if mode == "fwd":
        fn = op
    elif mode == "bwd":
        out = op()
        fn = lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: torch.autograd.grad(op(), (q, k, v), do)  # noqa: E731
    fn()  # compile / autotune outside the timer
    mult = {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode] * 4 * D * B * H
    dense = T * (T + 1) // 2
    if provider == "sdpa":
        flops, extra = mult * dense, {}
    else:
        useful = useful_pairs(T, K, W0, W1)
        extra = dict(useful_pairs=useful, useful_TFLOPs_equiv=None)
        visited = useful
        if provider == "triton":
            cfg = getattr(sys.modules["kernels.lod_attention"]._TUNED["fwd"], "best_config", None)  # None: untuned
            if cfg is not None:
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                visited = int(fwd_costs(T, K, W0, W1, bm, bn, masked=1.0, overhead=0.0).sum()) * bm * bn
                extra["tile_cfg"] = str(cfg)
        flops = mult * visited
        extra.update(visited_pairs=visited)
    benchmark.group = f"lod_attention-T{T}-H{H}-D{D}-W{W0}.{W1}-{mode}"
    info = bench_record(fn, flops=flops)
    info.update(extra, dense_pairs=dense, dense_equiv_TFLOPs=mult * dense / (info["ms_p50"] * 1e-3) / 1e12)
    if "useful_pairs" in info:
        info["useful_TFLOPs_equiv"] = mult * info["useful_pairs"] / (info["ms_p50"] * 1e-3) / 1e12
