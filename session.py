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


class Session:
    """A streaming MegaContext session: the history in a tree, the base model reading a working context of it.

    tree (MegaContextTree) and state (a saved session's `extra`) come from `Session.open`; a new session has none.
    """

    def __init__(self, model: MegaContextModel, tree: MegaContextTree | None = None, state: dict | None = None):
        self.model, self.cfg = model, model.cfg
        gpt, cfg = model.gpt, model.cfg
        self.device = gpt.wte.weight.device
        self.tree = tree or MegaContextTree(cfg.K, gpt.config.n_embd, gpt.config.vocab_size, model.identity(),
                                            model.embed_tokens, model.make_gists, cfg.gist_dtype)
        self.alloc = FocusAllocator(cfg)
        self.wc = WorkingContext(cfg.K, cfg.recent_tokens, cfg.w_max)
        self.cache = gpt.make_cache(1, cfg.w_max)
        self.pending, self.last_logits, self.telemetry = 0, None, None
        self.forwarded = 0  # entries run through the base model: decoded tokens plus re-reads after edits
        # KV reuse over all refocuses: cached entries kept / made stale, seconds (scoring + allocator + re-read)
        self.kv = dict(refocuses=0, reused=0, recomputed=0, seconds=0.0)
        self._unpaid = None  # the last refocus's telemetry until the decode that re-reads its stale entries
        # lens_query: the base's residual streams of the newest tokens as the last forward computed them, (Tq, D) with
        # the tokens' positions (Tq,): LensNet's queries (the question as the base reads it)
        self.states, self.state_pos = None, torch.zeros(0, dtype=torch.long)
        self.stream = (state or {}).get("stream")  # the file being streamed in, and how far (ingest_stream)
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
        self.wc.dirty = 0

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
    def scores(self) -> torch.Tensor:
        """Per-entry scores (n,) of the configured policy (recency until the tree has a gist)."""
        wc, cfg = self.wc, self.cfg
        if cfg.policy == "recency" or not (wc.lod > 0).any():
            return recency_scores(wc, cfg.target)
        x = self.tree.node_embeddings(wc.lod, wc.index)[None]
        lod, dist, span = (t[None].to(self.device) for t in (wc.lod, wc.cursor - wc.end, wc.end - wc.start))
        if cfg.lens_types:
            types = self.tree.types(wc.lod.numpy(), wc.index.numpy(), cfg.lens_markers, cfg.lens_margin)
            query = ids = None
            if self.states is not None:
                query = self.states[None]
                ids = torch.from_numpy(self.tree.ids_at(self.state_pos.numpy()))[None]
            return self.model.lensnet(x, lod, dist, span, types=torch.from_numpy(types)[None],
                                      vocab=self.model.gpt.wte.weight, query=query, query_ids=ids)[0].cpu()
        child_lod, child_index = preview_nodes(wc.lod, wc.index, wc.K, cfg.lens_preview)
        children = self.tree.node_embeddings(child_lod.reshape(-1), child_index.reshape(-1))
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
        arm)."""
        scoring = self.scores if scorer is None else lambda: scorer(self.wc)
        score_s = [0.0]

        def score():
            t = time.perf_counter()
            out = scoring()
            score_s[0] += time.perf_counter() - t
            return out

        first = self.alloc.steps  # (until_stable: no edit of this loop is undone within it)
        edits_per_step = self.cfg.settle_edits if until_stable else None
        t0 = time.perf_counter()
        self._read_question()
        self._pay()  # (until_stable: a previous refocus's re-read, if _read_question just did it)
        cached = self._valid()
        t = self.telemetry = self.alloc.step(self.wc, score(), max_edits=edits_per_step)
        steps, edits = 1, dict(expands=t["expands"], collapses=t["collapses"], edits=t["edits"])
        low = cached  # the lowest cut of the refocus (a settle loop's re-reads between steps refill the cache)
        while until_stable and t["edits"] and steps < self.tree.depth + 1:
            low = min(low, self._valid())
            self._read_question()  # the question re-read over what the last step zoomed: a hop to the next needle
            t = self.telemetry = self.alloc.step(self.wc, score(), keep_since=first, max_edits=edits_per_step)
            steps += 1
            edits = {k: v + t[k] for k, v in edits.items()}
        self.pending = 0
        if until_stable:
            self.telemetry = {**t, **edits, "steps": steps}
        # reuse counts the entries cached when the edits began (the settle loop's re-reads between steps, if any, are
        # in its seconds); a refocus without edits keeps them all and costs only its scoring
        reused = min(low, self._valid())
        self.telemetry.update(reused=reused, recomputed=cached - reused, refocus_s=time.perf_counter() - t0,
                              score_s=score_s[0], recompute_s=0.0)
        self.telemetry["seconds"] = self.telemetry["refocus_s"]
        kv = self.kv
        kv.update(refocuses=kv["refocuses"] + 1, reused=kv["reused"] + reused, seconds=kv["seconds"] +
                  self.telemetry["refocus_s"], recomputed=kv["recomputed"] + cached - reused)
        self._unpaid = self.telemetry if reused < len(self.wc) else None
        return self.telemetry

    def _valid(self) -> int:
        """Entries [0, n) of the KV cache that the next decode reuses as they are."""
        return min(self.wc.dirty, self.cache.length)

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

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Next-token logits (V,) fp32 after the whole history, reading the working context through the KV cache."""
        wc, cache = self.wc, self.cache
        if not len(wc):
            raise ValueError("the history is empty: ingest at least one token before decoding")
        first = min(wc.dirty, cache.length)
        if cache.origin is not None and wc.cursor - float(cache.origin[0, 0]) > ORIGIN_DRIFT:
            first = 0
        if first == len(wc) and self.last_logits is not None:
            return self.last_logits
        cache.truncate(first)
        if first == 0:
            cache.origin = None  # the next forward sets a fresh origin at the newest entry
        t0 = time.perf_counter()
        x = wc.embeddings(self.tree, first)[None]
        mu, sigma = wc.positions(self.model.sigma_scale, first)
        (logits, _), states = self.model.read(embeds=x, mu=mu[None].to(self.device),
                                              sigma=sigma[None].to(self.device), cache=cache, last_only=True)
        if states is not None:
            self._keep_states(states[0], wc.lod[first:], wc.start[first:])
        if self._unpaid is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._pay(time.perf_counter() - t0)
        wc.dirty, self.forwarded = len(wc), self.forwarded + len(wc) - first
        self.last_logits = logits[0, -1]
        return self.last_logits

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
    def open(cls, model: MegaContextModel, path: str, verify: bool = True) -> "Session":
        """Resume a saved session. Raises tree.TreeError (a ValueError) for a missing, truncated or corrupt tree, or
        one built by another model or K."""
        gpt = model.gpt
        tree, state = MegaContextTree.open(path, model.cfg.K, gpt.config.n_embd, gpt.config.vocab_size,
                                           model.identity(), model.embed_tokens, model.make_gists, verify)
        return cls(model, tree, state)


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
