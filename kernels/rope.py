"""Gaussian-attenuated RoPE (DESIGN §3, §8.1).

Each entry has a position mean mu and spread sigma (token units). Band j, with frequency w_j = base**(-2j/D), of
x = [x1 | x2] (half-split pairs x[j], x[j + D/2]) is rotated by w_j * mu and scaled by a_j = exp(-0.5 (w_j sigma)^2):

    out1 = a_j (x1 cos(w_j mu) - x2 sin(w_j mu))        out2 = a_j (x1 sin(w_j mu) + x2 cos(w_j mu))

a_j is E[exp(i w_j p)] for p ~ N(mu, sigma^2), so a query/key pair carries exp(-0.5 w^2 (sigma_q^2 + sigma_k^2)) per
band. sigma = 0 gives a_j = 1 exactly: standard RoPE.

Layouts: x: [B, T, H, D] (D even), mu, sigma: [B, T] fp32. Callers keep mu small (relative to a session origin) so
fp32 angles stay precise; see model.py.
"""
import torch

from kernels._util import check


def rope_freqs(D: int, base: float, device=None) -> torch.Tensor:
    """w_j = base**(-2j/D), j < D/2, fp32."""
    return base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)


def gauss_rope_ref(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Reference and CPU fallback. x: [B, T, H, D]; mu, sigma: [B, T]. Computes in fp32, returns x.dtype."""
    D = x.shape[-1]
    w = rope_freqs(D, base, x.device)  # (D/2,)
    angle = mu.float()[..., None] * w  # (B, T, D/2)
    atten = torch.exp(-0.5 * (sigma.float()[..., None] * w) ** 2)
    cos = (torch.cos(angle) * atten)[:, :, None, :]  # (B, T, 1, D/2)
    sin = (torch.sin(angle) * atten)[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def gauss_rope(q: torch.Tensor, k: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, base: float = 10000.0):
    """Rotate and attenuate q and k together.

    q: [B, T, Hq, D], k: [B, T, Hk, D] (Hq may differ from Hk), mu, sigma: [B, T] float. Returns (q_rot, k_rot).
    """
    check(q.dim() == 4 and k.dim() == 4 and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1],
          f"gauss_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, T, H, D] with equal B, T, D")
    check(q.shape[-1] % 2 == 0, f"gauss_rope: head dim must be even, got {q.shape[-1]}")
    check(mu.shape == q.shape[:2] and sigma.shape == q.shape[:2],
          f"gauss_rope: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} must be [B, T] = {tuple(q.shape[:2])}")
    return gauss_rope_ref(q, mu, sigma, base), gauss_rope_ref(k, mu, sigma, base)
