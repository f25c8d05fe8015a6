"""The MegaContext training stages (DESIGN §4, §5, §9; issues 5 and 9): their losses, labels and evaluations.
train.py owns the loop (data, DDP, optimizer, checkpoints, logs); this file owns what one stage computes on one batch.

    gist (JT1)  base frozen; GistNet learns substitutability in one pass per sequence with pyramidal attention: every
                token position is scored under its own working context (raw tokens within W0, LOD1 gists for W1 blocks,
                LOD2 beyond), loss = KL(p_base(full context) || p(pyramid)), or NLL when the sequence is longer than
                the base's block (long sequences train the long LOD2 runs that long histories produce). W0, W1 random
                per micro-batch, so every distance is trained.
    lens (JT2)  base and GistNet frozen; on-policy labels for a sampled working context (recency pyramid at a random
                budget, sometimes zoomed one level) over a history that, in a share of the contexts, holds a needle
                asked at its end: every legal edit is labelled, by the counterfactual teacher (the summed NLL of the
                scored tokens, the answer or the next `horizon` book tokens, with the edit made) or by the attention
                teacher (the base's attention mass under full context); labels normalised per context; loss = Huber
                regression + pairwise ranking over non-tied pairs; labelled contexts are replayed.
    lora (JT3)  low-rank adapters on the base's qkv projections; task NLL of the next `horizon` tokens under
                allocator-built working contexts, plus `keep_alive` x the gist loss (GistNet keeps training on it).
    predict     base and GistNet frozen; MegaPrediction's heads (predict.py) learn the gists of the next K and K² tokens
                from the base's final states on book text (own stage: the token NLL cannot change), with the centred
                cosine loss; eval: cos per level against the last block's and the mean gist, LOD1 acceptance.

Decisions where DESIGN and the issues are silent:
- An entry's score is the value of its detail (megacontext.py): a zoom label trains a gist's own score (its gain), a
  collapse label the mean score of the group's K members (its loss, positive when collapsing hurts). Only legal
  candidates enter the loss, which is how illegal directions are masked.
- A gist's candidate is its zoom to tokens, not one level: expanding a LOD2 gist pays only once its right child is
  expanded too, and the zoom's label is what the allocator's refocus-until-stable loop reaches (issue 9).
- Labels are summed over the scored tokens (an answer's few tokens carry ~10 nats; averaging them over a long horizon
  buried a needle below the allocator's thresholds) and divided by max(std over the context, lens_label_floor): the
  allocator's tau_expand, hysteresis and tau_collapse are in these units.
- dNLL@H per level (gist eval) uses W0 = horizon, so a scored token has H..H+K-1 raw tokens before the gists, and the
  level of a position is the coarsest level it sees: LOD1 runs with W1 = inf (no LOD2 band), LOD2 runs with W1 = 0.
  The pyramidal kernel has two gist levels, so deeper levels (LOD3.., where the sequence holds one) are measured on
  explicit working contexts instead (`deep_dnll`): at cursor c = T - H + 1, the coarsest tiling of [0, b0) by nodes
  up to that level, then raw tokens [b0, c) with b0 = (c - W0) // K * K, scored over the next H tokens against all
  c tokens raw. The baseline 'mean' replaces GistNet by the plain mean of the children's embeddings (LOD2 = mean of
  LOD1 means, and so on up).
- The pyramid's gist entries are computed under their own pyramid (DESIGN §8.3 approximation).
"""
import contextlib
import math
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import predict
import retrieval
from kernels.pyramid import layout_tensors
from megacontext import FocusAllocator, MegaContextModel, WorkingContext, level_sigma, preview_nodes
from tiling import coarsest_runs
from tree import depth_of, node_types


class Timer:
    """Seconds spent per part (base / gistnet / lensnet / allocator) since the last `pop`; syncs CUDA to be honest."""

    def __init__(self):
        self.total = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, part):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.total[part] += time.perf_counter() - t

    def pop(self) -> dict:
        out = {f"time_{k}": v for k, v in self.total.items()}
        self.total.clear()
        return out


TIMER = Timer()


# ----------------------------------------------------------------------------------------------------------------
# gist (JT1): one forward per sequence with pyramidal attention


def make_gists(mc: MegaContextModel, emb, pool: str = "gist", levels: int | None = None):
    """Token embeddings (B, T, d) -> [LOD1 (B, T//K, d), LOD2 (B, T//K**2, d), ..] of the complete aligned blocks:
    `levels` levels (some maybe empty), or every level with a node (None)."""
    K, (B, T, d) = mc.cfg.K, emb.shape
    out, x = [], emb
    for lod in range(1, (levels or depth_of(T, K)) + 1):
        n = x.shape[1] // K
        children = x[:, :n * K].reshape(B * n, K, d)
        if pool == "mean":
            g = children.mean(1)
        else:
            with TIMER("gistnet"):
                g = mc.gistnet(lod, children)
        x = g.reshape(B, n, d).to(emb.dtype)
        out.append(x)
    return out


