"""GPT for MegaContext: a nanoGPT-shaped decoder that reads tokens *or* input embeddings at explicit positions.

Modern defaults: RMSNorm (pre-norm), rotary positions, optional QK-norm, SwiGLU or GELU MLP, tied or untied embeddings,
SDPA attention. Positions are Gaussian (DESIGN §3): every entry has a mean `mu` (float; a gist sits at its span centre)
and a spread `sigma`; band j of q and k is rotated by w_j*mu and damped by exp(-0.5 (w_j sigma)^2), so `sigma = 0`
is standard RoPE exactly. The rotation runs through `kernels.gauss_rope` (Triton on CUDA, reference elsewhere).

Precision: positions reach 10**9 in long sessions, far past fp32's exact integers. RoPE is relative, so positions
are taken relative to an origin (the newest entry of the first forward, kept in the KV cache for decoding) in float64
before the cast to fp32: recent entries keep full precision whatever the absolute offset.

No MegaContext logic lives here (see megacontext.py).
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.cross_entropy import linear_cross_entropy


@dataclass
class GPTConfig:
    vocab_size: int = 16384  # BPE vocabulary incl. special tokens (prepare.py)
    block_size: int = 1024  # training sequence length in entries
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp: str = "swiglu"  # 'swiglu' | 'gelu'
    qk_norm: bool = True  # RMSNorm on q and k per head: stabilises attention logits at large positions
    tie_embeddings: bool = True  # share wte with lm_head
    rope_base: float = 10000.0  # w_j = rope_base ** (-2j / head_dim)
    rope_heads: int = 0  # heads rotated by (Gaussian) RoPE; the others are position-free (NoPE); 0 = all heads
    rope_bands: int = 0  # bands that rotate in each RoPE head, the fastest; the slower ones get frequency 0 (p-RoPE,
    # Barbero et al. 2024): position-free channels that match content at any distance; 0 = all head_dim / 2 bands
    rope_layers: int = 0  # blocks with RoPE heads (the first ones); the later blocks are all NoPE; 0 = every block
    attn: str = "sdpa"  # 'sdpa' (RoPE kernel + SDPA) | 'lod' (kernels.lod_attention, RoPE fused; no-cache forwards)
    dropout: float = 0.0
    lora_rank: int = 0  # low-rank adapters on the attention's qkv projection (training stage lora); 0 = none
    lora_layers: str = "all"  # blocks that get adapters: 'all' or comma-separated indices, e.g. '2,3'
    lora_alpha: float = 16.0  # adapter scale alpha / rank (LoRA)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class KVCache:
    """Rotated keys and values of every layer for the entries decoded so far, plus the position origin.

    Entries [0, length) are valid. `truncate(n)` drops entries n.. (an edit at working-context index n invalidates
    every later key: the "forward in time" rule of DESIGN §7), so the prefix before an edit is reused as is.
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.origin = None  # (B, 1) float64, set by the first forward; every later position is relative to it

    @property
    def max_len(self):
        return self.k.shape[3]

    def truncate(self, n: int):
        assert 0 <= n <= self.length, f"truncate({n}) outside [0, {self.length}]"
        self.length = n

    def update(self, layer: int, k, v):
        """Store k, v (B, nh, T, hs) after the valid prefix; return all valid keys and values of this layer."""
        T = k.shape[2]
        start = self.length
        if start + T > self.max_len:
            raise ValueError(f"KV cache full: {start} + {T} entries > max_len {self.max_len}")
        self.k[layer, :, :, start:start + T] = k
        self.v[layer, :, :, start:start + T] = v
        return self.k[layer, :, :, :start + T], self.v[layer, :, :, :start + T]


