"""Fused linear cross-entropy: the output head and the loss over the vocabulary in chunks of rows, without the full
[rows, V] logits (Liger-Kernel's FusedLinearCrossEntropy, written with torch ops so that torch.compile fuses inside).

For rows i with targets y_i >= 0 and weights w_i (default 1), with logits z_i = h_i W^T:

    loss = sum_i w_i (logsumexp(z_i) - z_i[y_i]) / sum_i w_i
    dL/dz_i = w_i (softmax(z_i) - onehot(y_i)) / sum_i w_i        dh_i = dL/dz_i W        dW = sum_i dL/dz_i^T h_i

The forward computes the loss and both gradients chunk by chunk (the logits of one chunk live at a time, fp32 only
inside the chunk), and the backward scales the saved gradients by the upstream scalar: the head's three matmuls are
done once, as in the unfused path, and the [rows, V] fp32 logits, their log-softmax and its gradient (3 passes over
4 bytes x rows x V each) never exist. Matmuls run in the autocast dtype when autocast is on (bf16 in training), else
in h's dtype; dW accumulates in fp32. h: [M, C], W: [V, C], y: [M] int (-1 ignored), w: [M] float or None.
"""
import torch


def _compute_dtype(h):
    t = h.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else h.dtype


def _chunk_rows(M, V, C):
    """Rows per chunk: about as many logits as the head has weights (V * C), a power of two (Liger's choice)."""
    rows = max(1, -(-M // max(1, -(-V // C))))
    return min(M, 1 << (rows - 1).bit_length())


class LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, y, w, chunk):
        M, V = h.shape[0], W.shape[0]
        dt = _compute_dtype(h)
        valid = y >= 0
        weight = valid.float() if w is None else w.float() * valid
        scale = weight / weight.sum().clamp_min(1e-30)  # (M,) each row's share of the mean
        grad_h, grad_w = ctx.needs_input_grad[:2]
        hc, Wc = h.to(dt), W.to(dt)
        dh = torch.empty_like(h) if grad_h else None
        dW = torch.zeros(W.shape, device=W.device, dtype=torch.float32) if grad_w else None
        loss = torch.zeros((), device=h.device, dtype=torch.float32)
        for a in range(0, M, chunk):
            z = (hc[a:a + chunk] @ Wc.T).float()  # (m, V) logits of this chunk only
            yc = y[a:a + chunk].clamp_min(0)[:, None]
            lse = torch.logsumexp(z, -1)
            s = scale[a:a + chunk]
            loss = loss + ((lse - z.gather(1, yc)[:, 0]) * s).sum()
            if grad_h or grad_w:
                g = torch.exp(z - lse[:, None])  # softmax
                g = g.scatter_add(1, yc, -valid[a:a + chunk, None].float())  # - onehot (ignored rows: nothing)
                g = (g * s[:, None]).to(dt)
                if grad_h:
                    dh[a:a + chunk] = (g @ Wc).to(h.dtype)
                if grad_w:
                    dW += (g.T @ hc[a:a + chunk]).float()
        ctx.save_for_backward(dh, dW)
        ctx.w_dtype = W.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dW = ctx.saved_tensors
        return (None if dh is None else dh * dloss.to(dh.dtype), None if dW is None else (dW * dloss).to(ctx.w_dtype),
                None, None, None)


def linear_cross_entropy(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean (weighted by w) cross-entropy of the logits h @ W^T against y, rows with y < 0 ignored; a 0-dim fp32
    tensor. h: [..., C]; W: [V, C]; y, w: h's leading shape. chunk: rows per chunk (default: about V * C logits)."""
    C, V = h.shape[-1], W.shape[0]
    h2, y2 = h.reshape(-1, C), y.reshape(-1)
    w2 = None if w is None else w.reshape(-1)
    return LinearCrossEntropyFn.apply(h2, W, y2, w2, chunk or _chunk_rows(h2.shape[0], V, C))
