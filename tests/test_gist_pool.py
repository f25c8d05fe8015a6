"""Gist pooling: Triton kernels vs a loopy float64 oracle and vs gist_pool_ref, forward and the gradients of x and of
the query; groups never mix; a ragged tail and bad K raise."""
import math

import pytest
import torch
from conftest import TorchOps, assert_close

from kernels.gist_pool import gist_pool, gist_pool_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def gist_pool_oracle(x, query, K):
    """One group and head at a time, in float64."""
    B, T, H, D = x.shape
    x, query = x.double(), query.double()
    out = []
    for b in range(B):
        for g in range(T // K):
            for h in range(H):
                rows = x[b, g * K:(g + 1) * K, h]  # (K, D)
                p = torch.softmax(rows @ query[h] / math.sqrt(D), dim=0)  # (K,)
                out.append(p @ rows)
    return torch.stack(out).view(B, T // K, H, D)


def run_fwd_bwd(fn, x, query, dout):
    x = x.detach().clone().requires_grad_()
    query = query.detach().clone().requires_grad_()
    out = fn(x, query)
    out.backward(dout)
    return out, x.grad, query.grad


CASES = [  # (B, T, H, D, K, x dtype, query dtype); T = G * K with G not a power of two
    pytest.param(2, 120, 3, 32, 8, torch.float32, torch.float32, id="B2-T120-H3-D32-K8-fp32"),
    pytest.param(1, 48, 3, 64, 16, torch.float32, torch.float32, id="B1-T48-H3-D64-K16-fp32"),
    pytest.param(2, 96, 3, 64, 32, torch.float32, torch.float32, id="B2-T96-H3-D64-K32-fp32"),
    pytest.param(1, 192, 3, 32, 64, torch.float32, torch.float32, id="B1-T192-H3-D32-K64-fp32"),
    pytest.param(1, 40, 3, 48, 8, torch.float32, torch.float32, id="B1-T40-H3-D48-K8-fp32"),  # D not a power of 2
    pytest.param(2, 112, 1, 64, 16, torch.float16, torch.float32, id="B2-T112-H1-D64-K16-fp16"),
    pytest.param(1, 96, 3, 32, 32, torch.float16, torch.float16, id="B1-T96-H3-D32-K32-fp16"),
    pytest.param(2, 192, 1, 64, 64, torch.float16, torch.float32, id="B2-T192-H1-D64-K64-fp16"),
    pytest.param(1, 56, 3, 64, 8, torch.bfloat16, torch.float32, id="B1-T56-H3-D64-K8-bf16"),
    pytest.param(2, 96, 3, 32, 32, torch.bfloat16, torch.bfloat16, id="B2-T96-H3-D32-K32-bf16"),
    pytest.param(1, 5, 3, 32, 1, torch.float32, torch.float32, id="B1-T5-H3-D32-K1-fp32"),  # K=1: out = x
]


@pytest.mark.parametrize("B, T, H, D, K, dtype, qdtype", CASES)
def test_gist_pool_matches_refs(triton_backend, B, T, H, D, K, dtype, qdtype):
    x = torch.randn(B, T, H, D, device=DEV, dtype=dtype)
    query = (2 * torch.randn(H, D, device=DEV)).to(qdtype)  # x2: peaked softmaxes, not near-uniform ones
    dout = torch.randn(B, T // K, H, D, device=DEV, dtype=dtype)
    tri = run_fwd_bwd(lambda x, q: gist_pool(x, q, K), x, query, dout)
    ref = run_fwd_bwd(lambda x, q: gist_pool_ref(x, q, K), x, query, dout)
    ora = run_fwd_bwd(lambda x, q: gist_pool_oracle(x, q, K), x.double(), query.double(), dout.double())
    for name, t, r, o, want in zip(["out", "dx", "dquery"], tri, ref, ora, [dtype, dtype, qdtype]):
        assert t.dtype == want, f"{name}: {t.dtype} != {want}"
        # dquery is a reduction over B*T rows: the table's gradient row, in the input dtype of x
        assert_close(f"{name} vs ref", r, t, dtype, grad=name != "out")
        assert_close(f"{name} vs oracle", o, t, dtype, grad=name != "out")


def test_gist_pool_glue(triton_backend, launches):
    """One launch each way; around them only the zeroed dquery accumulator (its atomics need it)."""
    x, query = torch.randn(2, 64, 3, 32, requires_grad=True), torch.randn(3, 32, requires_grad=True)
    with TorchOps() as fwd:
        out = gist_pool(x, query, 8)
    dout = torch.randn_like(out)
    with TorchOps() as bwd:
        torch.autograd.grad(out, (x, query), dout)
    assert launches == ["_gist_pool_fwd_kernel", "_gist_pool_bwd_kernel"]
    assert fwd.ops == [] and bwd.ops == ["zeros.default"], (fwd.ops, bwd.ops)


def test_gist_pool_groups_do_not_mix(triton_backend):
    B, T, H, D, K = 1, 48, 3, 32, 16
    x, query = torch.randn(B, T, H, D, device=DEV), torch.randn(H, D, device=DEV)
    out = gist_pool(x, query, K)
    x2 = x.clone()
    x2[:, K:2 * K] = 1e4  # only group 1 changes
    out2 = gist_pool(x2, query, K)
    assert torch.equal(out[:, 0], out2[:, 0]) and torch.equal(out[:, 2], out2[:, 2])
    assert not torch.equal(out[:, 1], out2[:, 1])


@pytest.mark.parametrize("T, K", [(63, 8), (127, 32), (100, 64)])
def test_gist_pool_ragged_tail_raises(T, K):
    with pytest.raises(ValueError, match="never pools a partial block"):
        gist_pool(torch.randn(1, T, 2, 32), torch.randn(2, 32), K)


@pytest.mark.parametrize("bad, match", [
    (dict(K=12), "power of two"),
    (dict(K=128), "power of two"),
    (dict(K=0), "power of two"),
    (dict(x=torch.randn(64, 2, 32)), "\\[B, T, H, D\\]"),
    (dict(query=torch.randn(3, 32)), "query"),
    (dict(x=torch.randint(0, 3, (1, 64, 2, 32))), "floating point"),
])
def test_gist_pool_bad_inputs(bad, match):
    args = dict(x=torch.randn(1, 64, 2, 32), query=torch.randn(2, 32), K=16)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        gist_pool(**args)


# GPU tier: real shapes, bf16, autotuned configs, and an x with more than 2**31 elements.
@pytest.mark.gpu
@pytest.mark.parametrize("B, T, H, D, K, dtype", [
    pytest.param(4, 8192, 12, 64, 32, torch.bfloat16, id="B4-T8192-H12-D64-K32-bf16"),
    pytest.param(2, 8192, 8, 128, 64, torch.bfloat16, id="B2-T8192-H8-D128-K64-bf16"),
    pytest.param(2, 4096, 16, 64, 8, torch.float16, id="B2-T4096-H16-D64-K8-fp16"),
    pytest.param(1, 8160, 6, 128, 32, torch.float32, id="B1-T8160-H6-D128-K32-fp32"),
])
def test_gist_pool_gpu(triton_backend, B, T, H, D, K, dtype):
    x = torch.randn(B, T, H, D, device="cuda", dtype=dtype)
    query = torch.randn(H, D, device="cuda")
    dout = torch.randn(B, T // K, H, D, device="cuda", dtype=dtype)
    tri = run_fwd_bwd(lambda x, q: gist_pool(x, q, K), x, query, dout)
    ref = run_fwd_bwd(lambda x, q: gist_pool_ref(x, q, K), x, query, dout)
    for name, t, r in zip(["out", "dx", "dquery"], tri, ref):
        # dquery sums B*T rows (|dquery| in the tens): an absolute bf16 bound means nothing there, the ratio does
        assert_close(name, r, t, dtype, grad=name != "out", ratio=1e-3 if name == "dquery" else None)


@pytest.mark.gpu
def test_gist_pool_gpu_int64_offsets(triton_backend):
    """x has > 2**31 elements. Groups are independent, so out and dx are checked on the tail groups; dquery against the
    reference accumulated over chunks of rows (the full fp32 reference would need ~30 GB)."""
    B, H, D, K = 1, 16, 128, 32
    T = 2**31 // (H * D) + 2 * K
    x = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    query = torch.randn(H, D, device="cuda", requires_grad=True)
    out = gist_pool(x, query, K)
    dout = torch.randn_like(out)
    out.backward(dout)
    tail = slice(T - 4 * K, T)
    x_t = x.detach()[:, tail].clone().requires_grad_()
    ref = gist_pool_ref(x_t, query.detach(), K)
    ref.backward(dout[:, -4:])
    assert_close("out tail", ref, out[:, -4:], torch.bfloat16)
    assert_close("dx tail", x_t.grad, x.grad[:, tail], torch.bfloat16, grad=True)
    dq_ref = torch.zeros(H, D, device="cuda", dtype=torch.float64)
    chunk = 2**16  # rows, a multiple of K
    for s in range(0, T, chunk):
        q_c = query.detach().clone().requires_grad_()
        gist_pool_ref(x.detach()[:, s:s + chunk], q_c, K).backward(dout[:, s // K:(s + chunk) // K])
        dq_ref += q_c.grad.double()
    assert_close("dquery", dq_ref, query.grad, torch.bfloat16, grad=True, ratio=1e-3)  # a 1M-row sum: relative
