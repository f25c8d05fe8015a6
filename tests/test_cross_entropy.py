"""Fused linear cross-entropy (kernels/cross_entropy.py) against F.cross_entropy on float64 logits: loss and the
gradients of h and W, with ignored rows, weights, a ragged last chunk, bf16 autocast, and under torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from kernels.cross_entropy import linear_cross_entropy


def reference(h, W, y, w=None):
    z = h.double() @ W.double().T
    nll = F.cross_entropy(z, y.clamp_min(0), reduction="none") * (y >= 0)
    wt = (y >= 0).double() if w is None else w.double() * (y >= 0)
    return (nll * wt).sum() / wt.sum()


@pytest.mark.parametrize("M,C,V,chunk,weighted", [(37, 16, 50, 8, False), (64, 24, 33, None, True),
                                                  (5, 8, 1000, 2, True), (40, 16, 7, 64, False)])
def test_linear_cross_entropy_matches_reference(M, C, V, chunk, weighted):
    h = torch.randn(M, C, requires_grad=True)
    W = (torch.randn(V, C) * 0.3).requires_grad_()
    y = torch.randint(0, V, (M,))
    y[::5] = -1  # ignored rows
    w = torch.rand(M) if weighted else None
    loss = linear_cross_entropy(h, W, y, w, chunk=chunk)
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = reference(h64, W64, y, w)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close("loss", ref, loss)
    g = torch.randn(())  # a random upstream scalar
    for name, a, b in zip(("dh", "dW"), torch.autograd.grad(loss, (h, W), g), torch.autograd.grad(ref, (h64, W64), g)):
        assert a.dtype == torch.float32
        assert_close(name, b, a, grad=True)


def test_linear_cross_entropy_bf16_autocast():
    """Under bf16 autocast the head's matmuls run in bf16 (as the unfused head would), losses in fp32."""
    M, C, V = 48, 32, 300
    h, W = torch.randn(M, C, requires_grad=True), (torch.randn(V, C) * 0.2).requires_grad_()
    y = torch.randint(0, V, (M,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, y, chunk=16)
        unfused = F.cross_entropy((h @ W.T).float(), y)
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    ref = reference(h64, W64, y)
    assert_close("loss", ref, loss, torch.bfloat16)
    assert abs(loss.item() - unfused.item()) < 2e-2
    for name, a, b in zip(("dh", "dW"), torch.autograd.grad(loss, (h, W)), torch.autograd.grad(ref, (h64, W64))):
        assert_close(name, b, a, torch.bfloat16, grad=True, atol=5e-3)


def test_linear_cross_entropy_no_grad_and_compile():
    M, C, V = 30, 16, 40
    h, W, y = torch.randn(M, C), torch.randn(V, C), torch.randint(-1, V, (M,))
    with torch.no_grad():
        assert_close("no_grad", reference(h, W, y), linear_cross_entropy(h, W, y, chunk=7))
    h.requires_grad_()
    compiled = torch.compile(lambda h: linear_cross_entropy(h, W, y, chunk=7), fullgraph=True, backend="aot_eager")
    loss = compiled(h)
    (dh,) = torch.autograd.grad(loss, h)
    h64 = h.detach().double().requires_grad_()
    ref = reference(h64, W, y)
    assert_close("loss (compiled)", ref, loss)
    assert_close("dh (compiled)", torch.autograd.grad(ref, h64)[0], dh, grad=True)
