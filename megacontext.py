"""MegaContext (DESIGN §2-§6): a frozen GPT reads a small working context that tiles an unbounded history with
tokens and gists. Read top to bottom: config -> working context -> GistNet -> LensNet -> focus allocator -> the root
module. Two concepts live next door, each in its own file so this one stays readable at one sitting: tree.py (the
token and gist storage, on disk too) before it, and session.py (the runtime loop of DESIGN §7: ingest, refocus,
decode over a reused KV cache, save and resume) after it.

Coordinates: node (lod, k) covers tokens [k*K**lod, (k+1)*K**lod); LOD0 is a token, LOD1 a gist of K tokens, LOD(l+1)
a gist of K LOD(l) gists, as deep as the history (tree.py: a level is born when K gists of the current top exist).
Tensors hold the data (entry rows, gist rows); no Python object per node.

Decisions where DESIGN and the issue are silent:
- The allocator keeps `refocus_every` entries of headroom (it targets w_max - refocus_every), so the working context
  never exceeds w_max between refocus steps and the KV cache has a fixed size of w_max entries.
- One score per entry serves both directions (DESIGN §5): an entry's score is the value of its detail. A gist's score
  is its expansion gain; a sibling group's collapse loss is the mean score of its K members (low = cheap, below
  -tau_collapse = collapsing helps). New entries score 0 until the next refocus.
- Budget-restoring collapses ignore `max_edits` and, when nothing else is legal, `cooldown`: the budget comes first.
- Swap rate = share of the working context's entries that are new after a step (an expand makes K, a collapse 1).
- Any depth: GistNet has weights for `gist_levels` levels (the levels training reaches: the pyramidal kernel's LOD1
  and LOD2); deeper gists reuse the top trained level's weights, and the per-level sigma scales and LensNet's level
  embedding reuse the top trained level's row (LensNet still tells deeper levels apart by its log-span feature).
"""
import hashlib
import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model import GPT, MLP, GPTConfig, RMSNorm
from predict import GistPredictor
from tiling import check_capacity, pyramid_bounds  # noqa: F401 (re-exported: the working context's arithmetic)
from tree import depth_of


@dataclass(frozen=True)
class MegaContextConfig:
    # tree and working context
    block_k: int = 32  # K: tokens per LOD1 gist and LOD(l) gists per LOD(l+1) gist; a power of two in 2..64
    w_max: int = 512  # budget: working-context entries the base model sees (a gist costs 1, like a token)
    recent_tokens: int = 64  # protected tail: the newest tokens always stay raw (LOD0)
    # focus allocator (DESIGN §6)
    refocus_every: int = 0  # tokens between refocus steps; 0 = every K tokens. Also the allocator's headroom
    max_edits: int = 4  # optional edits per refocus step (budget-restoring collapses come on top)
    settle_edits: int = 16  # optional edits per step of a question's refocus-until-stable loop (several needles
    # zoom level by level at once; the loop's steps stay bounded by the depth)
    # scores are in label units (stages.normalise: nats / the context's label spread); recency scores use them too
    tau_expand: float = 1.0  # an expansion needs a score above this
    tau_collapse: float = 1.0  # a group scoring below -tau_collapse is collapsed even without a paired expansion
    hysteresis: float = 0.5  # a paired expand + collapses needs gain - loss above this margin
    cooldown: int = 2  # refocus steps during which an edited node is not edited in the opposite direction
    edit_cost: float = 0.0  # score margin an edit needs per fraction of the KV cache it makes stale: an edit at entry
    # i with entries [0, c) cached costs edit_cost * (c - i) / n (0 past the cut already made); 0 = off (Session)
    policy: str = "lens"  # 'lens' (LensNet scores) | 'recency' (static recency pyramid, no LensNet)
    gist_predict: str = ""  # MegaPrediction heads (predict.py): '' = off | 'mlp' (gists of the next K and K² tokens
    # predicted from the tied head's input; trained in their own stage, bench/megaprediction.py)
    # positions (DESIGN §3)
    sigma_scale: float = 1 / math.sqrt(12)  # gist sigma = sigma_scale * span: the std of a uniform position
    rope: str = "gaussian"  # 'gaussian' | 'rope' (sigma = 0 everywhere) | 'gaussian_learned' (sigma_scale per level)
    # GistNet (DESIGN §4)
    gist_layers: int = 2  # bidirectional pre-norm blocks over one block of K entries
    gist_heads: int = 4  # attention heads (and pooling queries); must divide the base model's n_embd
    gist_pool: str = "query"  # 'mean' | 'query' (learned-query attention pooling, kernels.gist_pool) | 'cls'
    gist_proj: str = "mlp"  # 'linear' | 'mlp' (residual): the projection back to the embedding space
    gist_shared: bool = False  # one set of weights for every level instead of one per level
    gist_levels: int = 2  # levels with their own weights (the trained ones); deeper levels reuse the top one's
    gist_dtype: str = "float32"  # storage of gists in the tree: 'float32' | 'float16'
    # LensNet (DESIGN §5)
    lens_layers: int = 2  # non-causal blocks over the working-context entries
    lens_width: int = 256  # hidden width (entry embeddings are projected down to it)
    lens_heads: int = 4  # attention heads
    lens_queries: int = 4  # learned tail queries (the dual cross-attention)
    lens_tail: int = 32  # newest entries whose mean seeds the tail queries
    lens_preview: int = 1  # levels below each gist that LensNet previews (K**lens_preview nodes per entry)
    lens_types: bool = False  # preview every token type of each gist's span instead (any depth; tree.types)
    lens_horizon: int = 0  # distances and spans beyond this many tokens look like this many to LensNet (its trained
    # range, e.g. the lens stage's block: no extrapolation of its features in deeper trees); 0 = no cap
    lens_query: str = ""  # the question as the base reads it: residual streams of the newest lens_tail tokens after
    # these blocks of the base (0 = input embeddings, n_layer = last block), comma-separated, query every entry through
    # the Indexer; "" = off (scores that do not depend on the question)
    lens_plan: bool = False  # the Indexer also reads, per tail token, the gist MegaPrediction's LOD1 head predicts
    # for the next K tokens ("what will be needed next"; needs gist_predict and lens_query; heads trained beforehand)
    lens_index_heads: int = 4  # Indexer heads (ReLU dot products, weighted per tail token)
    lens_index_dim: int = 32  # Indexer query/key width per head
    lens_markers: int = 0  # the top vocabulary ids that are markers (prepare.py's 8 special tokens): type previews
    # also mark the ids that follow one (a needle's key, named exactly at any depth; tree.span_types); 0 = off
    lens_margin: int = 0  # previews start this many tokens before each span (and take in the token after it), so
    # both halves of a needle that straddles a block boundary show its key and are zoomed together (tree.node_types)

    @property
    def K(self) -> int:
        return self.block_k

    @property
    def refocus_tokens(self) -> int:
        return self.refocus_every or self.block_k

    @property
    def query_layers(self) -> list[int]:
        return [int(v) for v in self.lens_query.split(",") if v.strip()]

    @property
    def target(self) -> int:
        """Entries the allocator leaves after a step: w_max minus the tokens that arrive before the next one."""
        return self.w_max - self.refocus_tokens

    def validate(self, n_embd: int | None = None) -> "MegaContextConfig":
        """Raise ValueError (one line) on a config that cannot work; returns self."""
        K = self.block_k
        if not (isinstance(K, int) and 2 <= K <= 64 and K & (K - 1) == 0):
            raise ValueError(f"block size K must be a power of two in 2..64, got {K}")
        for key, allowed in dict(policy=("lens", "recency"), rope=("gaussian", "rope", "gaussian_learned"),
                                 gist_pool=("mean", "query", "cls"), gist_proj=("linear", "mlp"),
                                 gist_dtype=("float32", "float16"), gist_predict=("", "mlp")).items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        if not 1 <= self.lens_preview <= 3 or K**self.lens_preview > 4096:
            raise ValueError(f"lens_preview={self.lens_preview} must be 1..3 with K**lens_preview <= 4096 nodes per "
                             "entry")
        if min(self.recent_tokens, self.refocus_every, self.max_edits, self.cooldown, self.edit_cost) < 0:
            raise ValueError("recent_tokens, refocus_every, max_edits, cooldown and edit_cost must be >= 0")
        # the least budget worth running: the tail plus the coarsest tiling of a history that reaches LOD2 (ragged
        # LOD0 and LOD1 runs and one gist above); check_capacity then bounds the history a budget holds
        least = self.recent_tokens + 2 * (K - 1) + 1
        if self.target < least:
            raise ValueError(f"budget w_max={self.w_max} is too small: the protected tail ({self.recent_tokens}) plus "
                             f"the coarsest tiling (2*(K-1)+1 = {least - self.recent_tokens}) plus the refocus "
                             f"headroom ({self.refocus_tokens}) need w_max >= {least + self.refocus_tokens}")
        if self.gist_levels < 1:
            raise ValueError(f"gist_levels must be >= 1, got {self.gist_levels}")
        try:
            layers = self.query_layers
        except ValueError:
            raise ValueError(f"lens_query must be comma-separated layer numbers, got {self.lens_query!r}") from None
        if any(v < 0 for v in layers) or len(set(layers)) != len(layers) or (layers and not self.lens_types):
            raise ValueError(f"lens_query={self.lens_query!r}: distinct layers >= 0, with lens_types on (the Indexer "
                             "reads the type previews)")
        if self.lens_plan and not (self.gist_predict and layers):
            raise ValueError("lens_plan reads MegaPrediction's predicted gist as one more query: it needs gist_predict "
                             f"(got {self.gist_predict!r}) and lens_query (got {self.lens_query!r})")
        if min(self.lens_markers, self.lens_margin, self.settle_edits) < 0:
            raise ValueError("lens_markers, lens_margin and settle_edits must be >= 0")
        for heads, width in ((self.gist_heads, n_embd or self.gist_heads), (self.lens_heads, self.lens_width)):
            if width % heads:
                raise ValueError(f"{heads} attention heads do not divide a width of {width} (gist_heads, lens_heads)")
        return self


