"""Gaussian-attenuated RoPE (DESIGN §3, §8.1).

Each entry has a position mean mu and spread sigma (token units). Band j, with frequency w_j = base**(-2j/D), of
x = [x1 | x2] (half-split pairs x[j], x[j + D/2]) is rotated by w_j * mu and scaled by a_j = exp(-0.5 (w_j sigma)^2):

    out1 = a_j (x1 cos(w_j mu) - x2 sin(w_j mu))        out2 = a_j (x1 sin(w_j mu) + x2 cos(w_j mu))

a_j is E[exp(i w_j p)] for p ~ N(mu, sigma^2), so a query/key pair carries exp(-0.5 w^2 (sigma_q^2 + sigma_k^2)) per
band. sigma = 0 gives a_j = 1 exactly: standard RoPE.

Backward is the transpose of a scaled rotation: the same kernel with the angle negated (BACKWARD=True),
dx1 = a (g1 cos + g2 sin), dx2 = a (g2 cos - g1 sin). mu and sigma get no gradient from the kernel (positions are data);
`gauss_rope` routes to the reference whenever mu or sigma requires grad (the `gaussian_learned` ablation), so that
case still trains.

p-RoPE and position-free heads (model.py's rope_bands, rope_heads): bands j >= `bands` get frequency 0 and heads
h >= `heads` are not rotated (both 0: all), inside the same kernel, so no gather or concatenation copies.

Layouts: x: [B, T, H, D] (D even, last dim contiguous), mu, sigma: [B, T] float (a batch stride of 0 is read as is).
Callers keep mu small (relative to a session origin near the cursor) so fp32 angles stay precise: fp32 has a spacing
of 64 at 1e9, so absolute positions that large would collapse; see tests/test_rope.py::test_gauss_rope_origin_shift.
fp32 holds every integer only below 2**24, though: a span zoomed to tokens 40M back sits at mu ~ -4e7, where fp32
steps by 4, and four neighbouring tokens would share one position. So mu may come in float64: the angles w_j * mu are
then formed in float64 (reference and kernel alike) and only sin, cos and the rotation run in fp32; fp32 mu keeps the
fp32 product bit for bit (model.py passes float64 only for a working context that reaches past 2**24).

Kernel: one program per ROWS (b, t) rows. The angles and the attenuation (D/2 cos, sin, exp per row) are computed
once (sin and cos to ~1 ulp up to |angle| ~ 3e9, see _sincos) and shared by every head of q and k; the heads are
streamed in [ROWS, BLOCK_H, D/2] steps of at most _HEAD_ELEMS elements per row, so the tile (and the registers) stay
bounded at any head count. The autotuner's configs are pruned by shape to 8..16 elements per thread. The frequencies
come in as a D/2 fp32 vector from `rope_freqs`, bit-identical to the reference's; there are no [T, D/2] cos/sin tables.
`_rotate_rows` is the same rotation of a [rows, D] register tile, for the attention kernels' query tiles.

Eager calls go through GaussRopeFn (the least host work per call); under torch.compile the same launchers run as the
custom ops megacontext::gauss_rope / gauss_rope_bwd (opaque to dynamo: no tracing into the autotuner).
"""
import torch

from kernels._util import check, launch, tl, triton, use_triton


