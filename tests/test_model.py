"""model.py: causality, positions (sigma = 0 is RoPE, relative invariance at 10**9), KV cache, gradients, backends."""
import pytest
import torch

import kernels
from model import GPT, GPTConfig, sample_next


def tiny(**kw):
    cfg = dict(vocab_size=97, block_size=64, n_layer=2, n_head=3, n_embd=48)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def classic_rope(x, pos, base=10000.0):
    """Textbook half-split RoPE with float64 angles, written independently of kernels/rope.py."""
    D = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[..., None] * inv  # (B, T, D/2)
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x.double().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def test_model_sigma_zero_is_standard_rope():
    q, k = torch.randn(2, 33, 3, 16), torch.randn(2, 33, 3, 16)
    pos = torch.arange(33).repeat(2, 1).float()
    zero = torch.zeros_like(pos)
    qr, kr = kernels.gauss_rope_ref(q, pos, zero), kernels.gauss_rope_ref(k, pos, zero)
    torch.testing.assert_close(qr.double(), classic_rope(q, pos), atol=2e-5, rtol=0)
    torch.testing.assert_close(kr.double(), classic_rope(k, pos), atol=2e-5, rtol=0)
    # a positive sigma must change the result (the damping is really applied)
    assert not torch.allclose(kernels.gauss_rope_ref(q, pos, torch.ones_like(pos)), qr)


def test_model_causality():
    m = tiny()
    idx = torch.randint(0, 97, (2, 40))
    logits, _ = m(idx)
    idx2 = idx.clone()
    idx2[:, 25:] = torch.randint(0, 97, (2, 15))
    logits2, _ = m(idx2)
    assert torch.equal(logits[:, :25], logits2[:, :25])
    assert not torch.allclose(logits[:, 25:], logits2[:, 25:])


def test_model_relative_invariance_at_1e9():
    """Shifting every position by 10**9 leaves logits unchanged within bf16 tolerance (origin-relative positions)."""
    m = tiny()
    idx = torch.randint(0, 97, (2, 50))
    mu = torch.arange(50).repeat(2, 1)
    ref, _ = m(idx, mu=mu)
    out, _ = m(idx, mu=mu + 10**9)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1.6e-2)
    # fractional (span-centre) positions, sigma > 0 and a different shift per row behave the same way
    mu_f = mu.double() + torch.tensor([[0.5], [0.25]], dtype=torch.float64)
    sigma = torch.rand(2, 50) * 4
    ref, _ = m(idx, mu=mu_f, sigma=sigma)
    out, _ = m(idx, mu=mu_f + torch.tensor([[3e9], [7e9]], dtype=torch.float64), sigma=sigma)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=1.6e-2)