# ----------------------------------------------------------------------------------------------------------------
# working context


def level_sigma(sigma_scale: torch.Tensor, lod: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """Position spreads (n,) fp32 of entries at levels lod spanning span tokens: sigma_scale[lod] * span for gists, 0
    for tokens. sigma_scale holds one scale per trained level (LOD0..gist_levels); deeper levels use the last one."""
    scale = sigma_scale.float().cpu()
    return scale[lod.clamp(max=len(scale) - 1)] * span.float() * (lod > 0)


class InvariantError(AssertionError):
    """A working-context invariant of DESIGN §2 is false; the message names the invariant and the entry."""


class WorkingContext:
    """The entries the base model reads: an exact tiling of history [0, cursor) by tree nodes, oldest first.

    Each entry is a row of four int64 tensors (n,): lod, index (the node), born (allocator step at which the entry
    got its level) and born_by (+1 made by an expand, -1 by a collapse, 0 appended). start, end, mu and sigma are
    derived. `dirty`: entries [0, dirty) are unchanged since the owner last synced its KV cache with them.
    """

    def __init__(self, K: int, recent_tokens: int, w_max: int):
        self.K, self.recent, self.w_max = K, recent_tokens, w_max
        self.lod, self.index, self.born, self.born_by = (torch.zeros(0, dtype=torch.long) for _ in range(4))
        self.cursor = 0  # tokens of history covered
        self.dirty = 0
        self.expandable = None  # (lod, index) -> bool (n,): which gists have children (tree.expandable; curation)

    def __len__(self):
        return self.lod.numel()

    @property
    def start(self):
        return self.index * self.K**self.lod

    @property
    def end(self):
        return (self.index + 1) * self.K**self.lod

    @property
    def protected_start(self) -> int:
        """Tokens at or after this position must stay LOD0."""
        return max(0, self.cursor - self.recent)

    def positions(self, sigma_scale: torch.Tensor, first: int = 0):
        """(mu float64, sigma float32) of entries first..: LOD0 mu = p, sigma = 0; a gist over [a, b) has
        mu = (a + b - 1)/2 and sigma = sigma_scale[lod] * (b - a) (see level_sigma)."""
        lod, index = self.lod[first:], self.index[first:]
        span = self.K**lod
        mu = (index * span).double() + (span - 1).double() / 2
        return mu, level_sigma(sigma_scale.detach(), lod, span)

    def embeddings(self, tree, first: int = 0) -> torch.Tensor:
        """Input embeddings (n - first, d) of entries first.. for the base model (tree: a tree.MegaContextTree)."""
        return tree.node_embeddings(self.lod[first:], self.index[first:])

    def _splice(self, i: int, j: int, lod, index, born, born_by):
        """Replace entries [i, j) by new rows; only that slice changes, and the KV cache is stale from i on."""
        rows = (lod, index, born, born_by)
        self.lod, self.index, self.born, self.born_by = (
            torch.cat([old[:i], torch.as_tensor(new, dtype=torch.long), old[j:]])
            for old, new in zip((self.lod, self.index, self.born, self.born_by), rows))
        self.dirty = min(self.dirty, i)

    def append(self, n: int, now: int = 0):
        """Cover n new tokens with LOD0 entries."""
        self._splice(len(self), len(self), torch.zeros(n), torch.arange(self.cursor, self.cursor + n),
                     torch.full((n,), now), torch.zeros(n))
        self.cursor += n

    def expand(self, i: int, now: int = 0):
        """Replace gist entry i by its K children (K - 1 more entries)."""
        if not 0 <= i < len(self):
            raise ValueError(f"expand({i}): no entry {i} in a working context of {len(self)}")
        l, k = int(self.lod[i]), int(self.index[i])
        if l == 0:
            raise ValueError(f"expand({i}): entry {i} is a LOD0 token and has no finer level")
        if not self.can_expand(slice(i, i + 1))[0]:
            raise ValueError(f"expand({i}): curation dropped the tokens of LOD{l} node {k}; only its gist is kept")
        K = self.K
        self._splice(i, i + 1, torch.full((K,), l - 1), k * K + torch.arange(K), torch.full((K,), now),
                     torch.ones(K))

    def collapse(self, i: int, now: int = 0):
        """Replace the K sibling entries i..i+K-1 by their parent (K - 1 fewer entries)."""
        if not 0 <= i <= len(self) - self.K:
            raise ValueError(f"collapse({i}): needs K={self.K} entries from {i}, the working context has {len(self)}")
        l, k = int(self.lod[i]), int(self.index[i])
        # K siblings always have their parent in the tree (they tile its complete span), so the tree's top level,
        # which holds fewer than K nodes, never collapses; no depth check is needed
        if k % self.K or not bool((self.lod[i:i + self.K] == l).all()):
            raise ValueError(f"collapse({i}): entries {i}..{i + self.K - 1} are not the K siblings of one parent")
        if (k // self.K + 1) * self.K ** (l + 1) > self.protected_start:
            raise ValueError(f"collapse({i}): the parent would cover the protected tail (tokens >= "
                             f"{self.protected_start} stay LOD0)")
        self._splice(i, i + self.K, [l + 1], [k // self.K], [now], [-1])

    def group_starts(self) -> torch.Tensor:
        """Indices i where collapse(i) is legal: K same-level siblings of one parent whose parent ends before the
        protected tail. (Exact tiling makes same level + aligned first index sufficient.)"""
        K, n = self.K, len(self)
        if n < K:
            return torch.zeros(0, dtype=torch.long)
        lod = self.lod
        same = (lod.unfold(0, K, 1) == lod[:n - K + 1, None]).all(1)
        first, lvl = self.index[:n - K + 1], lod[:n - K + 1]
        ok = same & (first % K == 0) & ((first // K + 1) * K ** (lvl + 1) <= self.protected_start)
        return ok.nonzero().flatten()

    def can_expand(self, rows=slice(None)) -> torch.Tensor:
        """bool (n,) over entries[rows]: gists whose children the tree holds (all gists, unless curation dropped the
        tokens under some: then `expandable` says which)."""
        lod, index = self.lod[rows], self.index[rows]
        ok = lod > 0
        if self.expandable is not None and ok.any():
            ok &= torch.as_tensor(self.expandable(lod.numpy(), index.numpy()))
        return ok

    def legal_directions(self):
        """(can_expand, can_collapse) bool (n,): gists with children can expand; members of a legal group can
        collapse."""
        can_collapse = torch.zeros(len(self), dtype=torch.bool)
        g = self.group_starts()
        if g.numel():
            can_collapse[(g[:, None] + torch.arange(self.K)).flatten()] = True
        return self.can_expand(), can_collapse

    def check_invariants(self, budget: int | None = None):
        """Raise InvariantError unless DESIGN §2 holds: exact tiling of [0, cursor), well-formed aligned nodes,
        at most `budget` (default w_max) entries, and the newest recent_tokens raw."""
        n, lod = len(self), self.lod
        if not all(t.dtype == torch.long and t.shape == (n,) for t in (self.index, self.born, self.born_by)):
            raise InvariantError("alignment: entry tensors disagree in length or dtype")
        top = depth_of(self.cursor, self.K)  # a complete node inside the history; also keeps K**lod in int64
        if n and (int(lod.min()) < 0 or int(lod.max()) > top or int(self.index.min()) < 0):
            raise InvariantError(f"alignment: levels must be in 0..{top} (the depth of {self.cursor:,} tokens) and "
                                 f"node indices >= 0")
        if n == 0:
            if self.cursor:
                raise InvariantError(f"tiling: no entries but the cursor is at {self.cursor}")
            return
        start, end = self.start, self.end
        if int(start[0]) != 0:
            raise InvariantError(f"tiling: entry 0 starts at token {int(start[0])}, not 0")
        bad = (start[1:] != end[:-1]).nonzero()
        if bad.numel():
            i = int(bad[0]) + 1
            kind = "gap" if start[i] > end[i - 1] else "overlap"
            raise InvariantError(f"tiling: {kind} at entry {i} (LOD{int(lod[i])} node {int(self.index[i])}): starts "
                                 f"at token {int(start[i])}, entry {i - 1} ends at {int(end[i - 1])}")
        if int(end[-1]) != self.cursor:
            raise InvariantError(f"tiling: the last entry ends at token {int(end[-1])}, the cursor is {self.cursor}")
        budget = self.w_max if budget is None else budget
        if n > budget:
            raise InvariantError(f"budget: {n} entries > {budget}")
        coarse = ((end > self.protected_start) & (lod > 0)).nonzero()
        if coarse.numel():
            i = int(coarse[0])
            raise InvariantError(f"protected tail: entry {i} is LOD{int(lod[i])} over tokens [{int(start[i])}, "
                                 f"{int(end[i])}) but tokens >= {self.protected_start} must stay LOD0")

    @classmethod
    def pyramid(cls, K: int, recent: int, w_max: int, cursor: int, budget: int, now: int = 0) -> "WorkingContext":
        """The static recency pyramid over [0, cursor) within `budget` entries (the cold start)."""
        wc = cls(K, recent, w_max)
        edges = [cursor] + pyramid_bounds(cursor, K, recent, budget) + [0]
        top = len(edges) - 2
        lod = [torch.full(((edges[l] - edges[l + 1]) // K**l,), l) for l in range(top, -1, -1)]
        index = [torch.arange(edges[l + 1] // K**l, edges[l] // K**l) for l in range(top, -1, -1)]
        lod, index = torch.cat(lod), torch.cat(index)
        wc._splice(0, 0, lod, index, torch.full_like(lod, now), torch.zeros_like(lod))
        wc.cursor, wc.dirty = cursor, 0
        return wc

    def level_map(self, width: int) -> str:
        """The history as `width` characters, oldest left: the level of the entry at each column's middle token
        (0-9, then a-z for levels 10-35)."""
        if self.cursor == 0:
            return ""
        width = min(width, self.cursor)
        mid = ((torch.arange(width) + 0.5) * self.cursor / width).long()
        entry = torch.searchsorted(self.start, mid, right=True) - 1
        return "".join("0123456789abcdefghijklmnopqrstuvwxyz"[int(v)] for v in self.lod[entry])


RECENCY_UNIT = 3.0  # one level of mismatch with the pyramid, in the allocator's score units (> tau_expand + 1)


def recency_scores(wc: WorkingContext, budget: int) -> torch.Tensor:
    """Scores (n,) of the static recency-pyramid policy: RECENCY_UNIT x (the entry's level minus the pyramid's level at
    its start) (> 0: too coarse, expand; < 0: too fine, collapse), plus a tie-break in [-1, 0] that prefers the newest
    expansion and the oldest collapse. The allocator turns them into the pyramid's tiling."""
    bounds = torch.tensor(pyramid_bounds(wc.cursor, wc.K, wc.recent, budget))
    target = (wc.start[:, None] < bounds[None, :]).sum(1)
    dist = (wc.cursor - wc.end).double()
    newness = 1 - torch.log1p(dist) / math.log1p(max(wc.cursor, 1))  # 1 at the cursor, 0 at token 0
    return RECENCY_UNIT * (wc.lod - target).float() + (newness.float() - 1)


# ----------------------------------------------------------------------------------------------------------------
# GistNet (DESIGN §4)


class Attention(nn.Module):
    """Non-causal multi-head attention of queries x over context c (self-attention when c is x); optional RoPE."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q, self.kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x, c, pos=None):
        """x: (B, T, d), c: (B, S, d); pos: (T,) local positions for RoPE (self-attention only) -> (B, T, d)."""
        B, T, d = x.shape
        hs = d // self.n_head
        q = self.q(x).view(B, T, self.n_head, hs)
        k, v = self.kv(c).view(B, c.shape[1], 2, self.n_head, hs).unbind(2)
        if pos is not None:
            mu = pos.to(x.device, torch.float32).expand(B, T)  # stride 0 over B: the reference rotates once
            q, k = kernels.gauss_rope(q, k, mu, torch.zeros(1, T, device=x.device).expand(B, T))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    """Pre-norm transformer block, bidirectional: attention (with local RoPE when pos is given) then an MLP."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1, self.ln_2 = RMSNorm(d), RMSNorm(d)
        self.attn, self.mlp = Attention(d, n_head), MLP(GPTConfig(n_embd=d, mlp="swiglu"))

    def forward(self, x, pos=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, pos)
        return x + self.mlp(self.ln_2(x))


def _init(module: nn.Module, n_layer: int):
    """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
    for name, p in module.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, 0.0, 0.02 / (math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 1))


class GistLevel(nn.Module):
    """One level's GistNet: K children (N, K, d) -> blocks -> pooling -> projection -> RMS matched to emb_rms."""

    def __init__(self, cfg: MegaContextConfig, d: int):
        super().__init__()
        self.pool, H = cfg.gist_pool, cfg.gist_heads
        self.blocks = nn.ModuleList([Block(d, H) for _ in range(cfg.gist_layers)])
        _init(self.blocks, cfg.gist_layers)
        # the query pools per head; zeros = uniform softmax = mean pooling until trained
        self.query = nn.Parameter(torch.zeros(H, d // H)) if cfg.gist_pool == "query" else None
        self.cls = nn.Parameter(torch.randn(d) * 0.02) if cfg.gist_pool == "cls" else None
        if cfg.gist_proj == "linear":
            self.proj = nn.Linear(d, d, bias=False)
            nn.init.eye_(self.proj.weight)  # identity until trained: an untrained GistNet ~ normalised mean pooling
        else:
            self.proj = MLP(GPTConfig(n_embd=d, mlp="swiglu"))
            nn.init.zeros_(self.proj.c_proj.weight)  # residual, zero at init for the same reason
        self.gain = nn.Parameter(torch.ones(d))

    def hidden(self, x):
        """(N, K, d) -> (N, L, d) block outputs, L = K (+1 with a leading cls entry); bidirectional within a block."""
        N, K, d = x.shape
        pos = torch.arange(K, dtype=torch.float32)
        if self.cls is not None:  # the cls entry sits at the block's centre
            x = torch.cat([self.cls.expand(N, 1, d).to(x.dtype), x], 1)
            pos = torch.cat([torch.tensor([(K - 1) / 2]), pos])
        for block in self.blocks:
            x = block(x, pos)
        return x

    def forward(self, x, emb_rms):
        N, K, d = x.shape
        h = self.hidden(x)
        if self.pool == "cls":
            y = h[:, 0]
        elif self.pool == "query":
            H = self.query.shape[0]
            y = kernels.gist_pool(h.reshape(1, N * K, H, d // H), self.query.to(h.dtype), K).reshape(N, d)
        else:
            y = h.mean(1)
        y = self.proj(y) if isinstance(self.proj, nn.Linear) else y + self.proj(y)
        return F.rms_norm(y, (d,)) * (self.gain * emb_rms).to(y.dtype)


class GistNet(nn.Module):
    """Gists of complete blocks (DESIGN §4): forward(lod, x (N, K, d)) -> (N, d) in the base embedding space, with
    the RMS of the base model's token embeddings (`emb_rms`). One GistLevel per trained level (gist_levels), or one
    shared by every level; a level deeper than the trained ones reuses the top trained level's weights."""

    def __init__(self, cfg: MegaContextConfig, d: int, emb_rms: float):
        super().__init__()
        self.levels = nn.ModuleList([GistLevel(cfg, d) for _ in range(1 if cfg.gist_shared else cfg.gist_levels)])
        self.register_buffer("emb_rms", torch.tensor(float(emb_rms)))

    def level(self, lod: int) -> GistLevel:
        assert lod >= 1, f"gists exist for LOD1 and above, not LOD{lod}"
        return self.levels[min(lod, len(self.levels)) - 1]

    def describe(self) -> str:
        """Which weights make which level, in one phrase (shown at session start)."""
        n = len(self.levels)
        if n == 1:
            return "GistNet: one set of weights for every level"
        return f"GistNet: LOD1..LOD{n} own weights, LOD{n + 1}+ reuse LOD{n}'s"

    def forward(self, lod: int, x):
        return self.level(lod)(x, self.emb_rms)


# ----------------------------------------------------------------------------------------------------------------
# LensNet (DESIGN §5)


class LensBlock(nn.Module):
    """Entries attend to each other; the tail queries attend to the entries; the entries attend back to the queries."""

    def __init__(self, W: int, n_head: int):
        super().__init__()
        self.self_block = Block(W, n_head)
        self.ln_q, self.ln_h, self.ln_b = RMSNorm(W), RMSNorm(W), RMSNorm(W)
        self.to_ctx, self.from_ctx = Attention(W, n_head), Attention(W, n_head)

    def forward(self, h, q):
        h = self.self_block(h)
        q = q + self.to_ctx(self.ln_q(q), self.ln_h(h))  # tail attends to context
        return h + self.from_ctx(self.ln_b(h), self.ln_q(q)), q  # context attends back


def preview_nodes(lod, index, K: int, depth: int = 1):
    """(lod, index) (n, K**depth) of the nodes `depth` levels below each entry (tokens at most): its descendants a
    zoom would reveal, repeated to fill the row where fewer exist (a LOD1 entry has K tokens), the entry itself for
    a LOD0 entry. Rows are for max-pooling, where repeats change nothing."""
    n, width = len(lod), K**depth
    down = torch.minimum(lod, torch.tensor(depth))  # levels actually below each entry
    count = K**down  # descendants at that level
    j = torch.arange(width)[None, :] % count[:, None]  # repeat to the row's width
    return (lod - down)[:, None].expand(n, width), index[:, None] * count[:, None] + j


def _sparse_max(rows, ids, table, n_rows: int, chunk: int = 1 << 24):
    """(n_rows, C): per output row, the max of table's rows (X, C) named by the (rows, ids) pairs that land on it (0
    where none does), in chunks of ~`chunk` values. Only the named pairs are touched: a preview marks a few dozen of
    the vocabulary's ids (a LOD1 gist's span holds <= 17 of 1,024), far less work than a masked copy of the whole
    (rows, V, C) product. Gradients as amax's: shared evenly among tied maxima."""
    C = table.shape[1]
    out = table.new_full((n_rows, C), float("-inf"))
    step = max(1, chunk // C)
    for a in range(0, len(rows), step):
        out = out.scatter_reduce(0, rows[a:a + step, None].expand(-1, C), table[ids[a:a + step]], "amax")
    return out.nan_to_num(0.0, neginf=0.0)


def type_max(types, table):
    """(B, n, W): per entry, the max of table (V, W) over the ids its types (B, n, V) bool mark (an entry with none
    gets 0). Sparse over the marked ids."""
    B, n, V = types.shape
    rows, ids = types.reshape(B * n, V).to(table.device).nonzero(as_tuple=True)
    return _sparse_max(rows, ids, table, B * n).view(B, n, -1)


def masked_max(values, mask, chunk: int = 1 << 24):
    """(B, T, n): per entry n, the max over the ids its mask (B, n, V) bool marks of values (B, T, V) (0 where it
    marks none). Sparse over the marked ids, in chunks of ~`chunk` values."""
    B, T, V = values.shape
    n = mask.shape[1]
    b, e, v = mask.to(values.device).nonzero(as_tuple=True)
    table = values.transpose(1, 2).reshape(B * V, T)  # row b * V + v: values[b, :, v]
    return _sparse_max(b * n + e, b * V + v, table, B * n, chunk).view(B, n, T).transpose(1, 2)


class Indexer(nn.Module):
    """Query-conditioned match scores (DESIGN §5; DeepSeek-V3.2's lightning indexer): the base model's residual streams
    of the newest tokens ask, every entry answers. Learned kinds, with keys from: the entry's own embedding (a gist
    or a token), the token types of its span, and the ids that follow a marker in it (tree.span_types). Per tail token
    t, head h and kind c: q_thc and a weight w_thc from t's states; an entry's kind-c score is sum_h w_thc
    ReLU(q_thc . k_ehc), where for the type kinds k runs over the span's ids (each id's key from its token embedding)
    and the max is taken. Lexical kinds (with the tail's ids): a weight u_tc from t's states times whether t's own id
    is among the span's types (c = 1) or after a marker in it (c = 2): the exact-match case of the same form (a query
    one-hot in t's id, keys one-hot in the span's), which a small learned bilinear map only approximates among 1,000
    ids. The entry's score is the max over tail tokens of the sum over kinds: a question about key X raises the
    entries whose spans hold X after a marker, at any depth; the states decide which tail tokens ask (the key after
    <|query|>, the variable just named) and which do not (book text). Cost per scoring: Tq x (n + 2 V) x H x dk plus
    a masked max over Tq x n x V, independent of the history's length."""

    def __init__(self, d_query: int, d: int, heads: int, dim: int, type_kinds: int):
        super().__init__()
        self.heads, self.dim, self.learned = heads, dim, 1 + type_kinds
        self.kinds = self.learned + type_kinds  # learned, then lexical
        self.norm = RMSNorm(d_query)
        self.q = nn.Linear(d_query, self.learned * heads * dim, bias=False)
        self.w = nn.Linear(d_query, self.learned * heads + type_kinds, bias=False)  # (and the lexical u_tc)
        self.k = nn.ModuleList([nn.Linear(d, heads * dim, bias=False) for _ in range(self.learned)])
        for p in self.parameters():  # small: untrained match scores are ~1e-3, LensNet starts as the query-free one
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, query, x, types=None, vocab=None, query_ids=None):
        """query: (B, Tq, d_query) the newest tokens' states, query_ids (B, Tq) their ids; x: (B, n, d) entry
        embeddings; types: (B, n, V * type_kinds) bool previews, vocab (V, d) token embeddings. Returns (score
        (B, n), per-kind maxima over the tail (B, n, kinds)), fp32."""
        B, Tq, _ = query.shape
        H, D, C = self.heads, self.dim, self.learned
        hq = self.norm(query.float())
        q = self.q(hq).view(B, Tq, C, H, D) / math.sqrt(D)
        w = self.w(hq)
        w, u = w[..., :C * H].view(B, Tq, C, H), w[..., C * H:]  # (B, Tq, C, H), (B, Tq, type_kinds)
        k = self.k[0](x.detach().float()).view(B, -1, H, D)
        parts = [torch.einsum("bthd,bnhd->btnh", q[:, :, 0], k).relu().mul(w[:, :, 0, None]).sum(-1)]  # (B, Tq, n)
        if C > 1:
            V = vocab.shape[0]
            for c in range(1, C):
                kv = self.k[c](vocab.detach().float()).view(V, H, D)
                per_id = torch.einsum("bthd,vhd->btvh", q[:, :, c], kv).relu().mul(w[:, :, c, None]).sum(-1)
                parts.append(masked_max(per_id, types[..., (c - 1) * V:c * V]))
            rows = torch.arange(B, device=types.device)[:, None]
            for c in range(1, C):  # lexical: does the span hold tail token t's own id (after a marker)?
                has = types[rows, :, (c - 1) * V + query_ids.to(types.device)]  # (B, Tq, n)
                parts.append(u[..., c - 1, None] * has.to(u.device, u.dtype))
        parts = torch.stack(parts, -1)  # (B, Tq, n, kinds)
        return parts.sum(-1).amax(1), parts.amax(1)


class LensNet(nn.Module):
    """One score per working-context entry, the value of its detail: a gist's score is its expansion gain, a sibling
    group's mean score the loss of collapsing it. Non-causal and without positions beyond the features, so permuting
    the non-tail entries permutes the scores.

    Besides its own embedding, each gist shows LensNet its descendants lens_preview levels down (preview_nodes: what
    zooming would reveal), max-pooled after a projection: a coarse gist averages away a rare token (a needle's marker
    is 1/64 of a LOD2 gist at K = 8), while the descendant that holds it stands out (measured: a needle's LOD2 gist is
    the top gist by its marker's cosine 3% of the time, its LOD1 child 71%). Cost: K**lens_preview x the entries,
    independent of the history. Above LOD lens_preview the previewed nodes are gists again, and a needle vanishes
    (measured: 0/8 pass keys found at 64k tokens); with lens_types the preview is instead the max over every token
    type of the gist's span (the tree's type index, type_max): exact at any depth, V x W work per scoring.

    With lens_query the scores read the question (issue 17): the Indexer's match of each entry against the base's
    states of the newest tokens is added to the score and fed to the entries (so a needle's neighbour can see that
    it matched), and those states seed the tail queries instead of the entries' input embeddings alone."""

    def __init__(self, cfg: MegaContextConfig, d: int, d_query: int = 0):
        super().__init__()
        W, self.tail, self.horizon = cfg.lens_width, cfg.lens_tail, cfg.lens_horizon
        self.embed = nn.Linear(d, W, bias=False)  # the entry's (detached) input embedding, projected down
        self.level = nn.Embedding(cfg.gist_levels + 1, W)  # deeper levels share the top row (clamped in forward)
        self.feat = nn.Linear(2, W)  # log(1 + distance to cursor), log(span)
        self.queries = nn.Parameter(torch.randn(cfg.lens_queries, W) * 0.02)
        self.blocks = nn.ModuleList([LensBlock(W, cfg.lens_heads) for _ in range(cfg.lens_layers)])
        self.ln_f, self.head = RMSNorm(W), nn.Linear(W, 1)
        _init(self, cfg.lens_layers)
        self.child = nn.Linear(d, W, bias=False)  # each previewed descendant's embedding, projected, then max-pooled
        nn.init.normal_(self.child.weight, 0.0, 0.02)
        nn.init.zeros_(self.head.bias)  # untrained scores are small and unbiased: no edits beyond the budget's
        self.indexer = None
        if cfg.query_layers:
            self.indexer = Indexer(d_query, d, cfg.lens_index_heads, cfg.lens_index_dim, 2 if cfg.lens_markers else 1)
            self.match_in = nn.Linear(self.indexer.kinds, W, bias=False)  # per-kind matches, into the entries
            self.query_in = nn.Linear(d_query, W, bias=False)  # the question's states, into the tail queries

    def forward(self, x, lod, dist, span, children=None, types=None, vocab=None, query=None, query_ids=None):
        """x: (B, n, d) entry embeddings; lod, dist (tokens from the entry's end to the cursor), span: (B, n);
        children: (B, n, P, d) embeddings of each entry's previewed descendants (preview_nodes; LOD0 rows ignored);
        or (lens_types) types: (B, n, V) bool, the token ids in each entry's span (and (B, n, 2V) with lens_markers:
        then the ids after a marker), with vocab (V, d) the token embeddings: the preview is then the max over the
        span's token types, the same at any depth. query (lens_query): (B, Tq, d_query) the base's states of the
        newest tokens, query_ids (B, Tq) their ids. Returns scores (B, n) fp32; the allocator reads only legal
        directions (a gist's own, a legal group's mean)."""
        if self.horizon:
            dist, span = dist.clamp(max=self.horizon), span.clamp(max=self.horizon)
        feats = torch.stack([torch.log1p(dist.float()), torch.log(span.float())], -1).to(self.feat.weight.dtype)
        lod = lod.clamp(max=self.level.num_embeddings - 1)
        h = self.embed(x.detach().to(self.embed.weight.dtype)) + self.level(lod) + self.feat(feats)
        if types is not None:
            preview = type_max(types[..., :vocab.shape[0]], self.child(vocab.detach().to(self.child.weight.dtype)))
        elif children is not None:
            preview = self.child(children.detach().to(self.child.weight.dtype)).amax(2)  # (B, n, W)
        if types is not None or children is not None:
            h = h + torch.where((lod > 0)[..., None], preview, torch.zeros_like(preview))
        q = self.queries[None] + h[:, -self.tail:].mean(1, keepdim=True)  # seeded by the newest entries
        match = 0.0
        if self.indexer is not None:
            assert query is not None and types is not None, "a query-conditioned LensNet needs query and types"
            match, kinds = self.indexer(query, x, types, vocab, query_ids)
            h = h + self.match_in(kinds.to(h.dtype))
            q = q + self.query_in(query.detach().to(h.dtype)).mean(1, keepdim=True)
        for block in self.blocks:
            h, q = block(h, q)
        return self.head(self.ln_f(h)).squeeze(-1).float() + match


# ----------------------------------------------------------------------------------------------------------------
# focus allocator (DESIGN §6)


class FocusAllocator:
    """Turns per-entry scores into legal edits of a WorkingContext under the budget, with telemetry.

    A step: (1) collapse the cheapest legal groups until the context holds at most cfg.target entries (never by
    dropping entries; ValueError if no legal collapse is left); (2) up to max_edits optional edits: the best
    expansion above tau_expand, alone if it fits, else paired with the cheapest collapses that refund its K-1
    entries, applied only if gain - loss > hysteresis; (3) groups below -tau_collapse collapse on their own.
    A node edited in the last `cooldown` steps is not edited in the opposite direction; `keep_since` (a step number)
    extends that to every edit since that step (Session.refocus(until_stable): a zoom made for a question is not
    undone while the question is being answered, so the loop cannot oscillate).
    With cfg.edit_cost, every score is first charged the KV recompute its edit would add (_cost): expansions need
    tau_expand plus it, collapses count as that much dearer, so edits far from the tail must pay for the re-read
    (a paired expand + collapses is charged each member's cost, an upper bound on the one cut they share).
    """

    def __init__(self, cfg: MegaContextConfig):
        self.cfg, self.steps = cfg, 0
        self.totals = dict(expands=0, collapses=0, forced=0, swap_rate=0.0, removed=0, residency=0)
        self.expanded = []  # (lod, index) of the nodes the last step expanded (the tree's access telemetry)

    def _group_scores(self, wc, scores, now, cooldown, strict=True):
        """(starts, mean member scores) of legal groups; strict drops groups holding an expansion's child made within
        the last `cooldown` steps."""
        g = wc.group_starts()
        if not g.numel():
            return g, scores[:0]
        members = g[:, None] + torch.arange(wc.K)
        if strict:
            fresh = (wc.born_by[members] == 1) & (now - wc.born[members] <= cooldown)
            keep = ~fresh.any(1)
            g, members = g[keep], members[keep]
        return g, scores[members].mean(1) + self._cost(wc, g)

    def _cost(self, wc, i):
        """The KV recompute an edit at entries i (m,) adds, in score units: cfg.edit_cost per fraction of the working
        context between i and the cut so far (wc.dirty: the cache is cut once per refocus, at the lowest edit)."""
        return self.cfg.edit_cost * (wc.dirty - i).clamp(min=0).float() / max(len(wc), 1)

    def _expand_candidate(self, wc, scores, now, cooldown):
        blocked = (wc.born_by == -1) & (now - wc.born <= cooldown)
        scores = scores - self._cost(wc, torch.arange(len(wc)))
        s = torch.where(wc.can_expand() & ~blocked, scores, torch.tensor(-math.inf))
        i = int(s.argmax()) if len(s) else 0
        return (i, float(s[i])) if len(s) and s[i] > self.cfg.tau_expand else (None, None)

    def step(self, wc: WorkingContext, scores: torch.Tensor, budget_only: bool = False, keep_since=None,
             max_edits: int | None = None) -> dict:
        """One allocator step on `wc` with scores (n,) aligned to its entries; returns this step's telemetry.
        max_edits: optional edits of this step (default cfg.max_edits; a question's settle loop uses settle_edits)."""
        cfg, K, now = self.cfg, wc.K, self.steps
        cool = cfg.cooldown if keep_since is None else max(cfg.cooldown, now - keep_since)
        self.steps += 1
        assert scores.shape == (len(wc),), f"scores {tuple(scores.shape)} for {len(wc)} entries"
        state = dict(scores=scores.detach().float().cpu().clone(), removed=[], expands=0, collapses=0, forced=0, new=0)

        self.expanded = []

        def edit(kind, i):
            removed = slice(i, i + 1) if kind == "expand" else slice(i, i + K)
            if kind == "expand":
                self.expanded.append((int(wc.lod[i]), int(wc.index[i])))
            state["removed"].append(now - wc.born[removed])
            new = 1 if kind == "collapse" else K
            getattr(wc, kind)(i, now)
            s = state["scores"]
            state["scores"] = torch.cat([s[:removed.start], torch.zeros(new), s[removed.stop:]])
            state[kind + "s"] += 1
            state["new"] += new

        while len(wc) > cfg.target:  # (1) the budget comes first
            g, gs = self._group_scores(wc, state["scores"], now, cool)
            if not g.numel():
                g, gs = self._group_scores(wc, state["scores"], now, cool, strict=False)
            if not g.numel():
                raise ValueError(f"cannot meet the budget legally: {len(wc)} entries > {cfg.target} and no sibling "
                                 f"group can collapse (history {wc.cursor:,} tokens, K={K})")
            edit("collapse", int(g[gs.argmin()]))
            state["forced"] += 1
        left = 0 if budget_only else cfg.max_edits if max_edits is None else max_edits
        while left > 0:  # (2) expansions, paired with collapses when they do not fit
            e, gain = self._expand_candidate(wc, state["scores"], now, cool)
            if e is None:
                break
            need = len(wc) + K - 1 - cfg.target
            c = max(0, -(-need // (K - 1)))
            if 1 + c > left:
                break
            if c:
                g, gs = self._group_scores(wc, state["scores"], now, cool)
                outside = (g > e) | (g + K <= e)  # a group holding e cannot pay for it
                g, gs = g[outside], gs[outside]
                order = gs.argsort()[:c]
                if len(order) < c or gain - float(gs[order].sum()) <= cfg.hysteresis:
                    break
                for i in sorted(g[order].tolist(), reverse=True):  # back to front, so indices before stay valid
                    edit("collapse", i)
                    e -= (K - 1) if i < e else 0
            edit("expand", e)
            left -= 1 + c
        while left > 0:  # (3) cheap collapses on their own, freeing room for later expansions
            g, gs = self._group_scores(wc, state["scores"], now, cool)
            if not g.numel() or float(gs.min()) >= -cfg.tau_collapse:
                break
            edit("collapse", int(g[gs.argmin()]))
            left -= 1
        removed = torch.cat(state["removed"]) if state["removed"] else torch.zeros(0, dtype=torch.long)
        t = dict(step=now, entries=len(wc), expands=state["expands"], collapses=state["collapses"],
                 forced=state["forced"], edits=state["expands"] + state["collapses"],
                 swap_rate=state["new"] / max(len(wc), 1), utilisation=len(wc) / cfg.w_max,
                 residency=float(removed.float().mean()) if removed.numel() else None)
        for key in ("expands", "collapses", "forced", "swap_rate"):
            self.totals[key] += t[key]
        self.totals["removed"] += removed.numel()
        self.totals["residency"] += int(removed.sum())
        return t

    def summary(self) -> dict:
        """Means over all steps so far: swap rate per step, residency (steps an entry kept its level) per removal."""
        tot, n = self.totals, max(self.steps, 1)
        residency = tot["residency"] / tot["removed"] if tot["removed"] else None
        return dict(steps=self.steps, expands=tot["expands"], collapses=tot["collapses"], forced=tot["forced"],
                    swap_rate=tot["swap_rate"] / n, residency=residency)


# ----------------------------------------------------------------------------------------------------------------
# the root module


class MegaContextModel(nn.Module):
    """The one nn.Module root: the frozen base GPT, GistNet and LensNet (and learned sigma scales when asked)."""

    def __init__(self, gpt: GPT, cfg: MegaContextConfig):
        super().__init__()
        self.cfg = cfg.validate(gpt.config.n_embd)
        d = gpt.config.n_embd
        self.gpt = gpt
        emb_rms = gpt.wte.weight.detach().float().pow(2).mean(-1).sqrt().mean().item()
        layers = cfg.query_layers
        if any(v > gpt.config.n_layer for v in layers):
            raise ValueError(f"lens_query={cfg.lens_query!r} names a layer above the base's {gpt.config.n_layer}")
        self.gistnet, self.lensnet = GistNet(cfg, d, emb_rms), LensNet(cfg, d, d * (len(layers) + cfg.lens_plan))
        if cfg.gist_predict:  # (off by default: no parameters, and checkpoints without it load as before)
            self.predictor = GistPredictor(d)
        scale = torch.full((cfg.gist_levels + 1,), cfg.sigma_scale)  # per level; deeper levels use the last
        if cfg.rope == "gaussian_learned":
            self.sigma_scale = nn.Parameter(scale)
        else:
            self.register_buffer("sigma_scale", scale * (cfg.rope == "gaussian"))

    def read(self, **kwargs):
        """The base model's forward (GPT.forward's arguments) -> (its outputs, the states LensNet's queries read:
        (B, T, d x len(query_layers)) the residual streams after the blocks cfg.lens_query names, then with lens_plan
        the LOD1 gist the predictor plans after each token (d more); None without lens_query). Forward hooks, so the
        base model's code and cost are unchanged."""
        layers, got, hooks = self.cfg.query_layers, {}, []
        blocks, last = self.gpt.blocks, self.gpt.config.n_layer
        for layer in set(layers) | ({last} if self.cfg.lens_plan else set()):
            keep = lambda *a, layer=layer: got.__setitem__(layer, a[-1] if len(a) == 3 else a[1][0])  # noqa: E731
            hooks.append(blocks[0].register_forward_pre_hook(keep) if layer == 0 else
                         blocks[layer - 1].register_forward_hook(keep))
        try:
            out = self.gpt(**kwargs)
        finally:
            for h in hooks:
                h.remove()
        if not layers:
            return out, None
        plan = [self.predictor.gist(self.gpt.ln_f(got[last]))] if self.cfg.lens_plan else []
        return out, torch.cat([got[v] for v in layers] + plan, -1)

    def embed_tokens(self, ids):
        """Token ids (n,) -> the base model's input embeddings (n, d)."""
        return self.gpt.wte(ids.to(self.gpt.wte.weight.device))

    def make_gists(self, lod: int, x):
        """Children (N, K, d), on any device -> gists (N, d) on the model's device, in the embedding's dtype."""
        p = self.gistnet.levels[0].gain
        return self.gistnet(lod, x.to(p.device, p.dtype)).to(self.gpt.wte.weight.dtype)

    def identity(self) -> str:
        """sha256 over what a tree's contents depend on: the base config, its token embedding, K and GistNet."""
        h = hashlib.sha256(json.dumps([asdict(self.gpt.config), self.cfg.block_k, self.cfg.gist_pool,
                                       self.cfg.gist_proj, self.cfg.gist_shared]).encode())
        tensors = [self.gpt.wte.weight] + [t for _, t in sorted(self.gistnet.state_dict().items())]
        for t in tensors:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