def rope_freqs(D: int, base: float, device=None, bands: int = 0) -> torch.Tensor:
    """w_j = base**(-2j/D) for j < bands (0: all D/2 bands), 0 beyond (p-RoPE's position-free bands); fp32."""
    w = base ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    return w if bands in (0, D // 2) else torch.where(torch.arange(D // 2, device=device) < bands, w, 0.0)


_FREQS = {}  # (D, base, bands, device) -> rope_freqs: built once, not 4 small kernels per call


def cached_freqs(D: int, base: float, bands: int, device) -> torch.Tensor:
    key = (D, float(base), bands, str(device))
    if key not in _FREQS:
        with torch.inference_mode(False):  # a normal tensor even when first asked for under inference mode
            _FREQS[key] = rope_freqs(D, base, device, bands)
    return _FREQS[key]


def gauss_rope_ref(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, base: float = 10000.0, bands: int = 0,
                   heads: int = 0) -> torch.Tensor:
    """Reference and CPU fallback. x: [B, T, H, D]; mu, sigma: [B, T]; bands, heads: rotated bands and heads (0:
    all). Computes in fp32, returns x.dtype."""
    D, H = x.shape[-1], x.shape[2]
    if mu.dim() == 2 and mu.stride(0) == 0 and sigma.stride(0) == 0:  # one row of positions for every batch entry
        mu, sigma = mu[:1], sigma[:1]  # (GistNet's local positions): angles once, broadcast over B
    w = cached_freqs(D, base, bands, x.device)  # (D/2,): built once per shape and device (4 small ops a call)
    if mu.dtype == torch.float64:  # far positions: the angle in float64, its sin and cos rounded to fp32
        angle = mu[..., None] * w.double()
        cos_a, sin_a = torch.cos(angle).float(), torch.sin(angle).float()
    else:
        angle = mu.float()[..., None] * w  # (B, T, D/2)
        cos_a, sin_a = torch.cos(angle), torch.sin(angle)
    atten = torch.exp(-0.5 * (sigma.float()[..., None] * w) ** 2)
    cos = (cos_a * atten)[:, :, None, :]  # (B, T, 1, D/2)
    sin = (sin_a * atten)[:, :, None, :]
    if 0 < heads < H:  # position-free heads: cos 1, sin 0
        rot = (torch.arange(H, device=x.device) < heads)[:, None]  # (H, 1)
        cos, sin = torch.where(rot, cos, 1.0), torch.where(rot, sin, 0.0)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


@triton.jit
def _sincos(x):
    """sin, cos (fp32) of fp32 or float64 angles to ~1 ulp for |x| < 3e9 (positions to 1e9 and beyond), with no
    local memory: the quadrant reduction runs in float64 (x minus j * pi/2, pi/2 split in two 22-bit parts and a rest,
    so the products are exact for |j| < 2**31), then Cephes' minimax polynomials on [-pi/4, pi/4]. libdevice's
    sinf/cosf would take a Payne-Hanek path with a local array above 1e5 rad, which ptxas compiles (and spills around)
    in every config."""
    xd = x.to(tl.float64)
    j = tl.floor(xd * 0.6366197723675814 + 0.5)  # nearest multiple of pi/2
    r = xd - j * tl.full([], 1.5707964897155762, tl.float64)  # exact (Sterbenz): hi has 22 bits, |j| < 2**31
    r = (r - j * tl.full([], -1.6292068494294654e-07, tl.float64) - j * tl.full([], 5.390302858158119e-15, tl.float64))
    r = r.to(tl.float32)
    q = (j - 4.0 * tl.floor(j * 0.25)).to(tl.int32)  # quadrant, 0..3
    r2 = r * r
    s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 - r2 * 1.9515295891e-4))
    c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return sin, cos