def pyramid_meta(mc: MegaContextModel, T: int, n1: int, n2: int, device):
    """The training layout (tokens, LOD1 gists, LOD2 gists): start, end, lod (N,) and positions mu, sigma (N,). In
    make_gists' counts the metadata comes from kernels.pyramid.layout_tensors, built once per (T, K, device), which
    lod_attention recognises without checking it."""
    K = mc.cfg.K
    lod = torch.cat([torch.zeros(T), torch.ones(n1), torch.full((n2,), 2)]).long()
    start = torch.cat([torch.arange(T), torch.arange(n1) * K, torch.arange(n2) * K * K]).long()
    span = K ** lod
    mu = start.double() + (span - 1).double() / 2  # DESIGN §3: a gist sits at its span centre
    sigma = level_sigma(mc.sigma_scale.detach(), lod, span)
    if (n1, n2) == (T // K, T // K**2):
        return [*layout_tensors(T, K, device), mu.to(device), sigma.to(device)]
    return [t.to(device) for t in (start, start + span, lod, mu, sigma)]


def pyramid_logits(mc: MegaContextModel, x, W0: int, W1: int | None, pool: str = "gist"):
    """Logits (B, T, V) of every token position of x (B, T) under its own pyramid, and its LOD0 boundary b0 (T,)."""
    B, T = x.shape
    emb = mc.gpt.wte(x)
    lod1, lod2 = make_gists(mc, emb, pool, levels=2)  # the kernel's two gist levels
    start, end, lod, mu, sigma = pyramid_meta(mc, T, lod1.shape[1], lod2.shape[1], x.device)
    pyr = dict(start=start, end=end, lod=lod, K=mc.cfg.K, W0=W0, W1=W1)
    with TIMER("base"):
        logits, _ = mc.gpt(embeds=torch.cat([emb, lod1, lod2], 1), mu=mu, sigma=sigma, pyramid=pyr)
    c = torch.arange(T, device=x.device)
    b0 = ((c - W0).div(mc.cfg.K, rounding_mode="floor") * mc.cfg.K).clamp_min(0)
    b1 = b0 if W1 == 0 else torch.zeros_like(b0) if W1 is None else (
        (b0 - W1 * mc.cfg.K).div(mc.cfg.K ** 2, rounding_mode="floor") * mc.cfg.K ** 2).clamp_min(0)
    return logits[:, :T], b0, b1


def nll(logits, y):
    """Per-position NLL (B, T); 0 where y is -1 (no target: a retrieval drill's needle contents)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none").view(y.shape)


def gist_loss(mc: MegaContextModel, x, y, cfg, gen: torch.Generator, teacher_fits: bool):
    """JT1 on one micro-batch: KL to the full-context distribution (or NLL) at the positions that see a gist."""
    K = cfg.block_k
    W0 = K * int(torch.randint(1, max(1, cfg.gist_w0_max // K) + 1, (), generator=gen))
    W1 = int(torch.randint(0, cfg.gist_w1_max + 1, (), generator=gen))
    logits, b0, _ = pyramid_logits(mc, x, W0, W1)
    seen = b0 > 0  # positions whose working context holds at least one gist (the others equal the base exactly)
    if not bool(seen.any()):
        return logits.sum() * 0, {}
    logp = F.log_softmax(logits[:, seen].float(), -1)
    if not teacher_fits:  # longer than the base's block: its full-context distribution is no teacher there
        return F.nll_loss(logp.flatten(0, 1), y[:, seen].flatten(), ignore_index=-1), {}
    with torch.no_grad(), TIMER("base"):
        full, _ = mc.gpt(x)  # the base model's full-context distribution: the teacher
    full = full[:, seen].float()
    scored = y[:, seen] >= 0
    stats = {"dnll": (nll(logits[:, seen], y[:, seen]) - nll(full, y[:, seen]))[scored].mean().detach()}
    pt = F.log_softmax(full, -1)
    return (pt.exp() * (pt - logp)).sum(-1).mean(), stats


@torch.no_grad()
def gist_eval(mc: MegaContextModel, x, y, cfg) -> dict:
    """dNLL@H per level (GistNet and mean pooling) on one batch, as sums and counts: W0 = horizon, and the coarsest
    level seen is LOD1 (W1 = inf) or LOD2 (W1 = 0). Within the base's block only, where its full-context NLL is the
    reference; positions without a target (-1) are not counted. Levels beyond the kernel's (deep_dnll) need longer
    sequences and read the whole of x: their reference is x raw, past the base's block when x is longer."""
    whole = (x, y)
    x, y = x[:, :mc.gpt.config.block_size], y[:, :mc.gpt.config.block_size]
    full, _ = mc.gpt(x)
    base = nll(full, y)
    out = {}
    for level, W1 in ((1, None), (2, 0)):
        for pool in ("gist", "mean"):
            logits, b0, b1 = pyramid_logits(mc, x, cfg.horizon, W1, pool)
            at = ((b0 > 0) if level == 1 else (b1 > 0))[None] & (y >= 0)
            d = (nll(logits, y) - base)[at]
            out[f"dnll_lod{level}_{pool}"] = (d.sum().item(), d.numel())
            if level == 1 and pool == "gist":
                n = nll(logits, y)[at]
                out["val_loss"] = (n.sum().item(), n.numel())
    for pool in ("gist", "mean"):  # levels the kernel does not have, where the sequence holds one
        out.update(deep_dnll(mc, *whole, cfg, None, pool))
    return out


@torch.no_grad()
def deep_dnll(mc: MegaContextModel, x, y, cfg, levels=None, pool: str = "gist") -> dict:
    """dNLL@H at each level of `levels` (default: LOD3 up to the deepest the sequence holds) on explicit working
    contexts, as sums and counts over the scored tokens: per sequence, cursor c = T - H + 1; the context is the
    coarsest tiling of [0, b0) by nodes up to that level, then raw tokens [b0, c) (b0 = (c - W0) // K * K, W0 = H);
    the next H tokens are scored against all c tokens raw."""
    K, H = mc.cfg.K, cfg.horizon
    c = x.shape[1] - H + 1
    b0 = max(0, (c - H) // K * K)
    levels = range(3, depth_of(b0, K) + 1) if levels is None else levels
    out = defaultdict(lambda: [0.0, 0])
    for b in range(x.shape[0] if len(levels) else 0):
        tables = node_tables(mc, mc.gpt.wte(x[b, :c]), pool)
        variants = [(torch.zeros(c, dtype=torch.long), torch.arange(c))]
        for level in levels:
            runs = coarsest_runs(b0, K, level) + [(0, b0, c - b0)]
            variants.append((torch.cat([torch.full((n,), l) for l, _, n in runs]),
                             torch.cat([torch.arange(k, k + n) for _, k, n in runs])))
        losses = horizon_nll(mc, variants, tables, y[b, c - 1:c - 1 + H], c).float().cpu()
        for level, loss in zip(levels, losses[1:]):
            out[f"dnll_lod{level}_{pool}"][0] += (loss - losses[0]).item()  # summed over the H tokens
            out[f"dnll_lod{level}_{pool}"][1] += H
    return {k: tuple(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# working contexts of a history (lens, lora)


def node_tables(mc: MegaContextModel, emb, pool: str = "gist"):
    """[tokens (c, d), LOD1 gists, LOD2 gists, ..] of one history's token embeddings (c, d), GistNet (or mean
    pooling) without grads."""
    with torch.no_grad():
        return [emb] + [g[0] for g in make_gists(mc, emb[None], pool)]


def node_rows(tables, lod, index):
    """Input embeddings (*lod.shape, d) of nodes (lod, index) from the per-level tables of node_tables."""
    flat_lod, flat_index = lod.reshape(-1), index.reshape(-1)
    x = torch.zeros(len(flat_lod), tables[0].shape[-1], dtype=tables[0].dtype, device=tables[0].device)
    for level in range(len(tables)):
        at = flat_lod == level
        x[at.to(x.device)] = tables[level][flat_index[at].to(x.device)]
    return x.view(*lod.shape, -1)


def entry_rows(mc: MegaContextModel, lod, index, tables):
    """Input embeddings (n, d) and positions mu, sigma (n,) of working-context entries (lod, index)."""
    x = node_rows(tables, lod, index)
    span = mc.cfg.K ** lod
    mu = (index * span).double() + (span - 1).double() / 2
    return x, mu, level_sigma(mc.sigma_scale.detach(), lod, span)


def sample_wc(mc: MegaContextModel, cursor: int, gen: torch.Generator) -> WorkingContext:
    """The recency pyramid of [0, cursor) at a random budget in [target/2, target] (the least legal one if larger)."""
    cfg = mc.cfg
    budget = int(torch.randint(cfg.target // 2, cfg.target + 1, (), generator=gen))
    try:
        return WorkingContext.pyramid(cfg.K, cfg.recent_tokens, cfg.w_max, cursor, budget)
    except ValueError:
        return WorkingContext.pyramid(cfg.K, cfg.recent_tokens, cfg.w_max, cursor, cfg.target)


def edited(wc: WorkingContext, kind: str, i: int):
    """(lod, index) of `wc` after one edit (wc is not changed): 'expand' entry i into its K children, 'zoom' entry i
    all the way down to its tokens, or 'collapse' the group of K siblings starting at i into their parent."""
    K, lod, index = wc.K, wc.lod, wc.index
    l, k = int(lod[i]), int(index[i])
    if kind == "collapse":
        return (torch.cat([lod[:i], torch.tensor([l + 1]), lod[i + K:]]),
                torch.cat([index[:i], torch.tensor([k // K]), index[i + K:]]))
    down = 1 if kind == "expand" else l
    n = K**down
    return (torch.cat([lod[:i], torch.full((n,), l - down), lod[i + 1:]]),
            torch.cat([index[:i], k * n + torch.arange(n), index[i + 1:]]))


def horizon_nll(mc: MegaContextModel, variants, tables, future, cursor: int, chunk: int = 32):
    """Summed NLL (R,) of the `future` tokens (H,) after each working context in `variants` [(lod, index)], in
    right-padded batched forwards of `chunk` rows: row = entries, then future[:-1] raw; entry n-1 predicts future[0]."""
    if len(variants) > chunk:
        return torch.cat([horizon_nll(mc, variants[i:i + chunk], tables, future, cursor, chunk)
                          for i in range(0, len(variants), chunk)])
    H = len(future)
    fut_emb, dev = mc.gpt.wte(future[:-1]), future.device
    rows, mus, sigmas, targets = [], [], [], []
    L = max(len(l) for l, _ in variants) + H - 1
    for lod, index in variants:
        x, mu, sigma = entry_rows(mc, lod, index, tables)
        n = len(lod)
        pad = L - n - (H - 1)
        rows.append(torch.cat([x, fut_emb, x.new_zeros(pad, x.shape[1])]))
        mus.append(torch.cat([mu, torch.arange(cursor, cursor + H - 1 + pad).double()]))
        sigmas.append(torch.cat([sigma, torch.zeros(H - 1 + pad)]))
        t = torch.full((L,), -1, dtype=torch.long)
        t[n - 1:n - 1 + H] = future.cpu()
        targets.append(t)
    with TIMER("base"):
        _, loss = mc.gpt(embeds=torch.stack(rows), targets=torch.stack(targets).to(dev), mu=torch.stack(mus).to(dev),
                         sigma=torch.stack(sigmas).to(dev), reduction="none")
    return loss.sum(1)


def lens_features(mc: MegaContextModel, wc: WorkingContext, tables, ids, query=None):
    """LensNet inputs (batch of one): entry embeddings, level, distance to the cursor, span, and each gist's preview:
    with lens_types the token types of its span (ids: the history's token ids; with lens_markers the ids after a
    marker too, lens_margin tokens before each span and one after included) and the token embeddings, else the
    embeddings of the nodes lens_preview levels below it (preview_nodes); with lens_query the newest tokens' states
    (query_states) and their ids."""
    x = node_rows(tables, wc.lod, wc.index)
    dev, cfg = x.device, mc.cfg
    feats = (x[None], wc.lod[None].to(dev), (wc.cursor - wc.end)[None].to(dev), (wc.K ** wc.lod)[None].to(dev))
    if cfg.lens_types:
        ids = ids.cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
        types = node_types(lambda i: ids[i], wc.lod.numpy(), wc.index.numpy(), wc.K, mc.gpt.config.vocab_size,
                           cfg.lens_markers, cfg.lens_margin, end=wc.cursor)
        query_ids = None
        if query is not None:  # the ids of the newest lens_tail tokens, whose states query came from
            tok = wc.index[wc.lod == 0][-query.shape[1]:]
            query_ids = torch.as_tensor(ids[tok.numpy()])[None]
        return feats + (None, torch.from_numpy(types)[None].to(dev), mc.gpt.wte.weight, query, query_ids)
    children = node_rows(tables, *preview_nodes(wc.lod, wc.index, wc.K, cfg.lens_preview))
    return feats + (children[None],)


@torch.no_grad()
def query_states(mc: MegaContextModel, wc: WorkingContext, tables):
    """(1, Tq, D) the base's residual streams (lens_query's layers) of the newest lens_tail tokens, read over the
    working context wc as a session's decode reads it; None without lens_query."""
    if not mc.cfg.query_layers:
        return None
    x, mu, sigma = entry_rows(mc, wc.lod, wc.index, tables)
    dev = x.device
    _, states = mc.read(embeds=x[None], mu=mu[None].to(dev), sigma=sigma[None].to(dev), last_only=True)
    return states[:, (wc.lod == 0).to(dev)][:, -mc.cfg.lens_tail:].float()


# ----------------------------------------------------------------------------------------------------------------
# lens (JT2)


def candidates(wc: WorkingContext):
    """Every legal edit [(kind, i)]: each gist zoomed to its tokens ('zoom': the credit of a coarse gist is that of the
    zoom it starts) and each group of K siblings that may collapse ('collapse')."""
    return ([("zoom", int(i)) for i in (wc.lod > 0).nonzero().flatten()] +
            [("collapse", int(i)) for i in wc.group_starts()])


def counterfactual_labels(wc: WorkingContext, cands, nll_fn):
    """Raw labels (nats, summed over the scored tokens) of each candidate: a zoom's gain NLL(WC) - NLL(zoomed), a
    collapse's loss NLL(collapsed) - NLL(WC). nll_fn([(lod, index)]) -> summed NLL (R,) of each variant."""
    losses = nll_fn([(wc.lod, wc.index)] + [edited(wc, kind, i) for kind, i in cands]).float().cpu()
    sign = torch.tensor([1.0 if kind == "zoom" else -1.0 for kind, _ in cands])
    return sign * (losses[0] - losses[1:])


def attention_labels(wc: WorkingContext, cands, mass):
    """Raw labels of the cheaper teacher (DeepSeek-V3.2's indexer): the base model's attention mass, under full
    context, from the scored tokens onto each candidate's span (mass: (cursor,) per history token)."""
    csum = torch.cat([torch.zeros(1), mass.float().cpu().cumsum(0)])
    span = lambda i, n: float(csum[wc.end[i + n - 1]] - csum[wc.start[i]])  # noqa: E731
    return torch.tensor([span(i, 1 if kind == "zoom" else wc.K) for kind, i in cands])


ORACLE_UNIT = 3.0  # the oracle teacher's label of a candidate that holds a needle, in allocator units (> tau_expand +
# hysteresis: a zoom it makes pays for a paired collapse)


def holds(wc: WorkingContext, i: int, n: int, spans) -> bool:
    """Whether entries i..i+n-1 of wc cover a token of any needle span [(start, length)]."""
    a, b = int(wc.start[i]), int(wc.end[i + n - 1])
    return any(a < s + length and s < b for s, length in spans)


def oracle_labels(wc: WorkingContext, cands, spans):
    """Labels, in allocator units, of the imitation teacher: the oracle's zoom path (bench/longctx.oracle_scorer) on a
    drill. A zoom of a gist that holds a token of a needle the answer needs earns ORACLE_UNIT, and so costs a
    collapse of a group that holds one; everything else 0. (Book text has no oracle path: the teacher labels those
    contexts counterfactually, lens_contexts.)"""
    K = wc.K
    return torch.tensor([ORACLE_UNIT * holds(wc, i, 1 if kind == "zoom" else K, spans) for kind, i in cands])


def normalise(raw, floor: float):
    """Labels in the allocator's units: raw / max(std over the context's candidates, floor). A needle's zoom stands
    out by many units, while in a context where nothing matters (all |raw| << floor) every label stays near 0."""
    return raw / max(float(raw.std()) if len(raw) > 1 else 0.0, floor)


def candidate_scores(scores, cands, K):
    """The score each candidate is judged by: the entry's own for a zoom (its gain), its group's mean for a collapse
    (its loss; the allocator collapses the lowest)."""
    return torch.stack([scores[i] if kind == "zoom" else scores[i:i + K].mean() for kind, i in cands])


def lens_loss_terms(pred, label, rank_weight: float, margin: float = 0.5):
    """Huber regression to the normalised labels plus a pairwise logistic term over the pairs of candidates of the
    same kind whose labels differ by more than `margin` units (closer pairs are ties and carry no ranking signal)."""
    reg = F.huber_loss(pred, label)
    pairs = (label[:, None] - label[None, :]) > margin  # i should outrank j
    rank = F.softplus(-(pred[:, None] - pred[None, :]))[pairs].mean() if bool(pairs.any()) else pred.sum() * 0
    return reg + rank_weight * rank, reg, rank


def spearman(a, b) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / den if den > 0 else float("nan")


def lens_prompt(x_row, cfg, rng: np.random.Generator, needles):
    """One lens example from the book window x_row (T + 1,): (history ids, scored ids, needle spans [(start, length)]
    the answer needs, or []), the history max(T/4, 2 w_max)..T tokens long. A share cfg.lens_retrieval holds a task
    of cfg.retrieval_tasks (retrieval.py: its needles beyond the newest w_max + recent tokens, look-alikes anywhere),
    asked at the history's end, and scores its answer; the rest scores the `horizon` book tokens after the history."""
    n = int(rng.integers(min(len(x_row), max(len(x_row) // 4, 2 * cfg.w_max)), len(x_row) + 1))
    x_row = x_row[len(x_row) - n:]
    if rng.random() >= cfg.lens_retrieval:
        return x_row[:n - cfg.horizon], x_row[n - cfg.horizon:], []
    tasks = [t for t in cfg.retrieval_tasks.split(",") if t]
    task = tasks[int(rng.integers(len(tasks)))]
    reach = (cfg.w_max + cfg.recent_tokens + 16) / n  # the needles sit before the newest w_max + tail tokens
    p = retrieval.make_prompt(x_row, needles, task, n - 16, rng.uniform(0, max(0.0, 1 - reach)), rng)  # answers <= 16
    return p["ids"], np.asarray(p["answer"]), p["needles"]


def sample_lens_wc(mc: MegaContextModel, cursor: int, spans, rng: np.random.Generator, gen):
    """A recency pyramid at a random budget (sample_wc), half the time zoomed one level at one coarse gist (one that
    holds a needle, if any, two times in three), so LensNet also sees the states on the way down to a needle."""
    wc = sample_wc(mc, cursor, gen)
    coarse = (wc.lod >= 2).nonzero().flatten()
    if len(coarse) and rng.random() < 0.5:
        hit = [int(i) for i in coarse if holds(wc, int(i), 1, spans)]
        i = hit[int(rng.integers(len(hit)))] if hit and rng.random() < 2 / 3 else int(coarse[rng.integers(len(coarse))])
        wc.expand(i)
    return wc


@torch.no_grad()
def attention_mass(gpt, ids, scored: int):
    """Attention mass (len(ids) - scored,) of the last `scored` query positions of `ids` onto each earlier token,
    averaged over layers and heads, under full context (one forward with attention probabilities kept)."""
    masses = []

    def keep(module, args, out):
        x, mu, sigma = args[:3]
        B, T, C = x.shape
        q, k, _ = module.c_attn(x).view(B, T, 3, module.n_head, module.head_dim).unbind(2)
        q, k = module.rotate(module.q_norm(q), module.k_norm(k), mu, sigma)
        att = torch.einsum("bqhd,bkhd->bhqk", q[:, -scored - 1:-1], k) / module.head_dim**0.5
        rows = torch.arange(T - scored - 1, T - 1, device=x.device)
        causal = torch.arange(T, device=x.device)[None, :] <= rows[:, None]
        masses.append(att.masked_fill(~causal, -math.inf).softmax(-1)[0].sum(1).mean(0))  # (T,)
    hooks = [b.attn.register_forward_hook(keep) for b in gpt.blocks]
    try:
        gpt(torch.as_tensor(ids, device=gpt.wte.weight.device)[None])
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(masses).mean(0)[:len(ids) - scored]


def lens_contexts(mc, x, y, cfg, gen):
    """Yield (wc, tables, token ids, candidates, labels in allocator units, needle spans, raw labels, the question's
    states (query_states)) per window of the batch (lens_prompt), labelled by cfg.lens_teacher."""
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=gen)))
    rows = torch.cat([x, y[:, -1:]], 1).cpu().numpy()
    for row in rows:
        ids, scored, spans = lens_prompt(row, cfg, rng, retrieval.needles_for(cfg.data_dir))
        c, future = len(ids), torch.as_tensor(scored, device=x.device)  # a question is the history's end
        tables = node_tables(mc, mc.gpt.wte(torch.as_tensor(ids, device=x.device)))
        wc = sample_lens_wc(mc, c, spans, rng, gen)
        cands = candidates(wc)
        if not cands:
            continue
        with torch.no_grad():
            if cfg.lens_teacher == "attention":
                raw = attention_labels(wc, cands, attention_mass(mc.gpt, np.concatenate([ids, scored]), len(scored)))
            elif cfg.lens_teacher == "oracle" and spans:
                raw = oracle_labels(wc, cands, spans)
            else:  # (the oracle has no zoom path on book text: there the counterfactual labels teach)
                raw = counterfactual_labels(wc, cands, lambda v: horizon_nll(mc, v, tables, future, c))
        labels = raw if cfg.lens_teacher == "oracle" and spans else normalise(raw, cfg.lens_label_floor)
        yield wc, tables, ids, cands, labels.to(x.device), spans, raw, query_states(mc, wc, tables)


def attention_kl(pred, raw, cands):
    """DSA's indexer loss for the attention teacher: KL(p || softmax(scores)) over the zoom candidates, p the base's
    attention mass on each candidate's span, normalised (0 without two zooms or without mass)."""
    zooms = [j for j, (kind, _) in enumerate(cands) if kind == "zoom"]
    mass = raw[zooms].clamp(min=0)
    if len(zooms) < 2 or float(mass.sum()) <= 0:
        return pred.sum() * 0
    p = (mass / mass.sum()).to(pred.device)
    return (p * (torch.log(p.clamp(min=1e-12)) - F.log_softmax(pred[zooms], 0))).sum()


def lens_loss(mc: MegaContextModel, x, y, cfg, gen, replay: list):
    """LensNet's loss on the batch's freshly labelled contexts plus cfg.lens_replay earlier ones from `replay` (the
    newest cfg.lens_buffer, kept as LensNet inputs): a label costs a base forward per candidate, a LensNet pass is
    cheap, so each label is learned from several times. (The buffer is not checkpointed: after a resume it refills.)
    The attention teacher adds attention_kl to the regression and ranking terms."""
    fresh, raw_stats = [], defaultdict(list)
    for wc, tables, ids, cands, labels, _, raw, query in lens_contexts(mc, x, y, cfg, gen):
        fresh.append((lens_features(mc, wc, tables, ids, query), cands, labels, raw))
        for k, v in label_stats(raw).items():
            raw_stats[k].append(v)
    pick = torch.randperm(len(replay), generator=gen)[:cfg.lens_replay].tolist() if replay else []
    batch = fresh + [replay[i] for i in pick]
    replay.extend(fresh)
    del replay[:-cfg.lens_buffer]
    losses, stats = [], defaultdict(list)
    for feats, cands, labels, raw in batch:
        with TIMER("lensnet"):
            scores = mc.lensnet(*feats)[0]
        pred = candidate_scores(scores, cands, mc.cfg.K)
        loss, reg, rank = lens_loss_terms(pred, labels, cfg.lens_rank_weight)
        if cfg.lens_teacher == "attention":
            kl = attention_kl(pred, raw, cands)
            loss = loss + kl
            stats["lens_kl"].append(kl.detach())
        losses.append(loss)
        stats["lens_reg"].append(reg.detach())
        stats["lens_rank"].append(rank.detach())
        stats["label_max"].append(labels.max())
    if not losses:
        return sum(p.sum() * 0 for p in mc.lensnet.parameters()), {}
    stats = {k: torch.stack(v).mean() for k, v in stats.items()}
    return torch.stack(losses).mean(), {**stats, **{k: torch.tensor(sum(v) / len(v)) for k, v in raw_stats.items()}}


def label_stats(raw) -> dict:
    """The raw labels of one context (nats for the counterfactual teacher, attention mass for the other): mean,
    spread and the share that is positive (a zoom that helps, a collapse that costs)."""
    raw = raw.float()
    return {"label_mean": float(raw.mean()), "label_std": float(raw.std()) if len(raw) > 1 else 0.0,
            "label_pos": float((raw > 0).float().mean())}


@torch.no_grad()
def lens_eval(mc: MegaContextModel, x, y, cfg, gen) -> dict:
    """Per held-out context: Spearman rank correlation of scores and labels, the loss, and, where a task was planted,
    whether the best-scored zoom holds one of its needles (lens_needle_top1); the raw labels' label_stats."""
    out = defaultdict(lambda: [0.0, 0])
    for wc, tables, ids, cands, labels, spans, raw, query in lens_contexts(mc, x, y, cfg, gen):
        pred = candidate_scores(mc.lensnet(*lens_features(mc, wc, tables, ids, query))[0], cands, wc.K)
        loss, _, _ = lens_loss_terms(pred, labels, cfg.lens_rank_weight)
        metrics = {"lens_spearman": spearman(pred.cpu(), labels.cpu()), "val_loss": loss.item(), **label_stats(raw)}
        zooms = [j for j, (kind, _) in enumerate(cands) if kind == "zoom"]
        holder = {j for j in zooms if holds(wc, cands[j][1], 1, spans)}
        if holder:
            metrics["lens_needle_top1"] = float(zooms[int(pred[zooms].argmax())] in holder)
            metrics["label_needle_top1"] = float(zooms[int(labels[zooms].argmax())] in holder)
        for key, v in metrics.items():
            if not math.isnan(v):
                out[key][0] += v
                out[key][1] += 1
    return {k: tuple(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# lora (JT3)


def allocator_wc(mc: MegaContextModel, cursor: int, tables, ids, gen, telemetry=None):
    """A recency pyramid at a random budget, refocused once by the allocator with (frozen) LensNet scores; the
    allocator's step telemetry (swap rate, utilisation, ...) is appended to `telemetry` when given."""
    wc = sample_wc(mc, cursor, gen)
    with torch.no_grad(), TIMER("lensnet"):
        scores = mc.lensnet(*lens_features(mc, wc, tables, ids, query_states(mc, wc, tables)))[0].cpu()
    with TIMER("allocator"):
        t = FocusAllocator(mc.cfg).step(wc, scores)
    if telemetry is not None:
        telemetry.append(t)
    return wc


def lora_loss(mc: MegaContextModel, x, y, cfg, gen, teacher_fits: bool):
    """Task NLL of the next `horizon` tokens under allocator-built working contexts + keep_alive x gist loss."""
    c = x.shape[1] - cfg.horizon + 1
    task, tel = [], []
    for b in range(x.shape[0]):
        tables = node_tables(mc, mc.gpt.wte(x[b, :c]).detach())
        wc = allocator_wc(mc, c, tables, x[b, :c], gen, tel)
        task.append(horizon_nll(mc, [(wc.lod, wc.index)], tables, y[b, c - 1:c - 1 + cfg.horizon], c)[0] / cfg.horizon)
    task = torch.stack(task).mean()
    keep, stats = gist_loss(mc, x, y, cfg, gen, teacher_fits) if cfg.keep_alive > 0 else (task * 0, {})
    alloc = {f"alloc_{k}": sum(t[k] for t in tel) / len(tel) for k in ("swap_rate", "utilisation", "edits")}
    return task + cfg.keep_alive * keep, {"task_nll": task.detach(), "keep_alive_loss": keep.detach(), **stats,
                                          **alloc}


@torch.no_grad()
def lora_eval(mc: MegaContextModel, x, y, cfg, gen) -> dict:
    c = x.shape[1] - cfg.horizon + 1
    total = 0.0
    for b in range(x.shape[0]):
        tables = node_tables(mc, mc.gpt.wte(x[b, :c]))
        wc = allocator_wc(mc, c, tables, x[b, :c], gen)
        future = y[b, c - 1:c - 1 + cfg.horizon]
        total += horizon_nll(mc, [(wc.lod, wc.index)], tables, future, c)[0].item() / cfg.horizon
    return {"val_loss": (total, x.shape[0])}


# ----------------------------------------------------------------------------------------------------------------
# predict (MegaPrediction heads, issue 19)


def predict_pairs(mc: MegaContextModel, x, cfg):
    """([per level (states, targets, previous gists, window, block)], [per level the block gists (B, n, d)]) of one
    batch (predict.pairs): the frozen base's final states over x and the frozen GistNet's gists of its aligned blocks,
    without gradients."""
    K = cfg.block_k
    with torch.no_grad(), TIMER("base"):
        h = predict.final_states(mc.gpt, x)
        gists = predict.block_gists(mc.make_gists, mc.embed_tokens(x), K)
    return [predict.pairs(h, gists[lod - 1], K, lod) for lod in (1, 2)], gists


def heads_loss(heads, levels, cfg):
    """predict.loss of the heads on predict_pairs' levels, around the heads' centres, with cfg.predict_alphas."""
    out = [heads(states)[:, lod] for lod, (states, *_) in enumerate(levels)]
    alphas = [float(v) for v in cfg.predict_alphas.split(",")]
    return predict.loss(out, [target for _, target, *_ in levels], alphas, list(heads.center))


def predict_loss(mc: MegaContextModel, x, y, cfg):
    """The heads' loss on one micro-batch: sum_l alpha_l (1 - cos) around each level's mean gist (predict.loss).
    The centre and length (the gists' mean distance from it) are the heads' buffers, running means over the batches
    (the first batch sets them): what GistPredictor.gist turns the heads' direction into a gist with."""
    levels, _ = predict_pairs(mc, x, cfg)
    heads = mc.predictor
    with torch.no_grad():
        for lod, (_, target, *_) in enumerate(levels):
            first = not bool(heads.rho[lod])
            heads.center[lod].lerp_(target.float().mean(0), 1.0 if first else 0.01)
            rho = (target.float() - heads.center[lod]).norm(dim=-1).mean()
            heads.rho[lod].lerp_(rho, 1.0 if first else 0.01)
    cos = predict.cos(heads.gist(levels[0][0]), levels[0][1]).mean().detach()
    return heads_loss(heads, levels, cfg), {"cos_lod1": cos}


@torch.no_grad()
def predict_eval(mc: MegaContextModel, x, y, cfg, gen) -> dict:
    """Per level: cos(predicted gist, true gist) and the two baselines' (the last complete block's gist, the mean
    gist: the heads' centre); LOD1's speculative acceptance among the true block and 7 others of the same window; the
    loss as val_loss. Sums and counts."""
    levels, gists = predict_pairs(mc, x, cfg)
    heads = mc.predictor
    n = len(levels[0][0])
    acc = {"val_loss": (float(heads_loss(heads, levels, cfg)) * n, n)}
    for lod, (states, target, prev, win, j) in enumerate(levels, 1):
        pred = heads.gist(states, lod)
        guesses = [("", pred), ("_last_block", prev)]
        if heads.rho[lod - 1]:  # the mean gist, once a training batch has set it
            guesses.append(("_mean_gist", heads.center[lod - 1].expand_as(target)))
        for name, guess in guesses:
            c = predict.cos(guess, target)
            acc[f"cos_lod{lod}{name}"] = (float(c.sum()), len(c))
    states, _, prev, win, j = levels[0]
    cpu = torch.Generator().manual_seed(int(torch.randint(2**31, (), generator=gen)))
    for name, guess in (("", heads.gist(states)), ("_last_block", prev)):
        hits = predict.acceptance(guess.cpu(), gists[0].cpu(), win, j, 7, cpu)
        acc[f"acceptance{name}"] = (hits * len(guess), len(guess))
    return acc


# ----------------------------------------------------------------------------------------------------------------
# the module DDP wraps


class StageModel(nn.Module):
    """What DDP wraps for the MegaContext stages: the one root MegaContextModel (`self.mc`) and the stage loss as its
    forward, so every trained parameter (GistNet, LensNet, LoRA) syncs in one bucket set."""

    def __init__(self, mc: MegaContextModel, cfg, teacher_fits: bool):
        super().__init__()
        self.mc, self.cfg, self.teacher_fits = mc, cfg, teacher_fits
        self.replay = []  # lens: labelled contexts that later steps learn from again (lens_loss)

    def forward(self, x, y, gen, stage):
        if stage == "gist":
            loss, stats = gist_loss(self.mc, x, y, self.cfg, gen, self.teacher_fits)
        elif stage == "lens":
            loss, stats = lens_loss(self.mc, x, y, self.cfg, gen, self.replay)
        elif stage == "predict":
            loss, stats = predict_loss(self.mc, x, y, self.cfg)
        else:
            loss, stats = lora_loss(self.mc, x, y, self.cfg, gen, self.teacher_fits)
        # every trained parameter joins the graph (a zero term), so a batch that does not reach one (no position sees
        # a LOD2 gist, no legal candidate) still gives it a gradient: DDP needs no find_unused_parameters
        return loss + 0.0 * sum(p.view(-1)[0] for p in self.parameters() if p.requires_grad), stats


TRAINED = {  # stage -> the root's parameters it trains (names start with these); everything else is frozen
    "gist": ("gistnet.",),
    "lens": ("lensnet.",),
    "lora": ("gpt.blocks.", "gistnet."),  # under gpt.blocks only the adapters (lora_a, lora_b)
    "predict": ("predictor.",),
}


def set_trainable(mc: MegaContextModel, stage: str):
    """Freeze everything but the stage's parameters (and learned sigma scales in gist/lora); returns their names."""
    names = []
    for name, p in mc.named_parameters():
        train = name.startswith(TRAINED[stage]) or (name == "sigma_scale" and stage != "lens")
        if name.startswith("gpt."):
            train = stage == "lora" and (".lora_a" in name or ".lora_b" in name)
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def evaluate(stage_model: StageModel, stage: str, batches) -> dict:
    """Sums and counts of each metric over `batches` [(x, y, gen)]: {name: (sum, count)} (a metric may be missing
    where nothing was countable, e.g. Spearman over < 2 candidates)."""
    mc, cfg = stage_model.mc, stage_model.cfg
    acc = defaultdict(lambda: [0.0, 0])
    mc.eval()
    for x, y, gen in batches:
        part = (gist_eval(mc, x, y, cfg) if stage == "gist" else lens_eval(mc, x, y, cfg, gen) if stage == "lens"
                else predict_eval(mc, x, y, cfg, gen) if stage == "predict" else lora_eval(mc, x, y, cfg, gen))
        for k, (s, n) in part.items():
            acc[k][0] += s
            acc[k][1] += n
    mc.train()
    return {k: tuple(v) for k, v in acc.items()}