def test_model_far_span_keeps_its_token_spacing():
    """A working context that reaches 40M tokens back (a zoomed needle, then the present): the far span's logits equal
    those of the same tokens read alone at 0..n-1, in one forward and through a KV cache whose origin sits in the
    present. With fp32 relative positions the far tokens would share positions in fours and these logits would
    differ."""
    m = tiny(n_head=2, n_embd=64)  # head dim 32: the fastest bands turn by ~1 rad per token, so spacing matters
    idx = torch.randint(0, 97, (1, 40))
    far = torch.cat([torch.arange(24) - 40_000_000, torch.arange(16) + 100]).double()  # needle, then the present
    ref, _ = m(idx[:, :24], mu=torch.arange(24))
    full, _ = m(idx, mu=far)
    torch.testing.assert_close(full[:, :24], ref, atol=2e-4, rtol=1e-4)
    cache = m.make_cache(1, 64)
    first, _ = m(idx[:, :30], mu=far[:30], cache=cache)  # origin: the 6th present token; the needle at -4e7 from it
    rest, _ = m(idx[:, 30:], mu=far[30:], cache=cache)
    torch.testing.assert_close(first[:, :24], ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(rest, full[:, 30:], atol=2e-4, rtol=1e-4)
    lost, _ = m(idx, mu=far.float())  # fp32 positions: -40,000,000 + i rounds to multiples of 4 relative to the tail
    assert not torch.allclose(lost[:, :24], ref, atol=1e-2)


def test_model_gaussian_sigma_changes_only_damped_entries():
    m = tiny()
    idx = torch.randint(0, 97, (1, 30))
    sigma = torch.zeros(1, 30)
    base, _ = m(idx, sigma=sigma)
    sigma[0, 10] = 8.0  # entry 10 is a coarse gist: only logits at positions >= 10 may change
    out, _ = m(idx, sigma=sigma)
    assert torch.equal(out[:, :10], base[:, :10])
    assert not torch.allclose(out[:, 10:], base[:, 10:])


@pytest.mark.parametrize("chunks", [[40], [25, 6, 1, 1, 7], [1] * 40], ids=["prefill", "mixed", "token-by-token"])
def test_model_kv_cache_equals_full_forward(chunks):
    m = tiny(rope_heads=2, rope_layers=1)  # with a position-free head and block too
    idx = torch.randint(0, 97, (2, 40))
    full, _ = m(idx)
    cache, outs, t = m.make_cache(2, 64), [], 0
    for n in chunks:
        out, _ = m(idx[:, t:t + n], cache=cache)
        outs.append(out)
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    # truncate = forget the tail: re-decoding it gives the same logits (the KV-reuse rule of DESIGN §7)
    cache.truncate(30)
    out, _ = m(idx[:, 30:], cache=cache)
    torch.testing.assert_close(out, full[:, 30:], atol=1e-5, rtol=1e-5)


def test_model_embeds_equal_ids_and_every_param_gets_grad():
    m = tiny(tie_embeddings=False, mlp="gelu").train()
    idx = torch.randint(0, 97, (2, 20))
    a, _ = m(idx)
    b, _ = m(embeds=m.wte(idx))
    torch.testing.assert_close(a, b)
    _, loss = m(idx, idx.roll(-1, 1))
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_model_loss_reduction_and_ignore_index():
    m = tiny()
    idx = torch.randint(0, 97, (2, 20))
    tgt = idx.roll(-1, 1)
    tgt[:, -1] = -1
    _, mean = m(idx, tgt)
    _, per = m(idx, tgt, reduction="none")
    assert per.shape == (2, 20) and per[:, -1].eq(0).all()
    torch.testing.assert_close(per.sum() / 38, mean)


def test_model_counts():
    m = tiny()
    n = sum(p.numel() for p in m.parameters())
    assert m.num_params(non_embedding=False) == n and m.num_params() == n - 97 * 48
    assert m.flops_per_token() > 6 * m.num_params()


def test_model_sampling_filters():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert draws == {1}


def test_model_generate_streams_with_cache():
    m = tiny()
    idx = torch.randint(0, 97, (1, 10))
    out = torch.stack(list(m.generate(idx, 12, temperature=0)), 1)
    ref = idx  # greedy decoding without a cache: full forward every step
    for _ in range(12):
        logits, _ = m(ref)
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref[:, 10:])


def test_model_kernels_on_equals_off():
    """The backend never changes model semantics: loss and grads agree with Triton (interpreted on CPU) and torch."""
    m = tiny().train()
    idx = torch.randint(0, 97, (2, 37))
    mu = torch.arange(37).double() + torch.tensor([[0.0], [10.0**9]], dtype=torch.float64)
    sigma = torch.rand(2, 37) * 3
    previous = kernels.backend()
    results = []
    try:
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            m.zero_grad()
            _, loss = m(idx, idx.roll(-1, 1), mu=mu, sigma=sigma)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    finally:
        kernels.set_backend(previous)
    (loss_t, grads_t), (loss_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_t, atol=1e-5, rtol=1e-5)
    for g_k, g_t in zip(grads_k, grads_t):
        torch.testing.assert_close(g_k, g_t, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_model_bf16_autocast_matches_fp32_on_gpu():
    m = tiny(n_layer=4, n_head=4, n_embd=256, block_size=512).cuda()
    idx = torch.randint(0, 97, (4, 512), device="cuda")
    ref, _ = m(idx)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = m(idx)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)


def test_model_position_free_heads_and_blocks():
    """rope_heads rotates the first heads only; blocks from rope_layers on rotate none (NoPE)."""
    m = tiny(n_head=3, rope_heads=1, rope_layers=1)
    q, k = torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)
    mu, sigma = torch.rand(2, 9) * 100, torch.rand(2, 9)
    q0, k0 = m.blocks[0].attn.rotate(q, k, mu, sigma)
    torch.testing.assert_close(q0[:, :, :1], kernels.gauss_rope_ref(q[:, :, :1], mu, sigma))
    torch.testing.assert_close(k0[:, :, :1], kernels.gauss_rope_ref(k[:, :, :1], mu, sigma))
    assert torch.equal(q0[:, :, 1:], q[:, :, 1:]) and torch.equal(k0[:, :, 1:], k[:, :, 1:])
    q1, k1 = m.blocks[1].attn.rotate(q, k, mu, sigma)
    assert torch.equal(q1, q) and torch.equal(k1, k)