@triton.jit
def _rotate_rows(x, mu, sigma, FREQ, ADJOINT: tl.constexpr):
    """Gaussian RoPE of a [R, D] register tile whose rows sit at mu with spread sigma ([R] fp32; D a power of two);
    ADJOINT: the transpose (angle negated). The halves are split and rejoined in registers: once per tile."""
    R: tl.constexpr = x.shape[0]
    D: tl.constexpr = x.shape[1]
    x1, x2 = tl.split(tl.permute(tl.reshape(x, [R, 2, D // 2]), (0, 2, 1)))
    w = tl.load(FREQ + tl.arange(0, D // 2))
    ws = sigma[:, None] * w[None, :]
    atten = tl.where(ws == 0.0, 1.0, tl.exp(-0.5 * ws * ws))
    sin, cos = _sincos(mu[:, None] * w[None, :])
    cos = cos * atten
    sin = sin * atten
    if ADJOINT:
        sin = -sin
    return tl.reshape(tl.permute(tl.join(x1 * cos - x2 * sin, x1 * sin + x2 * cos), (0, 2, 1)), [R, D])


@triton.jit
def _rotate_heads(X, XO, rows, row_ok, b, t, j, cos, sin,
                  sxb, sxt, sxh,  # input strides of b, t, h in elements (the D stride is 1)
                  RH,  # heads h < RH rotate; the others are copied (position-free heads)
                  H: tl.constexpr,  # heads of this tensor (Hq or Hk; 0: no tensor)
                  D: tl.constexpr,  # head dim; pairs are (j, j + D/2)
                  BLOCK_H: tl.constexpr,  # heads per step of the head loop (a power of two)
                  BLOCK_D2: tl.constexpr):  # next power of two >= D/2
    src_row = (b * sxb + t * sxt)[:, None, None]  # (ROWS, 1, 1) int64
    dst_row = (rows * (H * D))[:, None, None]  # the output is contiguous
    jj = j[None, None, :]
    rmask = row_ok[:, None, None] & (jj < D // 2)
    for h0 in range(0, H, BLOCK_H):  # a [ROWS, BLOCK_H, BLOCK_D2] tile per step bounds the registers at any H
        h = (h0 + tl.arange(0, BLOCK_H))[None, :, None]
        src = src_row + h.to(tl.int64) * sxh + jj  # int64: a transposed [B, H, T, D] view has sxh = T * D
        dst = dst_row + h * D + jj
        mask = rmask & (h < H)
        c = tl.where(h < RH, cos[:, None, :], 1.0)
        s = tl.where(h < RH, sin[:, None, :], 0.0)
        x1 = tl.load(X + src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X + src + D // 2, mask=mask, other=0.0).to(tl.float32)
        tl.store(XO + dst, (x1 * c - x2 * s).to(XO.dtype.element_ty), mask=mask)
        tl.store(XO + dst + D // 2, (x1 * s + x2 * c).to(XO.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["N_ROWS", "T"])
def _gauss_rope_kernel(
    Q,  # q (or dq_rot in backward): [B, T, Hq, D], last dim contiguous
    K,  # k (or dk_rot): [B, T, Hk, D], last dim contiguous
    QO,  # out: [B, T, Hq, D] contiguous
    KO,  # out: [B, T, Hk, D] contiguous
    MU,  # [B, T] fp32 or float64 position means (token units, relative to the caller's origin); batch stride smb
    SIGMA,  # [B, T] fp32 position spreads (token units), 0 for LOD0 tokens; batch stride ssb
    FREQ,  # [D/2] fp32 band frequencies w_j from rope_freqs (0 for position-free bands)
    N_ROWS,  # B * T
    T,  # sequence length, to split a row index into (b, t) for strided inputs
    sqb, sqt, sqh,  # q strides (elements)
    skb, skt, skh,  # k strides (elements)
    smb, ssb,  # batch strides of mu and sigma (0: one row of positions for the whole batch)
    RHQ, RHK,  # rotated heads of q and k (the others are copied)
    HQ: tl.constexpr,  # query heads (0: k only)
    HK: tl.constexpr,  # key heads (GQA: may differ from HQ)
    D: tl.constexpr,  # head dim, even
    BLOCK_HQ: tl.constexpr,  # q heads per step: min(next power of two >= HQ, _HEAD_ELEMS / BLOCK_D2)
    BLOCK_HK: tl.constexpr,  # k heads per step, likewise
    BLOCK_D2: tl.constexpr,  # next power of two >= D/2
    ROWS: tl.constexpr,  # (b, t) rows per program
    BACKWARD: tl.constexpr,  # rotate by -angle: the adjoint of the forward map
):
    pid = tl.program_id(0).to(tl.int64)  # row * H * D passes 2**31 at long T
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N_ROWS
    b = rows // T
    t = rows % T
    j = tl.arange(0, BLOCK_D2)
    mu = tl.load(MU + b * smb + t, mask=row_ok, other=0.0)
    sigma = tl.load(SIGMA + b * ssb + t, mask=row_ok, other=0.0).to(tl.float32)
    w = tl.load(FREQ + j, mask=j < D // 2, other=0.0).to(tl.float32)
    if MU.dtype.element_ty == tl.float64:  # far positions: the float64 angle goes to _sincos as it is
        angle = mu.to(tl.float64)[:, None] * w.to(tl.float64)[None, :]
    else:
        angle = mu.to(tl.float32)[:, None] * w[None, :]  # (ROWS, BLOCK_D2), same fp32 product as the reference
    ws = sigma[:, None] * w[None, :]
    # exp(-0) is 1 already; the where makes sigma = 0 exactly standard RoPE even with an approximate exp on the GPU
    atten = tl.where(ws == 0.0, 1.0, tl.exp(-0.5 * ws * ws))
    sin, cos = _sincos(angle)  # once per (row, band), shared by all heads
    cos = cos * atten
    sin = sin * atten
    if BACKWARD:
        sin = -sin
    _rotate_heads(Q, QO, rows, row_ok, b, t, j, cos, sin, sqb, sqt, sqh, RHQ, HQ, D, BLOCK_HQ, BLOCK_D2)
    _rotate_heads(K, KO, rows, row_ok, b, t, j, cos, sin, skb, skt, skh, RHK, HK, D, BLOCK_HK, BLOCK_D2)


_HEAD_ELEMS = 1024  # elements of one row's head step (16 heads at D = 128): bounds the tile whatever the head count


def _prune(configs, named_args, **kwargs):
    """Keep configs whose tile gives each thread 8..32 elements per half: 16-byte loads, no spills, short compiles."""
    a = {**named_args, **kwargs}  # the autotuner passes positional arguments in named_args, keywords in kwargs
    e = max(a["BLOCK_HQ"], a["BLOCK_HK"]) * a["BLOCK_D2"]
    keep = [c for c in configs if 8 <= c.kwargs["ROWS"] * e // (32 * c.num_warps) <= 32]
    return keep or configs[:1]


DEFAULT_CFG = dict(ROWS=16, num_warps=4)  # interpreter: cost is per program, so B=2, T=127 takes 16 programs
CONFIGS = [triton.Config(dict(ROWS=r), num_warps=w) for r in (1, 2, 4, 8, 16, 32) for w in (4, 8)]
_gauss_rope_tuned = triton.autotune(
    configs=CONFIGS, key=["HQ", "HK", "D", "BACKWARD"],  # rows are independent: N_ROWS does not change the best config
    prune_configs_by=dict(early_config_prune=_prune))(_gauss_rope_kernel)


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _positions(x):
    """fp32 (or float64: far positions) [B, T] positions with a unit stride along T (a batch stride of 0 stays: no
    expanded copy)."""
    x = x if x.dtype == torch.float64 else x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def _gauss_rope_launch(q, k, mu, sigma, freqs, backward: bool, dtypes=(None, None), heads=(0, 0)):
    """Rotate q [B, T, Hq, D] (None: k only) and k [B, T, Hk, D] in one launch; contiguous outputs in `dtypes`
    (default: q's, k's); heads: rotated heads of q and k (0: all)."""
    B, T, HK, D = k.shape
    HQ = 0 if q is None else q.shape[2]
    assert (q is None or q.shape == (B, T, HQ, D)) and mu.shape == sigma.shape == (B, T) and freqs.shape == (D // 2,)
    k = _last_dim_contiguous(k)  # b/t/h strides are passed: a view of qkv needs no copy
    q = k if q is None else _last_dim_contiguous(q)
    mu, sigma = _positions(mu), _positions(sigma)
    qo = None if HQ == 0 else torch.empty((B, T, HQ, D), device=q.device, dtype=dtypes[0] or q.dtype)
    ko = torch.empty((B, T, HK, D), device=k.device, dtype=dtypes[1] or k.dtype)
    if k.numel() == 0:
        return qo, ko
    bd2 = triton.next_power_of_2(D // 2)
    bh = [min(triton.next_power_of_2(max(h, 1)), max(1, _HEAD_ELEMS // bd2)) for h in (HQ, HK)]
    grid = lambda meta: (triton.cdiv(B * T, meta["ROWS"]),)  # noqa: E731
    launch(_gauss_rope_tuned, grid, DEFAULT_CFG, q, k, ko if qo is None else qo, ko, mu, sigma, freqs, B * T, T,
           q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), mu.stride(0),
           sigma.stride(0), heads[0] or HQ, heads[1] or HK,
           HQ=HQ, HK=HK, D=D, BLOCK_HQ=bh[0], BLOCK_HK=bh[1], BLOCK_D2=bd2, BACKWARD=backward)
    return qo, ko


def _kv_heads(H, HK, heads):
    """Rotated heads of (q, k) for `heads` rotated query heads (0: all); GQA groups rotate together."""
    return (0, 0) if heads in (0, H) else (heads, heads * HK // H)


class GaussRopeFn(torch.autograd.Function):
    """q, k -> (q_rot, k_rot) with the Triton kernel both ways. mu and sigma get no gradient (None)."""

    @staticmethod
    def forward(ctx, q, k, mu, sigma, base, bands, heads):
        freqs = cached_freqs(q.shape[-1], base, bands, q.device)
        ctx.save_for_backward(mu, sigma)
        ctx.args = (freqs, _kv_heads(q.shape[2], k.shape[2], heads))
        return _gauss_rope_launch(q, k, mu, sigma, freqs, False, heads=ctx.args[1])

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        mu, sigma = ctx.saved_tensors  # an unused output's grad arrives as zeros (materialize_grads)
        dq, dk = _gauss_rope_launch(dq_rot, dk_rot, mu, sigma, ctx.args[0], True, heads=ctx.args[1])
        return dq, dk, None, None, None, None, None


# the same launches as custom ops, for torch.compile (opaque to dynamo: no tracing into the autotuner)
@torch.library.custom_op("megacontext::gauss_rope", mutates_args=())
def _gauss_rope_op(q: torch.Tensor, k: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, base: float, bands: int,
                   heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = cached_freqs(q.shape[-1], base, bands, q.device)
    return _gauss_rope_launch(q, k, mu, sigma, freqs, False, heads=_kv_heads(q.shape[2], k.shape[2], heads))


@torch.library.custom_op("megacontext::gauss_rope_bwd", mutates_args=())
def _gauss_rope_bwd_op(dq_rot: torch.Tensor, dk_rot: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, base: float,
                       bands: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = cached_freqs(dq_rot.shape[-1], base, bands, dq_rot.device)
    return _gauss_rope_launch(dq_rot, dk_rot, mu, sigma, freqs, True,
                              heads=_kv_heads(dq_rot.shape[2], dk_rot.shape[2], heads))


@_gauss_rope_op.register_fake
@_gauss_rope_bwd_op.register_fake
def _gauss_rope_fake(q, k, mu, sigma, base, bands, heads):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _gauss_rope_setup(ctx, inputs, output):
    q, k, mu, sigma, base, bands, heads = inputs
    ctx.save_for_backward(mu, sigma)
    ctx.args = (base, bands, heads)


def _gauss_rope_backward(ctx, dq_rot, dk_rot):
    mu, sigma = ctx.saved_tensors
    dq, dk = torch.ops.megacontext.gauss_rope_bwd(dq_rot.contiguous(), dk_rot.contiguous(), mu, sigma, *ctx.args)
    return dq, dk, None, None, None, None, None


_gauss_rope_op.register_autograd(_gauss_rope_backward, setup_context=_gauss_rope_setup)


def gauss_rope(q: torch.Tensor, k: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, base: float = 10000.0,
               bands: int = 0, heads: int = 0):
    """Rotate and attenuate q and k together.

    q: [B, T, Hq, D], k: [B, T, Hk, D] (Hq may differ from Hk), mu, sigma: [B, T] float (token units, relative to an
    origin near the cursor; mu float64 past 2**24, where the angles are formed in float64: see the module note);
    bands: the fastest bands rotate, the others get frequency 0 (p-RoPE; 0: all D/2); heads: the first `heads` query
    heads (and their kv heads) rotate, the others pass unchanged (0: all). Returns
    (q_rot, k_rot) in q's and k's dtypes. Gradients flow to q and k; to mu and sigma only through the reference,
    which is used whenever they require grad.
    """
    check(q.dim() == 4 and k.dim() == 4 and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1],
          f"gauss_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, T, H, D] with equal B, T, D")
    check(q.shape[-1] % 2 == 0, f"gauss_rope: head dim must be even, got {q.shape[-1]}")
    check(mu.shape == q.shape[:2] and sigma.shape == q.shape[:2],
          f"gauss_rope: mu {tuple(mu.shape)} and sigma {tuple(sigma.shape)} must be [B, T] = {tuple(q.shape[:2])}")
    check(q.is_floating_point() and k.is_floating_point(),
          f"gauss_rope: q and k must be floating point, got {q.dtype} and {k.dtype}")
    check(mu.is_floating_point() and sigma.is_floating_point(),
          f"gauss_rope: mu and sigma must be floating point (positions relative to a session origin, see DESIGN §3), "
          f"got {mu.dtype} and {sigma.dtype}")
    check(0 <= bands <= q.shape[-1] // 2 and 0 <= heads <= q.shape[2] and (heads * k.shape[2]) % q.shape[2] == 0,
          f"gauss_rope: bands={bands} must be in 0..D/2 and heads={heads} in 0..Hq, whole GQA groups")
    if use_triton(q, k, mu, sigma) and not (mu.requires_grad or sigma.requires_grad):
        if torch.compiler.is_compiling():
            return torch.ops.megacontext.gauss_rope(q, k, mu, sigma, float(base), bands, heads)
        return GaussRopeFn.apply(q, k, mu, sigma, float(base), bands, heads)
    kv = _kv_heads(q.shape[2], k.shape[2], heads)
    return gauss_rope_ref(q, mu, sigma, base, bands, kv[0]), gauss_rope_ref(k, mu, sigma, base, bands, kv[1])
