"""The MegaContext runtime loop (DESIGN §7): a streaming session over a tree, decoding with the frozen base model.

    s = Session(model); s.ingest(prompt_ids); tok = s.step()   # refocuses every refocus_every tokens
    s.save("run/tree"); s = Session.open(model, "run/tree")    # resume where it stopped

Split from megacontext.py by concept: that file defines what the model is (working context, GistNet, LensNet,
allocator); this one runs it (when to refocus, which KV entries to keep, how a session is saved and resumed).

Decisions where DESIGN and the issue are silent:
- `ingest` never runs LensNet: when the working context would pass w_max it makes room with budget-only collapses
  chosen by the recency pyramid's scores, and an ingest of >= w_max tokens at once (a book) rebuilds the working
  context as the recency pyramid (the cold start). `refocus` applies the configured policy; `step` calls it every
  refocus_every tokens.
- The KV cache holds the working context's entries in order; an edit at entry i truncates it to i and the next decode
  re-reads entries i.. (the "forward in time" rule), so the unchanged prefix is never recomputed. The cut is lazy: a
  refocus's edits only lower wc.dirty, and the next decode cuts the cache once, at the lowest edited entry, and
  re-reads everything after it in one batched forward. Every refocus records in its telemetry the cached entries it
  kept (reused) and the ones it made stale (recomputed), and its seconds: reading the question, scoring (score_s) and
  the allocator (refocus_s), then (recompute_s, added by that decode) the batched re-read; `kv_summary()` sums them.
  cfg.edit_cost makes the allocator weigh that recompute.
  Positions are relative to the cache's origin; the cache is rebuilt when the cursor drifts ORIGIN_DRIFT tokens past
  it, so recent entries keep full fp32 precision in sessions of any length.
- A saved session stores its working context in the tree's meta.json (the one commit record), so save -> open ->
  continue decodes exactly what an unsaved session would; opened with another budget it cold-starts instead.
- A long history streams in through `ingest_stream`: fixed-size chunks (gists made in large batches, tree.py), a
  progress line, and saves every `save_every` tokens when the session has a directory, so the tree's RAM tail (rows
  not yet on disk) is bounded and resident memory does not grow with the history. The file being streamed is
  recorded in the saved state (name, size, checksum, start, tokens done), so a run cut short continues it from the
  first token the tree does not hold (stream_offset).
"""
import dataclasses
import hashlib
import sys
import time

import numpy as np
import torch

from megacontext import (FocusAllocator, InvariantError, MegaContextModel, WorkingContext, check_capacity,
                         preview_nodes, recency_scores)
from model import sample_next
from tree import MegaContextTree

ORIGIN_DRIFT = 2**16  # rebuild the KV cache when the cursor is this far past its position origin (fp32 angles)
MOUNT_SHARE = 0.25  # the budget share of all mounted trees together (DESIGN asks >= half for the session's own)


class Mount:
    """A read-only tree mounted into a session (a library, a project memory): its own working context (no protected
    tail: its history does not grow) and allocator, under its part of the budget (cfg.w_max), its tokens at
    positions [offset, offset + len(tree)) of the composite history. Never saved: the session writes only its own
    tree."""

    def __init__(self, name: str, tree: MegaContextTree, cfg, offset: int):
        self.name, self.tree, self.cfg, self.offset = name, tree, cfg, offset
        if not len(tree):
            raise ValueError(f"mounted tree {name} is empty")
        if cfg.target < 2 * (cfg.K - 1) + 1:
            raise ValueError(f"mounted tree {name}: its budget share ({cfg.w_max} entries) is too small to tile any "
                             f"history at K={cfg.K}; raise the budget or mount fewer trees")
        check_capacity(len(tree), cfg.K, 0, cfg.target)
        self.wc = WorkingContext.pyramid(cfg.K, 0, cfg.w_max, len(tree), cfg.target)
        self.wc.expandable = tree.expandable
        self.wc.dirty = 0
        self.alloc = FocusAllocator(cfg)


