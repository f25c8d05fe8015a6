"""MegaPrediction (issue 19): after the last token, predict the gists of the next K tokens (LOD1) and of the next K²
(LOD2) in the base's embedding space, read through the tied head, so a decoder can plan a block ahead.

    h   = ln_f(x_t)                        the final state the tied LM head decodes into token logits (LOD0)
    g_l = h + W2_l silu(W1_l h)            l = 1, 2: a residual MLP per level; W2_l = 0 at init, so g_l starts as h
    L   = sum_l alpha_l (1 - cos(g_l, G_l(next K^l tokens)))     G: the frozen GistNet (no_grad targets)

With tied embeddings h lives in the input-embedding space the gists live in, so the tied head also names what g_l
plans: its top logits are the vocabulary tokens nearest the predicted gist (sample.py --show-plan). Positions: a
prediction is made at t = j K^l - 1 (the last token before an aligned block j of level l), whose target is that
block's gist, the node the tree will hold once the block is read.
Metrics (bench/megaprediction.py): cos(g_l, target) against two baselines (the last complete block's gist, the mean
gist), and speculative acceptance: the share of next blocks whose true gist is the nearest to the prediction among
itself and `others` other blocks of the same window of book text.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class GistPredictor(nn.Module):
    """Heads for levels 1..levels: h (..., d) -> their outputs (..., levels, d); gist() turns one level's output into
    the predicted gist (as_gist with the centre and length the heads were trained around, kept as buffers)."""

    def __init__(self, d: int, levels: int = 2, mult: int = 4):
        super().__init__()
        self.w1 = nn.ModuleList([nn.Linear(d, mult * d, bias=False) for _ in range(levels)])
        self.w2 = nn.ModuleList([nn.Linear(mult * d, d, bias=False) for _ in range(levels)])
        for w in self.w2:
            nn.init.zeros_(w.weight)  # starts as the identity: the prediction is the tied head's own input
        self.register_buffer("center", torch.zeros(levels, d))  # per level; rho 0: heads trained without a centre
        self.register_buffer("rho", torch.zeros(levels))

    def forward(self, h):
        return torch.stack([h + w2(F.silu(w1(h))) for w1, w2 in zip(self.w1, self.w2)], -2)

    def gist(self, h, lod: int = 1):
        """The predicted gist (..., d) of the next K**lod tokens after each state h (..., d)."""
        out = self(h)[..., lod - 1, :]
        if not self.rho[lod - 1]:
            return out
        return as_gist(out, self.center[lod - 1].to(out.dtype), self.rho[lod - 1].to(out.dtype))


def load_heads(path: str, mc, what: str = "MegaPrediction heads") -> GistPredictor:
    """Heads saved by the predict stage (its checkpoint) or bench/megaprediction.py --save-heads, checked against mc's
    base and GistNet (the identity its targets came from), on mc's device in eval mode. ValueError (one line) when the
    file cannot be read or does not match; `what` names the option in it."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # missing, truncated, not a torch file: one line, never a traceback
        raise ValueError(f"{what} {path}: cannot read MegaPrediction heads ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(saved, dict) and "predictor_identity" in saved:  # a train.py checkpoint that holds heads
        saved = dict(heads=saved["predictor"], identity=saved["predictor_identity"],
                     n_embd=saved["model_args"]["n_embd"])
    if not isinstance(saved, dict) or "heads" not in saved:
        raise ValueError(f"{what} {path}: holds no MegaPrediction heads (a predict-stage checkpoint or a "
                         "bench/megaprediction.py --save-heads file)")
    if saved["n_embd"] != mc.gpt.config.n_embd or saved["identity"] != mc.identity():
        raise ValueError(f"{what} {path}: heads trained for another base model or GistNet (a predict stage or "
                         "bench/megaprediction.py --save-heads on this checkpoint makes matching ones)")
    heads = GistPredictor(saved["n_embd"])
    state = dict(saved["heads"])
    if "center" not in state and saved.get("centers"):  # (files written before the buffers)
        state["center"] = torch.stack([c.float() for c in saved["centers"]])
        state["rho"] = torch.tensor([float(r) for r in saved["rho"]])
    for key in ("center", "rho"):
        state.setdefault(key, getattr(heads, key))
    heads.load_state_dict(state)
    return heads.eval().to(mc.gpt.wte.weight.device)


def final_states(gpt, idx) -> torch.Tensor:
    """The normalised final states (B, T, d) of the base over ids (B, T): the tied head's input at every token."""
    got = {}
    hook = gpt.ln_f.register_forward_hook(lambda mod, inp, out: got.__setitem__("h", out))
    try:
        gpt(idx)
    finally:
        hook.remove()
    return got["h"]


def block_gists(make_gists, embeds, K: int, levels: int = 2) -> list:
    """Gists of the aligned blocks of each window: embeds (B, T, d) token embeddings, T a multiple of K**levels ->
    [(B, T / K, d) LOD1, (B, T / K², d) LOD2, ...], each level made from the one below as the tree makes it."""
    B, T, d = embeds.shape
    out, x = [], embeds
    for lod in range(1, levels + 1):
        x = make_gists(lod, x.reshape(-1, K, d)).view(B, -1, d)
        out.append(x)
    return out


def pairs(h, gists, K: int, lod: int):
    """(states (N, d) at t = j K^lod - 1, targets (N, d) = gist j, previous gists (N, d) = gist j - 1, window index
    (N,), block j (N,)) for every window and every block j >= 1 of level lod; h (B, T, d), gists (B, T / K^lod, d)."""
    B, n, d = gists.shape
    j = torch.arange(1, n)
    t = j * K**lod - 1
    win = torch.arange(B)[:, None].expand(B, n - 1)
    return (h[:, t].reshape(-1, d), gists[:, j].reshape(-1, d), gists[:, j - 1].reshape(-1, d), win.reshape(-1),
            j.expand(B, n - 1).reshape(-1))


def cos(a, b) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def loss(pred, targets: list, alphas, centers=None) -> torch.Tensor:
    """sum_l alpha_l mean(1 - cos(pred_l - c_l, target_l - c_l)); pred, targets: lists of (N_l, d). centers (d,)
    per level (e.g. the mean training gist; None: 0): gists share a large common direction, and a cosine taken
    around it rewards telling blocks apart rather than predicting that direction."""
    centers = centers or [0.0] * len(pred)
    return sum(a * (1 - cos(p - c, t - c)).mean() for a, p, t, c in zip(alphas, pred, targets, centers))


def as_gist(pred, center=None, rho=None):
    """The heads' output (..., d) as a predicted gist: as is, or, for heads trained around a centre (loss's centers),
    that centre plus the predicted direction at length rho (the training targets' mean distance from it)."""
    if center is None:
        return pred
    return center + (pred - center) * rho / (pred - center).norm(dim=-1, keepdim=True).clamp(min=1e-6)


def acceptance(pred, gists, win, j, others: int = 7, generator=None) -> float:
    """The share of predictions pred (N, d) for block j of window win whose true gist (gists (B, n, d)) is the nearest
    (cosine) among itself and `others` other blocks of the same window, drawn at random without replacement."""
    B, n, d = gists.shape
    assert n - 1 >= others, f"{n} blocks per window cannot give {others} others"
    hits = 0
    for p, w, k in zip(pred, win.tolist(), j.tolist()):
        rest = torch.tensor([i for i in range(n) if i != k])
        pick = rest[torch.randperm(len(rest), generator=generator)[:others]]
        cands = torch.cat([gists[w, k:k + 1], gists[w, pick]])  # the true block first
        hits += int(cos(p[None], cands).argmax()) == 0
    return hits / max(len(pred), 1)


class Plan:
    """sample.py --mc --show-plan: trained heads (bench/megaprediction.py --save-heads) watching a session's base.
    A hook keeps the newest token's final state at every forward; line() names the gist the heads predict for the
    next K tokens by its nearest vocabulary tokens (cosine to the token embeddings), beside the text generated since
    the last line and what was planned for it."""

    def __init__(self, path: str, mc, enc, top: int = 5):
        self.heads = load_heads(path, mc, "--show-plan")
        self.vocab, self.enc, self.top, self.h, self.last = mc.gpt.wte.weight, enc, top, None, None
        self.markers = mc.cfg.lens_markers
        mc.gpt.ln_f.register_forward_hook(lambda mod, inp, out: setattr(self, "h", out[0, -1].detach()))

    @torch.no_grad()
    def line(self, recent_ids) -> str:
        """'[plan] wrote <text> (planned: a b c) | next: d e f' for the newest state; recent_ids: the tokens
        generated since the last line."""
        if self.h is None:
            return "[plan] (no forward yet)"
        g = self.heads.gist(self.h.float()).to(self.vocab.dtype)
        sim = F.normalize(self.vocab, dim=-1) @ F.normalize(g, dim=-1)
        if self.markers:
            sim[-self.markers:] = -2  # special tokens are not words of a plan
        near = sim.topk(self.top).indices.tolist()
        words = " ".join(repr(self.enc.decode([i])) for i in near)
        wrote = f"wrote {self.enc.decode(list(recent_ids))!r} (planned: {self.last}) | " if self.last else ""
        self.last = words
        return f"[plan] {wrote}next: {words}"
