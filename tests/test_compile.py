"""torch.compile over the model: whole graphs (fullgraph, no breaks) with either kernel backend, outputs and every
gradient equal to eager; the Triton kernels enter graphs as the custom ops megacontext::* (opaque to dynamo, so it
never traces into an autotuner), whose schemas, fake tensors and autograd registrations torch.library.opcheck tests.

CPU: the `aot_eager` compile backend (dynamo + AOTAutograd on fake tensors, as inductor consumes them; inductor's C++
compile takes minutes here: the `slow` test); Triton kernels run interpreted at tiny shapes. GPU: a few training
steps with compile = True (the crash issue 22 reported: dynamo traced the RoPE autotuner's config list)."""
import json
import os
import sys

import pytest
import torch

from conftest import GPU, ROOT
import kernels
from kernels.pyramid import layout_tensors
from model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def _poison_empty():
    """conftest's NaN-poisoning replaces torch.empty with Python lambdas, which dynamo would trace as part of the
    model; the kernel tests poison, these tests compare against eager."""
    yield


@pytest.fixture
def backend(request):
    previous = kernels.backend()
    kernels.set_backend(request.param)
    torch._dynamo.reset()  # the backend is a guard, but fresh graphs keep each case independent
    yield request.param
    kernels.set_backend(previous)
    torch._dynamo.reset()


def loss_and_grads(model, *args, **kwargs):
    model.zero_grad()
    _, loss = model(*args, **kwargs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,layers,positions", [
    pytest.param("torch", 2, {"rope_bands": 5, "rope_heads": 1}, id="torch-p-rope"),
    pytest.param("triton", 1, {}, id="triton")], indirect=["backend"])
def test_compile_model_fullgraph(backend, layers, positions):
    """Loss and grads of torch.compile(model, fullgraph=True) equal eager's (fullgraph raises on any graph break;
    dynamo's explain says the same)."""
    m = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=layers, n_head=2, n_embd=64, **positions)).train()
    idx = torch.randint(0, 97, (2, 37))
    kw = dict(mu=torch.arange(37).double() * 1.5, sigma=torch.rand(2, 37))
    eager = loss_and_grads(m, idx, idx.roll(-1, 1), **kw)
    if backend == "triton":
        explained = torch._dynamo.explain(m)(idx, idx.roll(-1, 1), **kw)
        assert explained.graph_break_count == 0, explained.break_reasons
    compiled = loss_and_grads(torch.compile(m, fullgraph=True, backend="aot_eager"), idx, idx.roll(-1, 1), **kw)
    assert_same(eager, compiled)


def test_compile_pyramid_fullgraph(triton_backend):
    """The one-pass gist training forward (tokens, then LOD1 and LOD2 gists, pyramid metadata) compiles whole, with
    the pyramid kernels as custom ops."""
    torch._dynamo.reset()
    T, K = 40, 4
    start, end, lod = layout_tensors(T, K, "cpu")
    N = len(start)
    m = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=64, attn="lod")).train()
    emb = torch.randn(1, N, 64)
    mu = ((start + end - 1) / 2).double()
    sigma = torch.where(lod > 0, (end - start).float() / 12 ** 0.5, 0.0)[None]
    pyr = dict(start=start, end=end, lod=lod, K=K, W0=8, W1=2)
    tgt = torch.randint(0, 97, (1, N))
    eager = loss_and_grads(m, targets=tgt, embeds=emb, mu=mu, sigma=sigma, pyramid=pyr)
    compiled = loss_and_grads(torch.compile(m, fullgraph=True, backend="aot_eager"), targets=tgt, embeds=emb, mu=mu,
                              sigma=sigma, pyramid=pyr)
    assert_same(eager, compiled)


def test_compile_custom_ops_opcheck(triton_backend):
    """Schema, fake tensor (shapes, dtypes), autograd registration and AOT dispatch of every custom op."""
    q, k = torch.randn(1, 9, 3, 32, requires_grad=True), torch.randn(1, 9, 1, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.megacontext.gauss_rope, (q, k, torch.randn(1, 9), torch.rand(1, 9), 1e4, 5, 0))
    x, query = torch.randn(1, 16, 2, 32, requires_grad=True), torch.randn(2, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.megacontext.gist_pool, (x, query, 8))
    T, K = 20, 4
    start, end, lod = layout_tensors(T, K, "cpu")
    N = len(start)
    q, k, v = (torch.randn(1, N, 1, 32, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.megacontext.lod_attention,
                          (q, k, v, torch.randn(1, N), torch.rand(1, N), start, end, lod, None, K, 4, 1, 128,
                           32 ** -0.5, 1e4, 0, 0))


@pytest.mark.slow
def test_compile_model_inductor():
    """The default compile backend (inductor, C++ on the CPU) with the torch kernels: minutes on 2 cores."""
    previous = kernels.backend()
    kernels.set_backend("torch")
    try:
        m = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=64)).train()
        idx = torch.randint(0, 97, (2, 40))
        eager = loss_and_grads(m, idx, idx.roll(-1, 1))
        assert_same(eager, loss_and_grads(torch.compile(m, fullgraph=True), idx, idx.roll(-1, 1)))
    finally:
        kernels.set_backend(previous)


@pytest.mark.gpu
def test_compile_train_steps_gpu(tmp_path):
    """compile = True trains on the GPU (Triton kernels, bf16): a few steps, evals included, finite falling loss."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import train_throughput
    assert GPU
    r = train_throughput.main(["configs/tiny.py", "--random-tokens", "--vocab=512", "--steps=30", "--log-every=10",
                               "--compile=True", f"--out={tmp_path}", "--tag=gpu_test"])
    assert r["tokens_per_s"] > 0 and r["model"]["compile"] is True
    (log,) = tmp_path.glob("train_tiny_gpu_test.json")
    assert json.loads(log.read_text())["mfu"] is not None
