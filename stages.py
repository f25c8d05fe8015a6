"""The MegaContext training stages (DESIGN §4, §5, §9; issue 5): their losses, labels and evaluations. train.py owns
the loop (data, DDP, optimizer, checkpoints, logs); this file owns what one stage computes on one batch.

    gist (JT1)  base frozen; GistNet learns substitutability in one pass per sequence with pyramidal attention: every
                token position is scored under its own working context (raw tokens within W0, LOD1 gists for W1 blocks,
                LOD2 beyond), loss = KL(p_base(full context) || p(pyramid)), or NLL when the sequence is longer than
                the base's context. W0, W1 random per micro-batch, so every distance is trained.
    lens (JT2)  base and GistNet frozen; on-policy counterfactual labels: for a sampled working context (recency
                pyramid with a random budget) the change of NLL over the next `horizon` tokens when one gist is
                expanded or one sibling group collapsed, over K-1 entries of cost; loss = regression + pairwise rank.
    lora (JT3)  low-rank adapters on the base's qkv projections; task NLL of the next `horizon` tokens under
                allocator-built working contexts, plus `keep_alive` x the gist loss (GistNet keeps training on it).

Decisions where DESIGN and the issue are silent:
- One score per entry serves both directions (megacontext.py): an expansion label trains the entry's score, a collapse
  label trains the mean score of the group's K members (what the allocator compares). Only legal candidates enter
  the loss, which is how illegal directions are masked (clamping as mask_scores does would kill their gradient).
- Both label kinds are (NLL(WC) - NLL(variant)) / (K - 1): expand > 0 helps, collapse < 0 hurts.
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

import torch
import torch.nn as nn
import torch.nn.functional as F

from megacontext import FocusAllocator, MegaContextModel, WorkingContext, level_sigma, mask_scores
from tiling import coarsest_runs
from tree import depth_of


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
    """The training layout (tokens, LOD1 gists, LOD2 gists): start, end, lod (N,) and positions mu, sigma (N,)."""
    K = mc.cfg.K
    lod = torch.cat([torch.zeros(T), torch.ones(n1), torch.full((n2,), 2)]).long()
    start = torch.cat([torch.arange(T), torch.arange(n1) * K, torch.arange(n2) * K * K]).long()
    span = K ** lod
    mu = start.double() + (span - 1).double() / 2  # DESIGN §3: a gist sits at its span centre
    sigma = level_sigma(mc.sigma_scale.detach(), lod, span)
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
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)


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
    with torch.no_grad(), TIMER("base"):
        full, _ = mc.gpt(x)  # the base model's full-context distribution: the teacher
    full = full[:, seen].float()
    stats = {"dnll": (nll(logits[:, seen], y[:, seen]) - nll(full, y[:, seen])).mean().detach()}
    if teacher_fits:
        pt = F.log_softmax(full, -1)
        loss = (pt.exp() * (pt - logp)).sum(-1).mean()
    else:
        loss = F.nll_loss(logp.flatten(0, 1), y[:, seen].flatten())
    return loss, stats


@torch.no_grad()
def gist_eval(mc: MegaContextModel, x, y, cfg) -> dict:
    """dNLL@H per level (GistNet and mean pooling) on one batch, as sums and counts: W0 = horizon, and the coarsest
    level seen is LOD1 (W1 = inf) or LOD2 (W1 = 0)."""
    full, _ = mc.gpt(x)
    base = nll(full, y)
    out = {}
    for level, W1 in ((1, None), (2, 0)):
        for pool in ("gist", "mean"):
            logits, b0, b1 = pyramid_logits(mc, x, cfg.horizon, W1, pool)
            at = (b0 > 0) if level == 1 else (b1 > 0)
            d = (nll(logits, y) - base)[:, at]
            out[f"dnll_lod{level}_{pool}"] = (d.sum().item(), d.numel())
            if level == 1 and pool == "gist":
                n = nll(logits, y)[:, at]
                out["val_loss"] = (n.sum().item(), n.numel())
    for pool in ("gist", "mean"):  # levels the kernel does not have, where the sequence holds one
        out.update(deep_dnll(mc, x, y, cfg, None, pool))
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
            out[f"dnll_lod{level}_{pool}"][0] += (loss - losses[0]).item() * H
            out[f"dnll_lod{level}_{pool}"][1] += H
    return {k: tuple(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# working contexts of a history (lens, lora)


def node_tables(mc: MegaContextModel, emb, pool: str = "gist"):
    """[tokens (c, d), LOD1 gists, LOD2 gists, ..] of one history's token embeddings (c, d), GistNet (or mean
    pooling) without grads."""
    with torch.no_grad():
        return [emb] + [g[0] for g in make_gists(mc, emb[None], pool)]


def entry_rows(mc: MegaContextModel, lod, index, tables):
    """Input embeddings (n, d) and positions mu, sigma (n,) of working-context entries (lod, index)."""
    x = torch.zeros(len(lod), tables[0].shape[-1], dtype=tables[0].dtype, device=tables[0].device)
    for level in range(len(tables)):
        at = lod == level
        x[at.to(x.device)] = tables[level][index[at].to(x.device)]
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
    """(lod, index) of `wc` after expanding entry i or collapsing the group starting at i (wc is not changed)."""
    K, lod, index = wc.K, wc.lod, wc.index
    if kind == "expand":
        l, k = int(lod[i]), int(index[i])
        return (torch.cat([lod[:i], torch.full((K,), l - 1), lod[i + 1:]]),
                torch.cat([index[:i], k * K + torch.arange(K), index[i + 1:]]))
    l, k = int(lod[i]), int(index[i])
    return torch.cat([lod[:i], torch.tensor([l + 1]), lod[i + K:]]), torch.cat([index[:i], torch.tensor([k // K]),
                                                                                index[i + K:]])


def horizon_nll(mc: MegaContextModel, variants, tables, future, cursor: int):
    """Mean NLL (R,) of the `future` tokens (H,) after each working context in `variants` [(lod, index)], in one
    right-padded batched forward: row = entries, then future[:-1] as raw tokens; entry n-1 predicts future[0]."""
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
    return loss.sum(1) / H


def lens_features(wc: WorkingContext, x):
    """LensNet inputs (batch of one): entry embeddings, level, distance to the cursor, span."""
    dev = x.device
    return x[None], wc.lod[None].to(dev), (wc.cursor - wc.end)[None].to(dev), (wc.K ** wc.lod)[None].to(dev)


# ----------------------------------------------------------------------------------------------------------------
# lens (JT2)


def lens_labels(wc: WorkingContext, nll_fn, n_cand: int, gen: torch.Generator):
    """Candidates [(kind, i)] (legal expansions and group collapses, at most n_cand, sampled) and their labels
    (NLL(WC) - NLL(variant)) / (K - 1); nll_fn([(lod, index)]) -> mean horizon NLL (R,) of each variant."""
    expands = [("expand", int(i)) for i in (wc.lod > 0).nonzero().flatten()]
    collapses = [("collapse", int(i)) for i in wc.group_starts()]
    cands = expands + collapses
    if len(cands) > n_cand:
        cands = [cands[i] for i in torch.randperm(len(cands), generator=gen)[:n_cand].tolist()]
    if not cands:
        return [], torch.zeros(0)
    losses = nll_fn([(wc.lod, wc.index)] + [edited(wc, kind, i) for kind, i in cands]).float()
    return cands, (losses[0] - losses[1:]) / (wc.K - 1)


def candidate_scores(scores, cands, K):
    """The score each candidate is judged by: the entry's own for an expansion, its group's mean for a collapse."""
    return torch.stack([scores[i] if kind == "expand" else scores[i:i + K].mean() for kind, i in cands])


def lens_loss_terms(pred, label, rank_weight: float):
    """Regression to the labels plus a pairwise logistic ranking term over the candidates of one context."""
    reg = F.mse_loss(pred, label)
    diff = label[:, None] - label[None, :]
    pairs = diff > 1e-6  # i should outrank j
    rank = F.softplus(-(pred[:, None] - pred[None, :]))[pairs].mean() if bool(pairs.any()) else pred.sum() * 0
    return reg + rank_weight * rank, reg, rank


def spearman(a, b) -> float:
    if len(a) < 2:
        return float("nan")
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / den if den > 0 else float("nan")


def lens_contexts(mc, x, y, cfg, gen):
    """Yield (wc, tables, candidates, labels) per sequence: history x[:c], future y[c-1:c-1+H] = x[c:c+H]."""
    c = x.shape[1] - cfg.horizon + 1
    for b in range(x.shape[0]):
        tables = node_tables(mc, mc.gpt.wte(x[b, :c]))
        wc = sample_wc(mc, c, gen)
        future = y[b, c - 1:c - 1 + cfg.horizon]
        with torch.no_grad():
            cands, labels = lens_labels(wc, lambda v: horizon_nll(mc, v, tables, future, c), cfg.lens_candidates, gen)
        yield wc, tables, cands, labels.to(x.device)


def lens_loss(mc: MegaContextModel, x, y, cfg, gen):
    losses, stats = [], defaultdict(list)
    for wc, tables, cands, labels in lens_contexts(mc, x, y, cfg, gen):
        if not cands:
            continue
        ex, _, _ = entry_rows(mc, wc.lod, wc.index, tables)
        with TIMER("lensnet"):
            scores = mc.lensnet(*lens_features(wc, ex))[0]
        pred = candidate_scores(scores, cands, wc.K)
        loss, reg, rank = lens_loss_terms(pred, labels, cfg.lens_rank_weight)
        losses.append(loss)
        stats["lens_reg"].append(reg.detach())
        stats["lens_rank"].append(rank.detach())
        stats["label_mean"].append(labels.mean())
        stats["label_pos"].append((labels > 0).float().mean())
    if not losses:
        return sum(p.sum() * 0 for p in mc.lensnet.parameters()), {}
    return torch.stack(losses).mean(), {k: torch.stack(v).mean() for k, v in stats.items()}


@torch.no_grad()
def lens_eval(mc: MegaContextModel, x, y, cfg, gen) -> dict:
    """Spearman rank correlation between LensNet scores and labels per held-out context, and label statistics."""
    out = defaultdict(lambda: [0.0, 0])
    for wc, tables, cands, labels in lens_contexts(mc, x, y, cfg, gen):
        if len(cands) < 2:
            continue
        ex, _, _ = entry_rows(mc, wc.lod, wc.index, tables)
        pred = candidate_scores(mc.lensnet(*lens_features(wc, ex))[0], cands, wc.K)
        rho = spearman(pred.cpu(), labels.cpu())
        loss, _, _ = lens_loss_terms(pred, labels, cfg.lens_rank_weight)
        for key, v in (("lens_spearman", rho), ("val_loss", loss.item()), ("label_mean", labels.mean().item()),
                       ("label_std", labels.std().item()), ("label_pos", (labels > 0).float().mean().item())):
            if not math.isnan(v):
                out[key][0] += v
                out[key][1] += 1
    return {k: tuple(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# lora (JT3)


def allocator_wc(mc: MegaContextModel, cursor: int, tables, gen, telemetry=None):
    """A recency pyramid at a random budget, refocused once by the allocator with (frozen) LensNet scores; the
    allocator's step telemetry (swap rate, utilisation, ...) is appended to `telemetry` when given."""
    wc = sample_wc(mc, cursor, gen)
    x, _, _ = entry_rows(mc, wc.lod, wc.index, tables)
    with torch.no_grad(), TIMER("lensnet"):
        scores = mc.lensnet(*lens_features(wc, x))[0].cpu()
    with TIMER("allocator"):
        t = FocusAllocator(mc.cfg).step(wc, mask_scores(scores, *wc.legal_directions()))
    if telemetry is not None:
        telemetry.append(t)
    return wc