def gauss_rope64(x, mu, sigma, w):
    """Gaussian RoPE in float64 with an explicit band-frequency vector w (D/2,), written independently."""
    ang, damp = mu.double()[..., None] * w, torch.exp(-0.5 * (sigma.double()[..., None] * w) ** 2)
    cos, sin = (ang.cos() * damp)[:, :, None], (ang.sin() * damp)[:, :, None]
    x1, x2 = x.double().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def test_model_rope_bands_rotate_only_the_fastest_bands():
    """p-RoPE: rope_bands = R keeps the R fastest bands at base**(-2j/hs) and gives the others frequency 0 (no
    rotation, no damping), in the RoPE heads only; a far key then matches a query through those bands unchanged."""
    m = tiny(n_embd=48, n_head=3, rope_heads=2, rope_bands=3)  # head dim 16: 8 bands, 3 rotate
    q, k = torch.randn(2, 11, 3, 16), torch.randn(2, 11, 3, 16)
    mu, sigma = torch.rand(2, 11) * 3000, torch.rand(2, 11) * 4
    w = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    w[3:] = 0
    q0, k0 = m.blocks[0].attn.rotate(q, k, mu, sigma)
    torch.testing.assert_close(q0[:, :, :2].double(), gauss_rope64(q[:, :, :2], mu, sigma, w), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(k0[:, :, :2].double(), gauss_rope64(k[:, :, :2], mu, sigma, w), atol=2e-4, rtol=1e-4)
    assert torch.equal(q0[:, :, 2], q[:, :, 2]) and torch.equal(k0[:, :, 2], k[:, :, 2])
    still = torch.cat([torch.arange(3, 8), torch.arange(11, 16)])  # the frequency-0 dims pass unchanged
    assert torch.equal(q0[..., still], q[..., still])
    assert not torch.allclose(q0[:, :, :2, :3], q[:, :, :2, :3])  # and the fast bands really rotate


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("positions", [{}, {"rope_heads": 1, "rope_layers": 1}, {"rope_bands": 5}],
                         ids=["rope", "nope-heads-and-block", "p-rope"])
def test_model_lod_attention_path_equals_sdpa(backend, positions):
    """attn='lod' (pyramidal kernel with W0 = inf, RoPE fused) computes the same model as RoPE kernel + SDPA, also
    with position-free heads and blocks (rotated before the kernel, whose fused rotation is then the identity)."""
    m = tiny(n_embd=64, n_head=2, **positions).train()  # head dim 32: the Triton kernel needs a power of two >= 32
    idx = torch.randint(0, 97, (1, 45))
    mu, sigma = torch.arange(45).double() * 1.5, torch.rand(1, 45) * 2
    previous = kernels.backend()
    try:
        kernels.set_backend(backend)
        losses, grads = [], []
        for attn in ("sdpa", "lod"):
            for block in m.blocks:
                block.attn.attn = attn
            m.zero_grad()
            _, loss = m(idx, idx.roll(-1, 1), mu=mu, sigma=sigma)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in m.parameters()])
    finally:
        kernels.set_backend(previous)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_model_adamw_fused_on_cuda():
    """configure_optimizers asks for the fused AdamW on CUDA (one kernel for all parameters), the foreach one elsewhere;
    decay only on matrices. The fused path also exists for CPU tensors, so the choice is checked here."""
    m = tiny()
    cuda = GPT.configure_optimizers(m, 0.1, 1e-3, (0.9, 0.95), "cuda")
    cpu = GPT.configure_optimizers(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    assert cuda.defaults["fused"] is True and not cpu.defaults.get("fused")
    assert [g["weight_decay"] for g in cuda.param_groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in cuda.param_groups[0]["params"])
    assert all(p.dim() < 2 for p in cuda.param_groups[1]["params"])


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_loss_plain_on_the_cpu_equals_the_fused_one(monkeypatch, weighted):
    """Eager on the CPU the mean loss comes from the plain head (bit-reproducible CPU runs); the fused chunked form
    (CUDA, or under torch.compile) gives the same loss and gradients, with ignored targets and loss weights."""
    m = tiny()
    x, y = torch.randint(0, 64, (2, 24)), torch.randint(0, 64, (2, 24))
    y[0, :5] = -1
    w = torch.where(y >= 0, torch.rand(2, 24) * 5, torch.zeros(())) if weighted else None
    logits, _ = m(x)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), y.flatten(), ignore_index=-1,
                                            reduction="none").view(2, 24)
    ref = (nll * w).sum() / w.sum() if weighted else nll.sum() / (y >= 0).sum()

    def loss_and_grads():
        m.zero_grad()
        _, loss = m(x, y, weights=w)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]
    plain, g_plain = loss_and_grads()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the fused path, as under compile
    fused, g_fused = loss_and_grads()
    assert abs(plain.double() - ref) < 1e-5 and abs(fused.double() - ref) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_plain, g_fused))
