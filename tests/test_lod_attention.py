"""Pyramidal attention: a loopy token-centric oracle for the mask, kernel vs a float64 dense reference (output and
dq, dk, dv under a random upstream gradient), focus lists, layouts, bad inputs. Kernel cases are interpreter-sized."""
import math
import sys

import pytest
import torch

from conftest import TorchOps, assert_close
from kernels.lod_attention import lod_attention, lod_attention_ref, lod_visibility

SIGMA_SCALE = 1 / math.sqrt(12)


def training_layout(T, K, n1=None, n2=None):
    """All T tokens, then LOD1 gists, then LOD2 gists (complete spans only by default)."""
    n1 = T // K if n1 is None else n1
    n2 = T // (K * K) if n2 is None else n2
    start = torch.cat([torch.arange(T), torch.arange(n1) * K, torch.arange(n2) * K * K])
    lod = torch.cat([torch.zeros(T), torch.ones(n1), torch.full((n2,), 2.0)]).long()
    return start, start + K ** lod, lod


def positions(start, end, lod, B):
    """DESIGN §3: mu = span centre (p for tokens), sigma = sigma_scale * span for gists, 0 for tokens."""
    mu = ((start + end - 1) / 2).float()
    sigma = torch.where(lod > 0, (end - start).float() * SIGMA_SCALE, 0.0)
    return mu[None].expand(B, -1).contiguous(), sigma[None].expand(B, -1).contiguous()