def lora_loss(mc: MegaContextModel, x, y, cfg, gen, teacher_fits: bool):
    """Task NLL of the next `horizon` tokens under allocator-built working contexts + keep_alive x gist loss."""
    c = x.shape[1] - cfg.horizon + 1
    task, tel = [], []
    for b in range(x.shape[0]):
        tables = node_tables(mc, mc.gpt.wte(x[b, :c]).detach())
        wc = allocator_wc(mc, c, tables, gen, tel)
        task.append(horizon_nll(mc, [(wc.lod, wc.index)], tables, y[b, c - 1:c - 1 + cfg.horizon], c)[0])
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
        wc = allocator_wc(mc, c, tables, gen)
        total += horizon_nll(mc, [(wc.lod, wc.index)], tables, y[b, c - 1:c - 1 + cfg.horizon], c)[0].item()
    return {"val_loss": (total, x.shape[0])}


# ----------------------------------------------------------------------------------------------------------------
# the module DDP wraps


class StageModel(nn.Module):
    """What DDP wraps for the MegaContext stages: the one root MegaContextModel (`self.mc`) and the stage loss as its
    forward, so every trained parameter (GistNet, LensNet, LoRA) syncs in one bucket set."""

    def __init__(self, mc: MegaContextModel, cfg, teacher_fits: bool):
        super().__init__()
        self.mc, self.cfg, self.teacher_fits = mc, cfg, teacher_fits

    def forward(self, x, y, gen, stage):
        if stage == "gist":
            loss, stats = gist_loss(self.mc, x, y, self.cfg, gen, self.teacher_fits)
        elif stage == "lens":
            loss, stats = lens_loss(self.mc, x, y, self.cfg, gen)
        else:
            loss, stats = lora_loss(self.mc, x, y, self.cfg, gen, self.teacher_fits)
        # every trained parameter joins the graph (a zero term), so a batch that does not reach one (no position sees
        # a LOD2 gist, no legal candidate) still gives it a gradient: DDP needs no find_unused_parameters
        return loss + 0.0 * sum(p.view(-1)[0] for p in self.parameters() if p.requires_grad), stats


TRAINED = {  # stage -> the root's parameters it trains (names start with these); everything else is frozen
    "gist": ("gistnet.",),
    "lens": ("lensnet.",),
    "lora": ("gpt.blocks.", "gistnet."),  # under gpt.blocks only the adapters (lora_a, lora_b)
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
                else lora_eval(mc, x, y, cfg, gen))
        for k, (s, n) in part.items():
            acc[k][0] += s
            acc[k][1] += n
    mc.train()
    return {k: tuple(v) for k, v in acc.items()}
