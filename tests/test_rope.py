"""Gaussian RoPE: Triton kernel vs a float64 oracle and vs gauss_rope_ref, forward and both gradients; sigma = 0 is
standard RoPE; the origin shift keeps scores exact at 1e9; the attenuation has its closed form; bad inputs raise."""
import math

import pytest
import torch
from conftest import TorchOps, assert_close

import kernels
from kernels.rope import gauss_rope, gauss_rope_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rope_oracle(x, mu, sigma, base=10000.0, bands=None, heads=None, freqs=None):
    """Band by band in float64 complex arithmetic: (x_j + i x_{j+D/2}) * a_j * exp(i w_j mu); bands j >= `bands` at
    frequency 0 (p-RoPE), heads >= `heads` unrotated; freqs: the w_j to use (default base**(-2j/D) in float64)."""
    D = x.shape[-1]
    rot = torch.arange(x.shape[2]) < (heads if heads is not None else x.shape[2])  # (H,)
    x, mu, sigma = x.double(), mu.double()[:, :, None], sigma.double()[:, :, None]  # (B, T, 1) broadcast over heads
    mu, sigma = mu * rot, sigma * rot  # (B, T, H): position 0 is the identity
    out = []
    for j in range(D // 2):
        w = float(freqs[j]) if freqs is not None else base ** (-2.0 * j / D) if bands is None or j < bands else 0.0
        z = torch.complex(x[..., j], x[..., j + D // 2]) * torch.exp(-0.5 * (w * sigma) ** 2) * torch.exp(1j * w * mu)
        out.append(z)
    z = torch.stack(out, dim=-1)  # (B, T, H, D/2)
    return torch.cat([z.real, z.imag], dim=-1)


def wc_positions(B, T, seed=0):
    """A recency pyramid relative to the cursor (at 0): LOD2 gists (1024 tokens), then LOD1 (32), then raw tokens,
    in chronological order, each gist at its span centre with sigma = span / sqrt(12), tokens with sigma = 0."""
    g = torch.Generator().manual_seed(seed)
    lod = torch.randint(0, 3, (B, T), generator=g).sort(dim=1, descending=True).values
    span = torch.tensor([1.0, 32.0, 1024.0])[lod]  # (B, T) tokens covered by each entry
    end = span.flip(1).cumsum(1).flip(1)  # tokens from each entry's start to the cursor
    mu = -end + (span - 1) / 2
    sigma = torch.where(lod > 0, span / math.sqrt(12), 0.0)
    return mu.to(DEV), sigma.to(DEV)


CASES = [  # (B, T, Hq, Hk, D, dtype)
    pytest.param(1, 63, 3, 3, 32, torch.float32, id="B1-T63-H3-D32-fp32"),
    pytest.param(2, 127, 3, 1, 64, torch.float32, id="B2-T127-Hq3-Hk1-D64-fp32"),
    pytest.param(2, 63, 4, 2, 64, torch.float16, id="B2-T63-Hq4-Hk2-D64-fp16"),
    pytest.param(1, 127, 3, 1, 32, torch.float16, id="B1-T127-Hq3-Hk1-D32-fp16"),
    pytest.param(2, 127, 3, 3, 64, torch.bfloat16, id="B2-T127-H3-D64-bf16"),
    pytest.param(1, 63, 2, 1, 32, torch.bfloat16, id="B1-T63-Hq2-Hk1-D32-bf16"),
    pytest.param(2, 63, 3, 2, 48, torch.float32, id="B2-T63-Hq3-Hk2-D48-fp32"),  # D/2 = 24: a masked band tile
]


def run_fwd_bwd(fn, q, k, dq_out, dk_out):
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    qo, ko = fn(q, k)
    torch.autograd.backward([qo, ko], [dq_out, dk_out])
    return qo, ko, q.grad, k.grad


@pytest.mark.parametrize("B, T, Hq, Hk, D, dtype", CASES)
def test_gauss_rope_matches_refs(triton_backend, B, T, Hq, Hk, D, dtype):
    q = torch.randn(B, T, Hq, D, device=DEV, dtype=dtype)
    k = torch.randn(B, T, Hk, D, device=DEV, dtype=dtype)
    mu, sigma = wc_positions(B, T)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    tri = run_fwd_bwd(lambda q, k: gauss_rope(q, k, mu, sigma), q, k, dq_out, dk_out)
    ref = run_fwd_bwd(lambda q, k: (gauss_rope_ref(q, mu, sigma), gauss_rope_ref(k, mu, sigma)), q, k, dq_out, dk_out)
    # the oracle sees the same (rounded) inputs; its gradient is the transpose rotation, also in float64
    ora = run_fwd_bwd(lambda q, k: (rope_oracle(q, mu, sigma), rope_oracle(k, mu, sigma)),
                      q.double(), k.double(), dq_out.double(), dk_out.double())
    for name, t, r, o in zip(["q_rot", "k_rot", "dq", "dk"], tri, ref, ora):
        assert t.dtype == dtype
        assert_close(f"{name} vs ref", r, t, dtype, grad=name.startswith("d"))
        # vs the exact rotation, the fp32 angle w*mu (up to ~5e4 rad for the far gists here) carries its own rounding,
        # ~ulp(angle) times the band's attenuation: that is the op's (and the reference's) contract. Measured max-abs
        # 2.5e-5 at rms ratio 9e-7, so fp32 gets max-abs 1e-4 instead of 1e-5; the ratio stays as in the table.
        atol = 1e-4 if dtype == torch.float32 else None
        assert_close(f"{name} vs oracle", o, t, dtype, grad=name.startswith("d"), atol=atol)


def test_gauss_rope_glue(triton_backend, launches):
    """As the model calls it (q and k views of one qkv projection, mu, sigma of one row for the batch): one launch
    each way and no torch compute op around it: no copies, no contiguity fixes, no frequency table per call."""
    B, T, H, D = 2, 33, 3, 32
    qkv = torch.randn(B, T, 3, H, D, requires_grad=True)
    q, k, _ = qkv.unbind(2)
    mu, sigma = torch.arange(T).float().expand(B, T), torch.zeros(1, T).expand(B, T)
    gauss_rope(q, k, mu, sigma, bands=5, heads=2)  # caches the frequencies
    launches.clear()
    with TorchOps() as fwd:
        qr, kr = gauss_rope(q, k, mu, sigma, bands=5, heads=2)
    dqr, dkr = torch.randn_like(qr), torch.randn_like(kr)
    with TorchOps() as bwd:
        torch.autograd.grad((qr, kr), qkv, (dqr, dkr))
    assert launches == ["_gauss_rope_kernel"] * 2
    assert fwd.ops == [] and bwd.ops == ["zeros.default", "stack.default"], (fwd.ops, bwd.ops)  # unbind's backward


def test_gauss_rope_bands_and_heads(triton_backend):
    """p-RoPE (bands >= 5 at frequency 0) and position-free heads (q heads >= 2, and their kv head) inside the kernel
    against the float64 oracle, forward and both gradients."""
    B, T, H, Hk, D = 2, 45, 4, 2, 32
    q, k = torch.randn(B, T, H, D), torch.randn(B, T, Hk, D)
    mu, sigma = wc_positions(B, T)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    tri = run_fwd_bwd(lambda q, k: gauss_rope(q, k, mu, sigma, bands=5, heads=2), q, k, dq_out, dk_out)
    ora = run_fwd_bwd(lambda q, k: (rope_oracle(q, mu, sigma, bands=5, heads=2), rope_oracle(k, mu, sigma, bands=5,
                                                                                           heads=1)),
                      q.double(), k.double(), dq_out.double(), dk_out.double())
    for name, t, o in zip(["q_rot", "k_rot", "dq", "dk"], tri, ora):
        assert_close(name, o, t, grad=name.startswith("d"), atol=1e-4)  # fp32 angles: see test_gauss_rope_matches_refs
    assert torch.equal(tri[0][:, :, 2:], q[:, :, 2:]) and torch.equal(tri[1][:, :, 1:], k[:, :, 1:])


def test_gauss_rope_strided_and_partial_use(triton_backend):
    """q, k as views of a fused qkv (strided in T, no copy), and a loss that only uses q_rot."""
    B, T, H, D = 2, 63, 3, 32
    qkv = torch.randn(B, T, 3, H, D, device=DEV, requires_grad=True)
    mu, sigma = wc_positions(B, T, seed=1)
    qo, ko = gauss_rope(qkv[:, :, 0], qkv[:, :, 1], mu, sigma)
    qo.square().sum().backward()
    assert_close("q_rot", gauss_rope_ref(qkv[:, :, 0], mu, sigma), qo)
    assert_close("k_rot", gauss_rope_ref(qkv[:, :, 1], mu, sigma), ko)
    qkv2 = qkv.detach().clone().requires_grad_()
    gauss_rope_ref(qkv2[:, :, 0], mu, sigma).square().sum().backward()
    assert_close("dqkv", qkv2.grad, qkv.grad, grad=True)
    assert (qkv.grad[:, :, 1:] == 0).all()


def test_gauss_rope_learned_sigma_gets_grad(triton_backend):
    """The kernel gives mu/sigma no gradient, so sigma that requires grad is routed to the reference."""
    q, k = torch.randn(1, 8, 2, 32, device=DEV), torch.randn(1, 8, 1, 32, device=DEV)
    mu, sigma = wc_positions(1, 8)
    sigma = sigma.clone().requires_grad_()
    qo, ko = gauss_rope(q, k, mu, sigma)
    (qo.sum() + ko.sum()).backward()
    assert sigma.grad is not None and sigma.grad.abs().sum() > 0


def classic_rope(x, pos, base=10000.0):
    """Standard (GPT-NeoX / Llama half-split) RoPE: x * cos + rotate_half(x) * sin."""
    D = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D)
    angle = pos.float()[..., None] * inv_freq  # (B, T, D/2)
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)[:, :, None, :]
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1)[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def test_gauss_rope_sigma0_is_standard_rope(triton_backend):
    B, T, Hq, Hk, D = 2, 63, 3, 1, 64
    q, k = torch.randn(B, T, Hq, D, device=DEV), torch.randn(B, T, Hk, D, device=DEV)
    pos = torch.randint(-4000, 4000, (B, T), device=DEV).float()
    sigma = torch.zeros(B, T, device=DEV)
    assert torch.equal(gauss_rope_ref(q, pos, sigma), classic_rope(q, pos))  # attenuation is exactly 1.0
    qo, ko = gauss_rope(q, k, pos, sigma)
    assert_close("q_rot", classic_rope(q, pos), qo, atol=2e-6)  # only the cos/sin implementations differ
    assert_close("k_rot", classic_rope(k, pos), ko, atol=2e-6)


def scores(q, k):
    return torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gauss_rope_origin_shift(backend):
    """DESIGN §3 Precision: at absolute position 1e9 fp32 has a spacing of 64, so naive positions destroy the scores;
    positions relative to an origin at the cursor give the same scores as positions 0..T-1 (RoPE is relative)."""
    prev = kernels.backend()
    kernels.set_backend(backend)
    try:
        B, T, H, D = 1, 64, 2, 64
        q, k = torch.randn(B, T, H, D, device=DEV), torch.randn(B, T, H, D, device=DEV)
        sigma = torch.zeros(B, T, device=DEV)
        pos = 10**9 + torch.arange(T, device=DEV, dtype=torch.int64)[None]  # (1, T) int64 global positions
        s0 = scores(*gauss_rope(q, k, torch.arange(T, device=DEV).float()[None], sigma))
        s_naive = scores(*gauss_rope(q, k, pos.float(), sigma))
        origin = pos[:, -1:]  # the cursor
        s_shift = scores(*gauss_rope(q, k, (pos - origin).float(), sigma))
        err_naive = (s_naive - s0).pow(2).mean().sqrt() / s0.pow(2).mean().sqrt()
        assert err_naive > 0.1, f"naive fp32 positions at 1e9 should break the scores, rms ratio {err_naive:.2e}"
        assert_close("scores(origin-shifted) vs scores(0..T-1)", s0, s_shift, torch.bfloat16)
    finally:
        kernels.set_backend(prev)


def test_gauss_rope_precise_at_1e9(triton_backend):
    """Angles far beyond libdevice's fast path (|mu| to 1e9, so |w mu| to 1e9 rad): the kernel's sin/cos of the fp32
    angle (the op's contract, as in the reference) against float64 sin/cos of the same fp32 angle."""
    B, T, Hq, Hk, D = 1, 48, 2, 1, 64
    q, k = torch.randn(B, T, Hq, D, device=DEV), torch.randn(B, T, Hk, D, device=DEV)
    mu = (torch.rand(B, T, device=DEV) * 2 - 1) * torch.logspace(0, 9, T, device=DEV)  # |mu| from 1 to 1e9
    sigma = torch.zeros(B, T, device=DEV)
    w = kernels.rope.rope_freqs(D, 10000.0, DEV)
    ang = (mu[..., None] * w).double()[:, :, None, :]  # the fp32 angles, then exact trigonometry
    x1, x2 = q.double().chunk(2, -1)
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1)
    qo, _ = gauss_rope(q, k, mu, sigma)
    assert_close("q_rot at |mu| <= 1e9", want, qo, atol=2e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gauss_rope_float64_far_positions(backend):
    """A needle zoomed 40M tokens back: relative positions -4e7 + i, where fp32 steps by 4 (four tokens would share a
    position). float64 mu gives the exact rotation (vs the float64 oracle, forward and both gradients) and so the same
    scores as positions 0..T-1; the same positions in fp32 do not (the failure this guards against)."""
    prev = kernels.backend()
    kernels.set_backend(backend)
    try:
        B, T, Hq, Hk, D = 2, 37, 3, 1, 32
        q, k = torch.randn(B, T, Hq, D, device=DEV), torch.randn(B, T, Hk, D, device=DEV)
        far = -40_000_003.0 + torch.arange(T, device=DEV, dtype=torch.float64) - 3 * 2**20 * torch.arange(B)[:, None]
        mu, sigma = far.to(DEV), torch.zeros(B, T, device=DEV)
        dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
        got = run_fwd_bwd(lambda q, k: gauss_rope(q, k, mu, sigma), q, k, dq_out, dk_out)
        w = kernels.rope.rope_freqs(D, 10000.0)  # fp32 frequencies: at 4e7 their rounding alone moves the angle
        ora = run_fwd_bwd(lambda q, k: (rope_oracle(q, mu, sigma, freqs=w), rope_oracle(k, mu, sigma, freqs=w)),
                          q.double(), k.double(), dq_out.double(), dk_out.double())
        for name, t, o in zip(["q_rot", "k_rot", "dq", "dk"], got, ora):
            assert_close(f"{name} at mu ~ -4e7 (float64)", o, t, torch.float32, grad=name.startswith("d"), atol=1e-5)
        near = torch.arange(T, device=DEV).float().expand(B, T)
        s0 = scores(*gauss_rope(q[:, :, :1], k, near, sigma))
        assert_close("scores(float64 far) vs scores(0..T-1)", s0, scores(got[0][:, :, :1], got[1]), torch.float32)
        s32 = scores(*gauss_rope(q[:, :, :1], k, mu.float(), sigma))
        err32 = (s32 - s0).pow(2).mean().sqrt() / s0.pow(2).mean().sqrt()
        assert err32 > 0.1, f"fp32 positions at -4e7 should break the scores, rms ratio {err32:.2e}"
    finally:
        kernels.set_backend(prev)


def test_gauss_rope_attenuation_closed_form(triton_backend):
    """Per band j, unit vectors in band j at (mu_q, sigma_q) and (mu_k, sigma_k) have the logit
    exp(-0.5 w_j^2 (sigma_q^2 + sigma_k^2)) cos(w_j (mu_q - mu_k)).
    Batch row 0: a gist query against a token key; batch row 1: two gists."""
    D, base = 32, 10000.0
    eye = torch.zeros(D // 2, D, device=DEV)
    eye[torch.arange(D // 2), torch.arange(D // 2)] = 1.0  # head j = unit vector in band j
    x = eye.expand(2, 2, D // 2, D).contiguous()  # (B=2, T=2, H=D/2, D)
    mu = torch.tensor([[15.5, 40.0], [15.5, 527.5]], device=DEV)  # t=0: gist over [0, 32); t=1: token / gist
    sigma = torch.tensor([[32 / math.sqrt(12), 0.0], [32 / math.sqrt(12), 1024 / math.sqrt(12)]], device=DEV)
    qo, ko = gauss_rope(x, x, mu, sigma, base)
    logit = (qo[:, 0] * ko[:, 1]).sum(-1).double()  # (B, D/2): query at t=0 against key at t=1
    w = base ** (-2.0 * torch.arange(D // 2, dtype=torch.float64, device=DEV) / D)
    mu, sigma = mu.double(), sigma.double()
    closed = torch.exp(-0.5 * w**2 * (sigma[:, :1] ** 2 + sigma[:, 1:] ** 2)) * torch.cos(w * (mu[:, :1] - mu[:, 1:]))
    assert_close("logit", closed, logit, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.randn(2, 8, 32)), "must be \\[B, T, H, D\\]"),
    (dict(q=torch.randn(2, 8, 3, 31), k=torch.randn(2, 8, 1, 31)), "even"),
    (dict(mu=torch.zeros(2, 7)), "mu"),
    (dict(sigma=torch.zeros(8)), "sigma"),
    (dict(k=torch.randn(2, 9, 1, 32)), "equal B, T, D"),
    (dict(q=torch.randint(0, 5, (2, 8, 3, 32))), "floating point"),
    (dict(mu=torch.zeros(2, 8, dtype=torch.int64)), "floating point"),
])
def test_gauss_rope_bad_inputs(triton_backend, bad, match):
    args = dict(q=torch.randn(2, 8, 3, 32), k=torch.randn(2, 8, 1, 32), mu=torch.zeros(2, 8), sigma=torch.zeros(2, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        gauss_rope(**args)


# GPU tier: real shapes, bf16, autotuned configs, and a tensor with more than 2**31 elements.
@pytest.mark.gpu
@pytest.mark.parametrize("B, T, Hq, Hk, D, dtype", [
    pytest.param(4, 4096, 32, 8, 128, torch.bfloat16, id="B4-T4096-Hq32-Hk8-D128-bf16"),
    pytest.param(1, 8192, 12, 12, 64, torch.bfloat16, id="B1-T8192-H12-D64-bf16"),
    pytest.param(2, 8000, 16, 4, 64, torch.float16, id="B2-T8000-Hq16-Hk4-D64-fp16"),
    pytest.param(1, 8191, 6, 2, 128, torch.float32, id="B1-T8191-Hq6-Hk2-D128-fp32"),
])
def test_gauss_rope_gpu(triton_backend, B, T, Hq, Hk, D, dtype):
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype)
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype)
    mu, sigma = wc_positions(B, T)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    tri = run_fwd_bwd(lambda q, k: gauss_rope(q, k, mu, sigma), q, k, dq_out, dk_out)
    ref = run_fwd_bwd(lambda q, k: (gauss_rope_ref(q, mu, sigma), gauss_rope_ref(k, mu, sigma)), q, k, dq_out, dk_out)
    for name, t, r in zip(["q_rot", "k_rot", "dq", "dk"], tri, ref):
        assert_close(name, r, t, dtype, grad=name.startswith("d"))


@pytest.mark.gpu
def test_gauss_rope_gpu_int64_offsets(triton_backend):
    """q has > 2**31 elements: the last rows are only reached with int64 offsets. Rows are independent, so the
    reference is checked on the tail alone (the full fp32 reference would need ~20 GB)."""
    B, T, Hq, Hk, D = 1, 65536 + 8, 256, 1, 128
    assert B * T * Hq * D > 2**31
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mu = torch.arange(T, device="cuda", dtype=torch.float32)[None] - T
    sigma = torch.full((B, T), 3.0, device="cuda")
    qo, ko = gauss_rope(q, k, mu, sigma)
    dq_out, dk_out = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward([qo, ko], [dq_out, dk_out])
    tail = slice(T - 16, T)
    q_t = q.detach()[:, tail].clone().requires_grad_()
    ref = gauss_rope_ref(q_t, mu[:, tail], sigma[:, tail])
    ref.backward(dq_out[:, tail])
    assert_close("q_rot tail", ref, qo[:, tail], torch.bfloat16)
    assert_close("dq tail", q_t.grad, q.grad[:, tail], torch.bfloat16, grad=True)
    assert_close("k_rot tail", gauss_rope_ref(k.detach()[:, tail], mu[:, tail], sigma[:, tail]), ko[:, tail],
                 torch.bfloat16)


def test_reference_frequencies_are_cached_and_usable_with_autograd_after_inference_mode():
    """gauss_rope_ref builds its frequencies once per (D, base, bands, device): a first call under inference mode
    still leaves a tensor that a later call with gradients to mu can save for backward."""
    kernels.rope._FREQS.pop((16, 777.0, 0, "cpu"), None)
    x, mu, sigma = torch.randn(1, 5, 2, 16), torch.arange(5.0)[None], torch.zeros(1, 5)
    with torch.inference_mode():
        kernels.rope.gauss_rope_ref(x, mu, sigma, 777.0)
    assert (16, 777.0, 0, "cpu") in kernels.rope._FREQS
    mu = mu.clone().requires_grad_()
    kernels.rope.gauss_rope_ref(x, mu, sigma, 777.0).sum().backward()
    assert mu.grad is not None and torch.isfinite(mu.grad).all()