def lora_blocks(config: GPTConfig) -> set[int]:
    """Indices of the blocks that carry LoRA adapters."""
    if config.lora_rank <= 0:
        return set()
    if config.lora_layers == "all":
        return set(range(config.n_layer))
    return {int(i) for i in config.lora_layers.split(",") if i.strip()}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, lora: bool = False, layer: int = 0):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.attn in ("sdpa", "lod"), f"attn must be 'sdpa' or 'lod', got {config.attn!r}"
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.rope_base, self.attn = config.rope_base, config.attn
        self.rope_heads = config.rope_heads or config.n_head
        assert 0 < self.rope_heads <= self.n_head, f"rope_heads must be in 0..n_head, got {config.rope_heads}"
        self.rope_bands = config.rope_bands or self.head_dim // 2
        assert 0 < self.rope_bands <= self.head_dim // 2, f"rope_bands must be in 0..hs/2, got {config.rope_bands}"
        if config.rope_layers and layer >= config.rope_layers:
            self.rope_heads = 0  # a position-free block (as Llama 4's interleaved NoPE layers)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if config.qk_norm else nn.Identity()
        self.dropout = config.dropout
        self.lora_a = self.lora_b = None
        if lora:  # W x + (alpha / r) B A x; B = 0 at init, so an adapted model starts as the base model exactly
            self.lora_a = nn.Parameter(torch.randn(config.lora_rank, config.n_embd) / math.sqrt(config.n_embd))
            self.lora_b = nn.Parameter(torch.zeros(3 * config.n_embd, config.lora_rank))
            self.lora_scale = config.lora_alpha / config.lora_rank

    def forward(self, x, mu, sigma, cache=None, layer=0, pyramid=None):
        B, T, C = x.shape
        qkv = self.c_attn(x)
        if self.lora_a is not None:
            qkv = qkv + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora_scale
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, nh, hs)
        q, k = self.q_norm(q), self.k_norm(k)
        if pyramid is not None or (self.attn == "lod" and cache is None):  # RoPE inside kernels.lod_attention
            assert cache is None, "pyramid metadata is for cache-free (training) forwards"
            if self.rope_heads == 0:  # a position-free block: the kernel's rotation must be the identity
                mu, sigma = torch.zeros_like(mu), torch.zeros_like(sigma)
            y = kernels.lod_attention(q, k, v, mu, sigma, **(pyramid or {}), rope_base=self.rope_base,
                                      rope_bands=self.rope_bands % (self.head_dim // 2), rope_heads=self.rope_heads
                                      % self.n_head)
            return self.c_proj(y.reshape(B, T, C))
        q, k = self.rotate(q, k, mu, sigma)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if past == 0 or T == 1:  # plain causal over the new entries, or one query that sees every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=self.dropout if self.training else 0)
        else:  # a chunk after a cached prefix: query i sees the prefix and new entries <= i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


    def rotate(self, q, k, mu, sigma):
        """Gaussian RoPE on the first rope_heads heads of q and k (B, T, nh, hs), in their rope_bands fastest bands;
        NoPE heads and frequency-0 bands pass unchanged: they match content at any distance, where every rotated band
        of a far key has an arbitrary phase. One kernels.gauss_rope call (bands j < R keep frequency base**(-2j/hs),
        the others get 0; heads past rope_heads are copied), with no gather or concatenation around it."""
        if self.rope_heads == 0:
            return q, k
        return kernels.gauss_rope(q, k, mu, sigma, self.rope_base, self.rope_bands % (self.head_dim // 2),
                                  self.rope_heads % self.n_head)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        assert config.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', got {config.mlp!r}"
        hidden = int(8 * config.n_embd / 3 / 64 + 0.999) * 64 if self.swiglu else 4 * config.n_embd  # equal params
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)
        return self.c_proj(F.gelu(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, lora: bool = False, layer: int = 0):
        super().__init__()
        self.ln_1, self.ln_2 = RMSNorm(config.n_embd), RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, lora, layer)
        self.mlp = MLP(config)

    def forward(self, x, mu, sigma, cache=None, layer=0, pyramid=None):
        x = x + self.attn(self.ln_1(x), mu, sigma, cache, layer, pyramid)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        lora = lora_blocks(config)
        self.blocks = nn.ModuleList([Block(config, i in lora, i) for i in range(config.n_layer)])
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)  # (nn.Linear/Embedding only: LoRA parameters keep their own init)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the token embedding is excluded by default (it costs no matmul FLOPs when tied)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wte.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (fwd + bwd): 6N for the matmuls plus 12 L T d for attention scores (PaLM)."""
        cfg, T = self.config, seq_len or self.config.block_size
        n = self.num_params(non_embedding=True) + (self.lm_head.weight.numel() if cfg.tie_embeddings else 0)
        return 6 * n + 12 * cfg.n_layer * cfg.n_embd * T

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, seq_len: int | None = None) -> float:
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        cfg, p = self.config, self.wte.weight
        return KVCache(cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head,
                       device or p.device, dtype or p.dtype)

    def forward(self, idx=None, targets=None, *, embeds=None, mu=None, sigma=None, cache=None, reduction="mean",
                last_only=False, pyramid=None, weights=None):
        """Logits (and loss) for token ids `idx` (B, T) or input embeddings `embeds` (B, T, C).

        mu: (B, T) or (T,) positions (int or float; default: consecutive after the cache); sigma: same shape, spreads
        (default 0 = standard RoPE). targets: (B, T) ids, -1 ignored; reduction 'mean' or 'none' (per-entry NLL).
        Returns (logits (B, T, V) fp32, None) without targets. With targets and reduction 'mean': (None, loss), the
        head and the loss fused in chunks of rows (kernels/cross_entropy.py: no [B, T, V] logits), weighted by
        `weights` (B, T) when given (sum w * nll / sum w). Eager on the CPU the same loss comes from the plain head
        (the fused form saves GPU memory; on the CPU it would only change the rounding, and the CPU demo's base is
        reproducible only bit for bit: configs/mc_demo.py). With `cache`, the new entries are appended to it.
        reduction='none': (None, loss (B, T)), the head run only at entries with a target (>= 0; 0 loss elsewhere).
        last_only (no targets): logits (B, 1, V) of the newest entry only, skipping the output head elsewhere (a
        decode that re-reads many cached entries needs just the next-token distribution).
        pyramid: dict(start, end, lod, K, W0, W1) passed to kernels.lod_attention in every layer: each entry attends
        under its own pyramid (one-pass gist training, DESIGN §8.3); entries in the training layout for Triton.
        """
        assert (idx is None) != (embeds is None), "pass exactly one of idx and embeds"
        x = self.wte(idx) if idx is not None else embeds
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if mu is None:
            mu = torch.arange(past, past + T, device=x.device)
        far = mu.dtype == torch.float64  # global positions of a working context (training passes ints or fp32)
        mu = mu.to(torch.float64).expand(B, T)
        if cache is not None and cache.origin is None:
            cache.origin = mu[:, -1:].clone()
        origin = cache.origin if cache is not None else mu[:, -1:]
        mu = mu - origin  # relative to the origin: exact for recent entries even at 10**9
        # fp32 holds every integer only below 2**24: a span zoomed to 40M tokens back would lose its token spacing
        # (fp32 steps by 4 there), so such a working context keeps float64 positions for RoPE (kernels/rope.py).
        # The check reads data, which a whole compiled graph cannot branch on: under torch.compile (train.py's
        # compile = True, where relative positions stay within the trained window) positions are fp32 as before
        far = far and not torch.compiler.is_compiling() and bool(mu.abs().amax() >= 2**24)
        mu = mu if far else mu.float()
        sigma = torch.zeros_like(mu) if sigma is None else sigma.float().expand(B, T)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mu, sigma, cache, i, pyramid)
        if cache is not None:
            cache.length += T
        assert not (last_only and targets is not None), "last_only computes no loss"
        assert weights is None or (targets is not None and reduction == "mean"), "weights weight the mean loss"
        if targets is not None and reduction == "mean" and (x.is_cuda or torch.compiler.is_compiling()):
            return None, linear_cross_entropy(self.ln_f(x), self.lm_head.weight, targets, weights)
        if targets is not None:  # per-entry losses: the head runs only where a target is
            keep = targets >= 0
            loss = x.new_zeros(B, T, dtype=torch.float32)
            loss[keep] = F.cross_entropy(self.lm_head(self.ln_f(x[keep])).float(), targets[keep], reduction="none")
            if reduction == "none":
                return None, loss
            w = keep.float() if weights is None else weights  # eager on the CPU: the plain head and loss (below)
            return None, (loss * w).sum() / w.sum()
        return self.lm_head(self.ln_f(x[:, -1:] if last_only else x)).float(), None

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; matrices decay, norms and biases do not (nanoGPT). Fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, cache=None, generator=None):
        """Yield sampled token ids (B,) one at a time, decoding over a KV cache (streaming).

        idx: (B, T) prompt. Pass `cache` to continue a conversation: only the new tokens are fed.
        """
        cache = cache or self.make_cache(idx.shape[0], self.config.block_size)
        logits, _ = self(idx, cache=cache)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            yield nxt
            if cache.length >= cache.max_len:
                return
            logits, _ = self(nxt[:, None], cache=cache)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from (B, V) logits: temperature 0 is greedy; top-k then top-p (nucleus) filtering."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