class Session:
    """A streaming MegaContext session: the history in a tree, the base model reading a working context of it.

    tree (MegaContextTree) and state (a saved session's `extra`) come from `Session.open`; a new session has none.
    """

    def __init__(self, model: MegaContextModel, tree: MegaContextTree | None = None, state: dict | None = None,
                 mounts=(), mount_share: float = MOUNT_SHARE):
        gpt, cfg = model.gpt, model.cfg
        self.model, self.cfg = model, cfg
        self.device = gpt.wte.weight.device
        self.tree = tree or MegaContextTree(cfg.K, gpt.config.n_embd, gpt.config.vocab_size, model.identity(),
                                            model.embed_tokens, model.make_gists, cfg.gist_dtype)
        self.mounts, self.pos_offset = self._mount(mounts, mount_share), 0
        if self.mounts:  # the session's own tree gets what the mounts leave (at least half the budget)
            self.cfg = cfg = dataclasses.replace(cfg, w_max=cfg.w_max - sum(m.cfg.w_max for m in self.mounts))
            self.pos_offset = sum(len(m.tree) for m in self.mounts)  # the own history follows the mounted ones
        self.alloc = FocusAllocator(cfg)
        self.wc = WorkingContext(cfg.K, cfg.recent_tokens, cfg.w_max)
        self.cache = gpt.make_cache(1, model.cfg.w_max)
        self.pending, self.last_logits, self.telemetry = 0, None, None
        self.forwarded = 0  # entries run through the base model: decoded tokens plus re-reads after edits
        # KV reuse over all refocuses: cached entries kept / made stale, seconds (scoring + allocator + re-read)
        self.kv = dict(refocuses=0, reused=0, recomputed=0, seconds=0.0)
        self._unpaid = None  # the last refocus's telemetry until the decode that re-reads its stale entries
        # lens_query: the base's residual streams of the newest tokens as the last forward computed them, (Tq, D) with
        # the tokens' positions (Tq,): LensNet's queries (the question as the base reads it)
        self.states, self.state_pos = None, torch.zeros(0, dtype=torch.long)
        self.stream = (state or {}).get("stream")  # the file being streamed in, and how far (ingest_stream)
        self.prefetch, self.last_scores = True, {}  # page-cache prefetch of rising entries' children (_step);
        # last_scores: part (0 = own, 1.. = mounts) -> {node key: score at the last step}
        if state and state.get("shape") == self._shape():  # the saved working context fits this budget
            self.wc._splice(0, 0, *(torch.tensor(state["wc"][k]) for k in ("lod", "index", "born", "born_by")))
            self.wc.cursor, self.pending, self.alloc.steps = len(self.tree), state["pending"], state["steps"]
            self.alloc.totals.update(state["totals"])
            try:
                self.wc.check_invariants()
            except InvariantError as e:
                raise ValueError(f"the saved working context does not fit its tree ({e})") from None
        elif len(self.tree):  # none saved, or for another budget: cold start
            self.wc = WorkingContext.pyramid(cfg.K, cfg.recent_tokens, cfg.w_max, len(self.tree), cfg.target)
        self._fit_curation()
        self.wc.dirty = 0

    def _mount(self, mounts, share: float) -> list:
        """Mount read-only trees [(name, tree), ...]: each gets an equal part of `share` of the budget."""
        if not mounts:
            return []
        cfg = self.model.cfg
        if not 0 < share <= 0.5:
            raise ValueError(f"the mounted trees' share of the budget must be in (0, 0.5], got {share}")
        each = int(cfg.w_max * share) // len(mounts)
        out, offset = [], 0
        for name, tree in mounts:
            if tree.K != cfg.K or tree.identity != self.tree.identity:
                raise ValueError(f"mounted tree {name} was built by another model or K (identity "
                                 f"{tree.identity[:12]}, K={tree.K}); this session: {self.tree.identity[:12]}, "
                                 f"K={cfg.K}")
            # no tail to protect and no tokens arriving: the whole share but one entry is the allocator's target
            m = Mount(name, tree, dataclasses.replace(cfg, w_max=each, recent_tokens=0, refocus_every=1), offset)
            out.append(m)
            offset += len(tree)
        return out

    def _fit_curation(self):
        """Tie the working context to the tree's curated spans: a gist whose children curation dropped is not
        expandable, and entries over dropped nodes (a working context saved before curation, the pyramid's raw
        region) become their parent, level by level from LOD0 up (curation drops whole sibling groups, and a span
        whose gists are dropped has lost its tokens too, so each group is complete when its level is lifted)."""
        wc, tree = self.wc, self.tree
        wc.expandable = tree.expandable
        for l in range(len(tree.levels)):
            if tree.levels[l].holes is None or not len(wc):
                continue
            at = (wc.lod == l).nonzero().flatten()
            gone = at[torch.from_numpy(tree.dropped(l, wc.index[at].numpy()))]
            for i in gone[wc.index[gone] % wc.K == 0].flip(0).tolist():  # back to front: earlier indices stay valid
                wc._splice(i, i + wc.K, [l + 1], [int(wc.index[i]) // wc.K], [self.alloc.steps], [-1])
        try:
            wc.check_invariants()
        except InvariantError as e:
            raise ValueError(f"the working context cannot avoid the tree's curated spans ({e})") from None

    @torch.no_grad()
    def ingest(self, tokens):
        """Append token ids to the history. Raises ValueError, changing nothing, on ids outside the vocabulary or a
        history the budget cannot hold even at the coarsest tiling."""
        cfg, wc = self.cfg, self.wc
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        check_capacity(len(self.tree) + len(ids), cfg.K, cfg.recent_tokens, cfg.target)
        self.tree.append(ids)
        if len(ids) >= cfg.w_max:  # everything older would be collapsed anyway: rebuild as the pyramid
            self.wc = WorkingContext.pyramid(cfg.K, cfg.recent_tokens, cfg.w_max, len(self.tree), cfg.target,
                                             self.alloc.steps)
            self._fit_curation()
        else:
            left = len(ids)
            while left:
                if len(wc) >= cfg.w_max:
                    self.alloc.step(wc, recency_scores(wc, cfg.target), budget_only=True)
                take = min(left, cfg.w_max - len(wc))
                wc.append(take, self.alloc.steps)
                left -= take
        self.pending += len(ids)

    @torch.no_grad()
    def scores(self, part=None) -> torch.Tensor:
        """Per-entry scores (n,) of the configured policy (recency until the tree has a gist) over the session's own
        working context, or a mount's (part: a Mount); the question's states are the session's either way."""
        wc, cfg, tree = (self.wc, self.cfg, self.tree) if part is None else (part.wc, part.cfg, part.tree)
        if cfg.policy == "recency" or not (wc.lod > 0).any():
            return recency_scores(wc, cfg.target)
        x = tree.node_embeddings(wc.lod, wc.index)[None]
        lod, dist, span = (t[None].to(self.device) for t in (wc.lod, wc.cursor - wc.end, wc.end - wc.start))
        if cfg.lens_types:
            types = tree.types(wc.lod.numpy(), wc.index.numpy(), cfg.lens_markers, cfg.lens_margin)
            query = ids = None
            if self.states is not None:
                query = self.states[None]
                ids = torch.from_numpy(self.tree.ids_at(self.state_pos.numpy()))[None]
            return self.model.lensnet(x, lod, dist, span, types=torch.from_numpy(types)[None],
                                      vocab=self.model.gpt.wte.weight, query=query, query_ids=ids)[0].cpu()
        child_lod, child_index = preview_nodes(wc.lod, wc.index, wc.K, cfg.lens_preview)
        children = tree.node_embeddings(child_lod.reshape(-1), child_index.reshape(-1))
        children = children.view(1, len(wc), -1, x.shape[-1])
        return self.model.lensnet(x, lod, dist, span, children)[0].cpu()

    def _read_question(self):
        """Before a LensNet refocus with lens_query: run the base over the entries not yet read (the pending tokens; the
        next decode needs them anyway), so that the newest tokens' states are those of the current working context."""
        if self.cfg.query_layers and self.cfg.policy == "lens" and len(self.wc):
            self.logits()

    def refocus(self, until_stable: bool = False, scorer=None) -> dict:
        """Score the working context and apply one allocator step; returns its telemetry. until_stable: repeat until a
        step changes nothing (at most depth + 1 steps: a zoom from the top level down to tokens, then a check; no edit
        of the loop is undone within it), as after a question arrives; the telemetry then sums the steps' edits and
        carries `steps`. scorer(wc) -> scores (n,) replaces the policy's (a diagnostic, e.g. bench/longctx.py's oracle
        arm). With mounted trees every tree's working context takes a step under its own budget (the session's own
        first); the edits are summed, and `trees` gives each tree's entries and edits."""
        parts = [None] + self.mounts
        scoring = (lambda part: self.scores(part)) if scorer is None else (lambda part: scorer(self._wc(part)))
        score_s = [0.0]

        def score(part):
            t = time.perf_counter()
            out = scoring(part)
            score_s[0] += time.perf_counter() - t
            return out

        first = [self._alloc(part).steps for part in parts]  # (until_stable: no edit of this loop is undone within it)
        edits_per_step = self.cfg.settle_edits if until_stable else None
        depth = max([self.tree.depth] + [m.tree.depth for m in self.mounts])
        keys = ("expands", "collapses", "edits")
        per = [dict.fromkeys(keys, 0) for _ in parts]
        steps, t0 = 0, time.perf_counter()
        self._read_question()
        self._pay()  # (until_stable: a previous refocus's re-read, if _read_question just did it)
        cached = low = self._valid()  # low: the lowest cut of the refocus (a settle loop's re-reads refill the cache)
        while True:
            if steps:
                low = min(low, self._valid())
                self._read_question()  # (again: the question re-read over what the last step zoomed, a hop onwards)
            changed = 0
            for p, part in enumerate(parts):
                kw = dict(keep_since=first[p]) if steps else {}
                t = self._step(score(part), part, max_edits=edits_per_step, **kw)
                per[p] = {k: v + t[k] for k, v in per[p].items()}
                changed += t["edits"]
                if part is None:
                    own = t
            steps += 1
            if not (until_stable and changed and steps < depth + 1):
                break
        self.pending = 0
        total = {k: sum(d[k] for d in per) for k in keys}
        self.telemetry = {**own, **(total if until_stable or self.mounts else {})}
        if until_stable:
            self.telemetry["steps"] = steps
        if self.mounts:
            self.telemetry["trees"] = [dict(name=self._name(part), entries=len(self._wc(part)),
                                            budget=self._cfg(part).w_max, **d) for part, d in zip(parts, per)]
        # reuse counts the entries cached when the edits began (the settle loop's re-reads between steps, if any, are
        # in its seconds); a refocus without edits keeps them all and costs only its scoring
        reused = min(low, self._valid())
        self.telemetry.update(reused=reused, recomputed=cached - reused, refocus_s=time.perf_counter() - t0,
                              score_s=score_s[0], recompute_s=0.0)
        self.telemetry["seconds"] = self.telemetry["refocus_s"]
        kv = self.kv
        kv.update(refocuses=kv["refocuses"] + 1, reused=kv["reused"] + reused, seconds=kv["seconds"] +
                  self.telemetry["refocus_s"], recomputed=kv["recomputed"] + cached - reused)
        self._unpaid = self.telemetry if reused < sum(len(w) for w in self._wcs()) else None
        return self.telemetry

    def _wcs(self) -> list:
        """The working contexts the base reads, in reading order: each mount's, then the session's own."""
        return [m.wc for m in self.mounts] + [self.wc]

    def _valid(self) -> int:
        """Entries [0, n) of the KV cache (over every working context, in reading order) that the next decode reuses
        as they are."""
        first, o = self.cache.length, 0
        for w in self._wcs():
            first, o = min(first, o + min(w.dirty, len(w))), o + len(w)
        return first

    def _pay(self, seconds: float = 0.0):
        """Charge a decode's batched re-read (seconds) to the refocus that made its entries stale."""
        if self._unpaid is not None:
            self._unpaid["recompute_s"] += seconds
            self._unpaid["seconds"] += seconds
            self.kv["seconds"] += seconds
            self._unpaid = None

    def kv_summary(self) -> dict:
        """KV reuse over every refocus so far: reuse = entries reused / entries cached when the edits began, and the
        mean entries recomputed and seconds per refocus."""
        kv, n = self.kv, max(self.kv["refocuses"], 1)
        cached = kv["reused"] + kv["recomputed"]
        return dict(refocuses=kv["refocuses"], reuse=kv["reused"] / cached if cached else None,
                    recomputed_per_refocus=kv["recomputed"] / n, seconds_per_refocus=kv["seconds"] / n)

    def _wc(self, part):
        return self.wc if part is None else part.wc

    def _alloc(self, part):
        return self.alloc if part is None else part.alloc

    def _cfg(self, part):
        return self.cfg if part is None else part.cfg

    def _name(self, part):
        return (self.tree.path or "session") if part is None else part.name

    def _step(self, scores, part=None, **kwargs) -> dict:
        """One allocator step of the own working context (or a mount's); every node it zooms is recorded in the tree's
        access telemetry (a mount's only in memory: mounts are never written). Before it, the children of expandable
        entries whose score rose since the last step (or, new since then, exceeds tau_expand) are prefetched into the
        tree's page cache (the zooms a rising score foretells); the step's telemetry carries the cache's hit rate so
        far. (The prefetch is synchronous: it takes the reads off the edit-and-read path, not off the clock.)"""
        wc, alloc = self._wc(part), self._alloc(part)
        tree = self.tree if part is None else part.tree
        p = 0 if part is None else 1 + self.mounts.index(part)
        keys = (wc.lod * 2**48 + wc.index).tolist()  # (lod, index) as one int: < 2**48 nodes per level
        tau = self._cfg(part).tau_expand  # an entry new since the last step "rose" from nothing if it is worth a zoom
        last = self.last_scores.get(p, {})
        rose = [i for i, (key, s) in enumerate(zip(keys, scores.tolist())) if s > last.get(key, tau)]
        if rose and self.prefetch:
            rose = torch.tensor(rose)
            rose = rose[wc.can_expand()[rose]]
            tree.prefetch_children(wc.lod[rose].numpy(), wc.index[rose].numpy())
        self.last_scores[p] = dict(zip(keys, scores.tolist()))  # this step's entries only: bounded by the budget
        t = alloc.step(wc, scores, **kwargs)
        for lod, index in alloc.expanded:
            tree.record_expansion(lod, index)
        t["cache_hit_rate"] = tree.cache.summary()["hit_rate"]
        return t

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Next-token logits (V,) fp32 after the whole history, reading the working context through the KV cache.
        With mounts the base reads the mounted trees' entries first (positions: each mounted history in turn, then
        the session's own), and an edit in any part re-reads from that entry on."""
        wc, cache = self.wc, self.cache
        if not len(wc):
            raise ValueError("the history is empty: ingest at least one token before decoding")
        parts = [(m.wc, m.tree, m.offset, False) for m in self.mounts] + [(wc, self.tree, self.pos_offset, True)]
        first, o = cache.length, 0
        for w, *_ in parts:
            first, o = min(first, o + min(w.dirty, len(w))), o + len(w)
        total = o
        if cache.origin is not None and self.pos_offset + wc.cursor - float(cache.origin[0, 0]) > ORIGIN_DRIFT:
            first = 0
        if first == total and self.last_logits is not None:
            return self.last_logits
        cache.truncate(first)
        if first == 0:
            cache.origin = None  # the next forward sets a fresh origin at the newest entry
        t0 = time.perf_counter()
        xs, mus, sigmas, lods, starts, o = [], [], [], [], [], 0
        for w, tree, offset, own in parts:
            a = max(0, first - o)
            if a < len(w):
                mu, sigma = w.positions(self.model.sigma_scale, a)
                xs.append(w.embeddings(tree, a))
                mus.append(mu + offset)
                sigmas.append(sigma)
                lods.append(w.lod[a:] if own else torch.full_like(w.lod[a:], -1))  # the question: own tokens only
                starts.append(w.start[a:])
            o += len(w)
        x, mu, sigma = torch.cat(xs)[None], torch.cat(mus), torch.cat(sigmas)
        (logits, _), states = self.model.read(embeds=x, mu=mu[None].to(self.device),
                                              sigma=sigma[None].to(self.device), cache=cache, last_only=True)
        if states is not None:
            self._keep_states(states[0], torch.cat(lods), torch.cat(starts))
        if self._unpaid is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._pay(time.perf_counter() - t0)
        for w, *_ in parts:
            w.dirty = len(w)
        self.forwarded += total - first
        self.last_logits = logits[0, -1]
        return self.last_logits

    def provenance(self) -> list[tuple[str, int, int, int, int]]:
        """(tree, lod, index, start, end) of every entry the base reads, in reading order: which tree (a mount's
        folder, or the session's own) and which span of its history each entry stands for."""
        out = []
        for part in self.mounts + [None]:
            w, name = self._wc(part), self._name(part)
            out += [(name, l, k, a, b) for l, k, a, b in zip(w.lod.tolist(), w.index.tolist(), w.start.tolist(),
                                                              w.end.tolist())]
        return out

    def _keep_states(self, states, lod, pos):
        """Keep the newest lens_tail token entries' states: those just read (states (m, D) of entries at levels lod,
        starting at token pos) replace what was kept for the same tokens."""
        tok = (lod == 0).to(states.device)
        new_pos, new = pos[lod == 0], states[tok].float()
        if self.states is not None:
            old = ~torch.isin(self.state_pos, new_pos)
            new_pos, new = torch.cat([self.state_pos[old], new_pos]), torch.cat([self.states[old.to(new.device)], new])
        order = new_pos.argsort()[-self.cfg.lens_tail:]
        self.state_pos, self.states = new_pos[order], new[order.to(new.device)]

    def step(self, temperature: float = 0.0, top_k=None, top_p=None, generator=None) -> int:
        """Refocus if due, sample the next token over the working context, append it to the history; returns it."""
        if self.pending >= self.cfg.refocus_tokens:
            self.refocus()
        tok = int(sample_next(self.logits()[None], temperature, top_k, top_p, generator)[0])
        self.ingest([tok])
        return tok

    def describe(self) -> str:
        """One line for the session start: history, depth, budget, and which GistNet weights make which level."""
        cfg = self.cfg
        return (f"{len(self.tree):,} tokens of history, depth {self.tree.depth}, budget {cfg.w_max}, K={cfg.K}, "
                f"policy {cfg.policy}; {self.model.gistnet.describe()}")

    def _shape(self):
        cfg = self.cfg
        return [cfg.block_k, cfg.w_max, cfg.recent_tokens, cfg.refocus_tokens]

    def save(self, path: str):
        """Write the tree and this session's working context to directory `path` (appending if it came from there)."""
        wc = {k: getattr(self.wc, k).tolist() for k in ("lod", "index", "born", "born_by")}
        self.tree.save(path, extra=dict(shape=self._shape(), wc=wc, pending=self.pending, steps=self.alloc.steps,
                                        totals=self.alloc.totals, stream=self.stream))

    @classmethod
    def open(cls, model: MegaContextModel, path: str, verify: bool = True, mounts=(),
             mount_share: float = MOUNT_SHARE) -> "Session":
        """Resume a saved session. Raises tree.TreeError (a ValueError) for a missing, truncated or corrupt tree, or
        one built by another model or K."""
        gpt = model.gpt
        tree, state = MegaContextTree.open(path, model.cfg.K, gpt.config.n_embd, gpt.config.vocab_size,
                                           model.identity(), model.embed_tokens, model.make_gists, verify)
        return cls(model, tree, state, mounts, mount_share)


def open_mounts(model: MegaContextModel, paths) -> list:
    """[(path, tree)] of saved trees to mount read-only (no lock: a mount is never written). TreeError (one line) for
    a folder without a tree, or a tree of another model or K."""
    gpt, out = model.gpt, []
    for path in paths:
        tree, _ = MegaContextTree.open(path, model.cfg.K, gpt.config.n_embd, gpt.config.vocab_size, model.identity(),
                                       model.embed_tokens, model.make_gists)
        out.append((path, tree))
    return out


def ingest_stream(session: Session, ids, chunk: int = 1 << 16, save_to: str | None = None, save_every: int = 1 << 20,
                  out=sys.stderr, every_s: float = 10.0, stop=lambda: False, source: dict | None = None) -> float:
    """Ingest a long history chunk by chunk; returns tokens/s. A progress line (tokens, tokens/s, ETA, depth) goes to
    `out` (None: silent) after the first chunk (an early rate and ETA), then at most every `every_s` seconds, and at
    the end. With `save_to`, the session is saved there
    after every `save_every` tokens, which bounds the RAM the tree's unsaved rows take; the caller saves at the end.
    Stops early (between chunks) once stop() is true, e.g. on Ctrl-C. `source` (stream_source, its "done" the
    offset of ids[0] in the file) is kept up to date in session.stream, so every save records how far the file got.
    Bad ids or a history the budget cannot hold raise ValueError before anything is ingested."""
    ids, cfg = session.tree.check_ids(ids), session.cfg
    check_capacity(len(session.tree) + len(ids), cfg.K, cfg.recent_tokens, cfg.target)
    t0 = time.perf_counter()
    last = t0 - every_s
    unsaved = 0
    for i in range(0, len(ids), chunk):
        if stop():
            break
        part = ids[i:i + chunk]
        session.ingest(part)
        if source is not None:
            session.stream = {**source, "done": source["done"] + i + len(part)}
        unsaved += len(part)
        if save_to is not None and unsaved >= save_every:
            session.save(save_to)
            unsaved = 0
        now, done = time.perf_counter(), i + len(part)
        if out is not None and (now - last >= every_s or done == len(ids)):
            rate = done / max(now - t0, 1e-9)
            print(f"[ingest] {done:,} / {len(ids):,} tokens ({100 * done / len(ids):.0f}%) | {rate:,.0f} tokens/s | "
                  f"ETA {(len(ids) - done) / rate:,.0f} s | depth {session.tree.depth}", file=out, flush=True)
            last = now
    return len(ids) / max(time.perf_counter() - t0, 1e-9)


def stream_source(name: str, data: bytes, n_tokens: int) -> dict:
    """What a session records about a file it streams in: name, size, checksum and tokens (ingest_stream adds how
    many are done; the caller adds `start`, the history position of its first token)."""
    return {"file": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tokens": n_tokens}


def stream_offset(session: Session, source: dict) -> tuple[int, str | None]:
    """Where streaming `source` into this session starts, and a line saying why when not at 0: the first token the
    tree does not hold when the tree's last stream is this file (same name, size and checksum) and nothing came after
    it (an interrupted run: killed, or stopped with Ctrl-C); else 0, with the reason it cannot continue."""
    last = session.stream
    if not last or last.get("file") != source["file"]:
        return 0, None if not last or last["done"] >= last["tokens"] else (
            f"the tree holds an unfinished stream of {last['file']} ({last['done']:,} of {last['tokens']:,} tokens); "
            f"{source['file']} is streamed after it")
    done, n = last["done"], source["tokens"]
    if (last["size"], last["sha256"]) != (source["size"], source["sha256"]):
        return 0, (f"{source['file']} changed since the tree took {done:,} tokens of it ({last['size']:,} -> "
                   f"{source['size']:,} bytes, another checksum): streaming it from its start")
    if len(session.tree) != last["start"] + done:
        return 0, (f"the tree holds {done:,} of {n:,} tokens of {source['file']}, but more history came after them: "
                   "streaming it from its start")
    if done >= n:
        return n, f"the tree holds all {n:,} tokens of {source['file']} already: nothing to stream"
    return done, f"continuing {source['file']} from token {done:,} of {n:,} (the tree holds the ones before it)"