def brute_mask(start, end, lod, K, W0, W1, focus=None, focus_block=128):
    """Token-centric oracle (one batch row, python loops): each past token t < c gets the level its band assigns
    (focus turns a listed gist's tokens back to LOD0); a key is visible iff it is that assigned node, or the query."""
    s, e, l = start.tolist(), end.tolist(), lod.tolist()
    N = len(s)
    vis = torch.zeros(N, N, dtype=torch.bool)
    for i in range(N):
        if W0 is None:
            vis[i, : i + 1] = True
            continue
        c = s[i]
        b0 = max(0, math.floor((c - W0) / K) * K)
        b1 = 0 if W1 is None else max(0, math.floor((b0 - W1 * K) / K**2) * K**2)
        listed = set()
        if focus is not None and l[i] == 0:
            listed = {tuple(n) for n in focus[c // focus_block].tolist() if n[0] > 0}

        def node(t):  # the node that shows token t to query i
            L = 0 if t >= b0 else (1 if t >= b1 else 2)
            if L and (L, t // K**L) in listed:
                L = 0
            return L, t // K**L

        for j in range(N):
            vis[i, j] = j == i or (e[j] <= c and node(s[j]) == (l[j], s[j] // K ** l[j]))
    return vis


def coverage_ok(vis, start, end):
    """Every query's visible keys (itself excluded) cover [0, cursor) exactly once."""
    for i in range(len(start)):
        cnt = torch.zeros(int(end.max()) + 1, dtype=torch.long)
        for j in vis[i].nonzero()[:, 0].tolist():
            if j != i:
                cnt[start[j]:end[j]] += 1
        c = int(start[i])
        if not (bool((cnt[:c] == 1).all()) and bool((cnt[c:] == 0).all())):
            return False
    return True


def random_focus(T, K, focus_block, F, B=None, gen=None):
    """Random (lod, index) lists with padding and a duplicate, [NQB, F, 2] (or [B, NQB, F, 2])."""
    shape = (B,) if B else ()
    nqb = -(-T // focus_block)
    fl = torch.randint(1, 3, shape + (nqb, F), generator=gen)
    n = torch.where(fl == 1, max(T // K, 1), max(T // K**2, 1))
    fi = (torch.rand(shape + (nqb, F), generator=gen) * n).long()
    fl = torch.where(fi * K**fl + K**fl > T, -1, fl)  # nodes that do not exist become padding
    fl[..., -1] = -1  # explicit padding
    f = torch.stack([fl, fi], -1)
    f[..., 1, :] = f[..., 0, :]  # a duplicate
    return f


# ---------------------------------------------------------------------------------------------------------- mask
@pytest.mark.parametrize("T,K,W0,W1", [(63, 4, 8, 2), (64, 4, 0, 0), (127, 4, 13, 3), (100, 8, 8, 1),
                                       (130, 8, 0, None), (31, 4, 1000, 5), (80, 4, 5, 0)])
def test_lod_attention_mask_tiles(T, K, W0, W1):
    start, end, lod = training_layout(T, K)
    vis = brute_mask(start, end, lod, K, W0, W1)
    assert coverage_ok(vis, start, end)
    assert torch.equal(lod_visibility(start, end, lod, K=K, W0=W0, W1=W1)[0], vis)
    perm = torch.randperm(len(start))  # the reference takes any entry order
    vp = lod_visibility(start[perm], end[perm], lod[perm], K=K, W0=W0, W1=W1)[0]
    assert torch.equal(vp, vis[perm][:, perm])


@pytest.mark.parametrize("T,K,W0,W1,fb", [(127, 4, 8, 2, 32), (100, 4, 4, 1, 16), (128, 8, 8, 0, 32)])
def test_lod_attention_mask_focus(T, K, W0, W1, fb):
    start, end, lod = training_layout(T, K)
    focus = random_focus(T, K, fb, 5)
    vis = brute_mask(start, end, lod, K, W0, W1, focus, fb)
    assert coverage_ok(vis, start, end)
    assert not torch.equal(vis, brute_mask(start, end, lod, K, W0, W1))  # the lists changed something
    assert torch.equal(lod_visibility(start, end, lod, K=K, W0=W0, W1=W1, focus=focus, focus_block=fb)[0], vis)


def test_lod_attention_mask_errors():
    start, end, lod = training_layout(64, 4)
    with pytest.raises(ValueError, match="does not tile"):  # LOD2 gists missing
        lod_visibility(*training_layout(64, 4, n2=0), K=4, W0=4, W1=1)
    with pytest.raises(ValueError, match="duplicate"):
        lod_visibility(torch.cat([start, start[-1:]]), torch.cat([end, end[-1:]]), torch.cat([lod, lod[-1:]]),
                       K=4, W0=4, W1=1)
    bad = end.clone()
    bad[70] += 1
    with pytest.raises(ValueError, match="aligned"):
        lod_visibility(start, bad, lod, K=4, W0=4, W1=1)


# ---------------------------------------------------------------------------------------------------------- kernel
def dense_ref(q, k, v, mu, sigma, vis, base=10000.0):
    """float64 Gaussian RoPE + masked dense softmax. q: [B, N, H, D], k, v: [B, N, Hk, D], vis: [B, N, N]."""
    D = q.shape[-1]
    w = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rope(x):
        ang = mu.double()[..., None, None] * w
        att = torch.exp(-0.5 * (sigma.double()[..., None, None] * w) ** 2)
        x1, x2 = x.double().chunk(2, -1)
        c, s = torch.cos(ang) * att, torch.sin(ang) * att
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)

    g = q.shape[2] // k.shape[2]
    kr, vr = rope(k).repeat_interleave(g, 2), v.double().repeat_interleave(g, 2)
    s = torch.einsum("bihd,bjhd->bhij", rope(q), kr) / math.sqrt(D)
    p = torch.softmax(s.masked_fill(~vis[:, None], float("-inf")), -1)
    return torch.einsum("bhij,bjhd->bihd", p, vr)


def run_case(B, T, H, Hk, D, K, W0, W1, dtype, focus=None, fb=128, layout=None, check_grads=True):
    if layout is None:
        start, end, lod = training_layout(T, K)
    else:
        start, end, lod = layout
    N = len(start)
    mu, sigma = positions(start, end, lod, B)
    q = torch.randn(B, N, H, D).to(dtype).requires_grad_()
    k = torch.randn(B, N, Hk, D).to(dtype).requires_grad_()
    v = torch.randn(B, N, Hk, D).to(dtype).requires_grad_()
    out = lod_attention(q, k, v, mu, sigma, start, end, lod, K=K, W0=W0, W1=W1, focus=focus, focus_block=fb)
    assert out.dtype == dtype and out.shape == q.shape
    if focus is not None and focus.dim() == 4:
        vis = torch.stack([brute_mask(start, end, lod, K, W0, W1, focus[b], fb) for b in range(B)])
    else:
        vis = brute_mask(start, end, lod, K, W0, W1, focus, fb)[None].expand(B, N, N)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_ref(q64, k64, v64, mu, sigma, vis)
    assert_close("o", ref, out, dtype)
    if not check_grads:
        return
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    refs = torch.autograd.grad(ref, (q64, k64, v64), do)
    for name, r, g in zip(("dq", "dk", "dv"), refs, grads):
        assert g.dtype == dtype
        assert_close(name, r, g, dtype, grad=True)


CASES = [  # B, T, H, Hk, D, K, W0, W1, dtype
    pytest.param(1, 63, 2, 2, 32, 4, 8, 2, torch.float32, id="B1-T63-H2-D32-K4-W8.2-fp32"),
    pytest.param(2, 127, 1, 1, 64, 4, 13, 3, torch.float32, id="B2-T127-H1-D64-K4-W13.3-fp32"),
    pytest.param(1, 127, 3, 1, 32, 4, 4, 1, torch.float16, id="B1-T127-H3-Hk1-D32-K4-W4.1-fp16"),
    pytest.param(1, 128, 2, 1, 64, 8, 0, 0, torch.float16, id="B1-T128-H2-Hk1-D64-K8-W0.0-fp16"),
    pytest.param(2, 100, 1, 1, 32, 8, 8, None, torch.bfloat16, id="B2-T100-H1-D32-K8-W8.inf-bf16"),
    pytest.param(1, 96, 3, 3, 32, 4, 1000, 0, torch.float32, id="B1-T96-H3-D32-K4-all-tokens-fp32"),
]


@pytest.mark.parametrize("B,T,H,Hk,D,K,W0,W1,dtype", CASES)
def test_lod_attention_pyramid(triton_backend, B, T, H, Hk, D, K, W0, W1, dtype):
    run_case(B, T, H, Hk, D, K, W0, W1, dtype)


def test_lod_attention_interior_tiles(triton_backend, monkeypatch):
    """16-wide tiles and bands wider than two tiles, so every level also runs its unmasked interior stage."""
    mod = sys.modules["kernels.lod_attention"]  # the package re-exports a function of the same name
    monkeypatch.setattr(mod, "DEFAULT_CFG", dict(BLOCK_M=16, BLOCK_N=16, num_warps=4))
    run_case(1, 256, 1, 1, 32, 2, 48, 40, torch.float32)


@pytest.mark.parametrize("focus", [False, True])
def test_lod_attention_chunked_dkdv(triton_backend, monkeypatch, focus):
    """Gist key tiles split over several dk/dv programs (the balance for long T) meet in fp32 atomics; with focus
    lists too, whose token-key contributions come from the dq pass."""
    mod = sys.modules["kernels.lod_attention"]
    monkeypatch.setattr(mod, "_CHUNK_TOKENS", 8)
    T, K, W0, W1 = 63, 4, 4, 1
    assert mod._chunks(mod._Meta(T, T // K, T // K**2, K, W0, W1, 32, 1.0, False)) == (1, 2, 7)
    run_case(1, T, 1, 1, 32, K, W0, W1, torch.float32, focus=random_focus(T, K, 32, 3) if focus else None, fb=32)


@pytest.mark.parametrize("dense", [True, False], ids=["sdpa", "kernels"])
def test_lod_attention_short_is_causal_sdpa(triton_backend, monkeypatch, dense):
    """T <= W0 + K: every token sees its whole past, so the short-sequence path (causal SDPA over the tokens, masked
    SDPA for the gists' rows) computes the same attention as the kernels; both against the float64 oracle, GQA and
    focus lists (which then change nothing) included."""
    monkeypatch.setattr(sys.modules["kernels.lod_attention"], "SHORT_DENSE", dense)
    T, K = 61, 4
    run_case(1, T, 3, 1, 32, K, 60, 2, torch.float32, focus=random_focus(T, K, 32, 3), fb=32)


def test_lod_attention_glue(triton_backend, launches):
    """A call costs its kernels and nothing else: with layout_tensors' metadata, forward and backward dispatch no
    torch compute op (only allocations and views; the frequencies and a dummy pointer are cached by the first call)
    and launch two kernels each (RoPE pre-pass + forward; dq + dk/dv). The call before issue 22 ran ~14."""
    from kernels.pyramid import layout_tensors
    T, K = 96, 4
    start, end, lod = layout_tensors(T, K, "cpu")
    N = len(start)
    mu, sigma = positions(start, end, lod, 2)
    q, k, v = (torch.randn(2, N, 2, 32, requires_grad=True) for _ in range(3))
    do = torch.randn(2, N, 2, 32)
    torch.autograd.grad(lod_attention(q, k, v, mu, sigma, start, end, lod, K=K, W0=8, W1=2), (q, k, v), do)  # caches
    launches.clear()
    with TorchOps() as fwd:
        o = lod_attention(q, k, v, mu, sigma, start, end, lod, K=K, W0=8, W1=2)
    assert launches == ["_gauss_rope_kernel", "_lod_attn_fwd_kernel"]
    with TorchOps() as bwd:
        torch.autograd.grad(o, (q, k, v), do)
    assert fwd.ops == [] and bwd.ops == [], (fwd.ops, bwd.ops)
    assert launches[2:] == ["_lod_attn_fwd_kernel", "_lod_attn_dkdv_kernel"]


def test_lod_attention_far_positions(triton_backend):
    """Entries 1e9 tokens from the origin (a long session's far gists): the kernel's rotation of those fp32 positions
    matches the reference's, so attention over them does too."""
    T, K, B = 63, 4, 1
    start, end, lod = training_layout(T, K)
    mu, sigma = positions(start, end, lod, B)
    mu = mu - torch.where(lod > 0, 1e9, 0.0)  # gists far in the past, tokens near the origin
    q, k, v = (torch.randn(B, len(start), 2, 32) for _ in range(3))
    kw = dict(K=K, W0=8, W1=2)
    assert_close("o", lod_attention_ref(q, k, v, mu, sigma, start, end, lod, **kw),
                 lod_attention(q, k, v, mu, sigma, start, end, lod, **kw))


def test_lod_attention_layout_checked_on_device():
    """The sync-free check (metadata on a GPU): T from the entry count, the layout asserted asynchronously."""
    from kernels.pyramid import training_layout as layout
    for T, K in ((127, 4), (4096, 32), (100, 8)):
        s, e, l = training_layout(T, K)
        assert layout(s, e, l, 2, len(s), K, 8, 2, asynchronous=True) == (T, T // K, T // K**2)
    s, e, l = training_layout(127, 4)
    with pytest.raises(RuntimeError):  # _assert_async raises at once on the CPU, as a device assert on a GPU
        layout(s.flip(0), e.flip(0), l.flip(0), 1, len(s), 4, 8, 2, asynchronous=True)


def test_lod_attention_tuning_is_length_free():
    """Autotune keys hold a power-of-two bucket of N, and lengths are not specialized: any context length reuses the
    tuned, compiled kernels."""
    mod = sys.modules["kernels.lod_attention"]
    for tuned in mod._TUNED.values():
        assert "NB" in tuned.keys and not {"N", "T", "N1", "N2", "W0", "W1"} & set(tuned.keys)
    assert {"N", "T", "N1", "N2", "W0", "W1", "NB"} <= set(mod._NOSPEC)  # triton.jit(do_not_specialize=...)


def wc_layout(kinds, K):
    """A chronological working context from level codes: entries tile [0, T) in order."""
    start, lod, p = [], [], 0
    for L in kinds:
        p = -(-p // K**L) * K**L if L else p
        start.append(p)
        lod.append(L)
        p += K**L
    start, lod = torch.tensor(start), torch.tensor(lod)
    return start, start + K**lod, lod


@pytest.mark.parametrize("kinds,dtype", [
    pytest.param([0] * 63, torch.float32, id="all-tokens-N63-fp32"),
    pytest.param([1] * 40, torch.float16, id="all-gists-N40-fp16"),
    pytest.param([2, 1, 0, 1, 0] * 13, torch.float32, id="alternating-N65-fp32"),
    pytest.param([2, 2] + [1] * 3 + [0] * 20 + [1], torch.float16, id="gists-at-edges-N26-fp16"),
])
def test_lod_attention_causal_wc(triton_backend, kinds, dtype):
    """W0=None: plain causal attention over a working context, Gaussian RoPE from the entries' spans."""
    run_case(2, None, 3, 3, 32, 4, None, None, dtype, layout=wc_layout(kinds, 4))


@pytest.mark.parametrize("B,T,H,K,W0,W1,fb,per_batch,dtype", [
    pytest.param(1, 127, 2, 4, 8, 2, 32, False, torch.float32, id="B1-T127-K4-fb32-fp32"),
    pytest.param(2, 100, 1, 4, 4, 1, 32, True, torch.float16, id="B2-T100-K4-fb32-perbatch-fp16"),
])
def test_lod_attention_focus(triton_backend, B, T, H, K, W0, W1, fb, per_batch, dtype):
    focus = random_focus(T, K, fb, 4, B=B if per_batch else None)
    run_case(B, T, H, 1, 32, K, W0, W1, dtype, focus=focus, fb=fb)


def test_lod_attention_focus_perbatch_ref():
    """Per-batch focus lists through the reference (the CPU fallback)."""
    B, T, K, fb = 2, 100, 4, 32
    focus = random_focus(T, K, fb, 4, B=B)
    run_case(B, T, 2, 1, 32, K, 4, 1, torch.float32, focus=focus, fb=fb)


def test_lod_attention_ref_matches_dense():
    """The SDPA reference (fallback) against the float64 oracle, with a shuffled entry order."""
    start, end, lod = training_layout(90, 4)
    perm = torch.randperm(len(start))
    run_case(2, None, 2, 1, 16, 4, 6, 1, torch.float32, layout=(start[perm], end[perm], lod[perm]))


def test_lod_attention_errors(triton_backend):
    start, end, lod = training_layout(64, 4)
    N = len(start)
    mu, sigma = positions(start, end, lod, 1)
    q = torch.randn(1, N, 2, 32)
    kw = dict(K=4, W0=8, W1=1)
    with pytest.raises(ValueError, match="multiple of Hk"):
        lod_attention(q, q[:, :, :1].repeat(1, 1, 3, 1), q[:, :, :1].repeat(1, 1, 3, 1), mu, sigma, start, end, lod,
                      **kw)
    with pytest.raises(ValueError, match="one float dtype"):
        lod_attention(q, q.half(), q, mu, sigma, start, end, lod, **kw)
    with pytest.raises(ValueError, match="power of two"):
        lod_attention(q, q, q, mu, sigma, start, end, lod, K=6, W0=8, W1=1)
    with pytest.raises(ValueError, match="D must be a power of two"):
        lod_attention(q[..., :24], q[..., :24], q[..., :24], mu, sigma, start, end, lod, **kw)
    with pytest.raises(ValueError, match="mu must be"):
        lod_attention(q, q, q, mu[:, :-1], sigma, start, end, lod, **kw)
    perm = torch.randperm(N)
    with pytest.raises(ValueError, match="training layout"):
        lod_attention(q, q, q, mu, sigma, start[perm], end[perm], lod[perm], **kw)
    s2, e2, l2 = training_layout(64, 4, n2=0)
    with pytest.raises(ValueError, match="lacks nodes"):
        lod_attention(q[:, :len(s2)], q[:, :len(s2)], q[:, :len(s2)], mu[:, :len(s2)], sigma[:, :len(s2)],
                      s2, e2, l2, **kw)
    with pytest.raises(ValueError, match="existing gists"):
        lod_attention(q, q, q, mu, sigma, start, end, lod, focus=torch.tensor([[[1, 99]]] * 2), focus_block=32, **kw)
    with pytest.raises(ValueError, match="query blocks"):
        lod_attention(q, q, q, mu, sigma, start, end, lod, focus=torch.tensor([[[1, 0]]]), focus_block=32, **kw)
    with pytest.raises(ValueError, match="W0 needs"):
        lod_attention(q, q, q, mu, sigma, K=4, W0=8)


# ---------------------------------------------------------------------------------------------------------- GPU tier
@pytest.mark.gpu
@pytest.mark.parametrize("T,H,Hk,D,K,W0,W1,dtype", [
    (8192, 8, 8, 64, 32, 1024, 4, torch.bfloat16),
    (8192, 8, 2, 128, 32, 512, 2, torch.bfloat16),
    (4096, 4, 4, 64, 16, 256, 4, torch.float16),
    (2048, 2, 2, 64, 32, 256, 1, torch.float32),
    (8192, 4, 4, 128, 32, None, 0, torch.bfloat16),
])
def test_lod_attention_gpu(triton_backend, T, H, Hk, D, K, W0, W1, dtype):
    """Real shapes against the SDPA reference (fp32 compute) on the GPU; all grads."""
    dev = "cuda"
    start, end, lod = (x.to(dev) for x in training_layout(T, K))
    N = len(start)
    mu, sigma = positions(start, end, lod, 1)
    q = torch.randn(1, N, H, D, device=dev).to(dtype).requires_grad_()
    k = torch.randn(1, N, Hk, D, device=dev).to(dtype).requires_grad_()
    v = torch.randn(1, N, Hk, D, device=dev).to(dtype).requires_grad_()
    kw = dict(K=K, W0=W0, W1=W1)
    out = lod_attention(q, k, v, mu, sigma, start, end, lod, **kw)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = lod_attention_ref(q32, k32, v32, mu, sigma, start, end, lod, **kw)
    assert_close("o", ref, out, dtype)
    do = torch.randn_like(ref)
    for name, r, g in zip(("dq", "dk", "dv"), torch.autograd.grad(ref, (q32, k32, v32), do),
                          torch.autograd.grad(out, (q, k, v), do.to(dtype))):
        assert_close(name, r, g, dtype, grad=True)


@pytest.mark.gpu
def test_lod_attention_gpu_focus(triton_backend):
    dev, T, K = "cuda", 4096, 32
    start, end, lod = (x.to(dev) for x in training_layout(T, K))
    N = len(start)
    mu, sigma = positions(start, end, lod, 2)
    focus = random_focus(T, K, 128, 8, B=2).to(dev)
    q, k, v = (torch.randn(2, N, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    kw = dict(K=K, W0=256, W1=2, focus=focus, focus_block=128)
    out = lod_attention(q, k, v, mu, sigma, start, end, lod, **kw)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = lod_attention_ref(q32, k32, v32, mu, sigma, start, end, lod, **kw)
    assert_close("o", ref, out, torch.bfloat16)
    do = torch.randn_like(ref)
    for name, r, g in zip(("dq", "dk", "dv"), torch.autograd.grad(ref, (q32, k32, v32), do),
                          torch.autograd.grad(out, (q, k, v), do.bfloat16())):
        assert_close(name, r, g, torch.bfloat16, grad=True)


@pytest.mark.gpu
def test_lod_attention_gpu_no_host_sync(triton_backend):
    """The training path (metadata on the GPU in make_gists' layout) never waits for the device, forward and backward,
    and the forward replays from a CUDA graph."""
    dev, T, K = "cuda", 4096, 32
    start, end, lod = (x.to(dev) for x in training_layout(T, K))
    N = len(start)
    mu, sigma = positions(start, end, lod, 1)
    q, k, v = (torch.randn(1, N, 4, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    kw = dict(K=K, W0=256, W1=4)
    out = lod_attention(q, k, v, mu, sigma, start, end, lod, **kw)
    ref = torch.autograd.grad(out, (q, k, v), do)  # autotunes and compiles (those sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = torch.autograd.grad(lod_attention(q, k, v, mu, sigma, start, end, lod, **kw), (q, k, v), do)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for name, r, g in zip(("dq", "dk", "dv"), ref, grads):
        assert_close(name, r.float(), g, torch.bfloat16, grad=True)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_g = lod_attention(qd, kd, vd, mu, sigma, start, end, lod, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert_close("o (graph)", out.detach().float(), out_g, torch.bfloat16)
