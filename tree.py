"""The MegaContext tree (DESIGN §2, §7): every token (LOD0) and a gist of every complete aligned span (LOD1, LOD2,
..., as deep as the history), in memory and on disk.

Nodes are `(lod, index)` integer pairs: level l node k covers tokens [k*K**l, (k+1)*K**l); its parent is
(l+1, k // K) and its children are (l-1, k*K + j), j < K. Storage is one append-only array per level: token ids
(int32) for LOD0, gist vectors (n, d) for LOD1..depth. A gist is made exactly when its span completes: LOD1 node k
when token (k+1)*K - 1 arrives, LOD(l+1) node k when its K-th LOD(l) child exists. Partial blocks are never pooled.
The depth grows with the history: a level is born when K gists of the current top exist, so a history of n tokens
has depth(n) = max l with K**l <= n, and the top level always holds fewer than K nodes (nothing above it to collapse
into). The depth is unbounded: any history the disk holds.

This file is split from megacontext.py by concept: it is the storage layer (arrays, files, checksums) and knows
nothing of the networks; `embed` (token ids -> embeddings) and `gist` (level, children -> gists) are callables.

On disk a tree is a directory (format v3):
    tokens.bin   int32 token ids (tokens.g<G>.bin in curation generation G: curate.py)
    lod1.bin .. lod<depth>.bin   gist rows, `dtype` (float32 or float16) (lod1.g<G>.bin where curation deleted
                 gists: `gist_files`)
    access.<n>.bin   access telemetry: int64 rows (lod, index, expansions, last access) of every gist a session
                 zoomed, the access time being the history's length in tokens then; absent until a first zoom
    meta.json    format version, K, d, dtype, vocab size, model identity, `levels` (files: LOD0 .. depth), committed
                 row counts (logical: a curated LOD0 stores fewer) and crc32 per file, `token_file`, `holes` (token
                 ranges curation dropped, gists kept: reads there return FILL), `gist_holes` (LOD1 rows curation
                 deleted: a session zooms no further than LOD2 there), `generation`, `tags` (named token
                 ranges), `curation` (the audit record of the apply that made this generation), `access` (file,
                 rows, crc32), and `extra` (the caller's state, e.g. the working context of a session)
Format v1 (tokens.bin, lod1.bin, lod2.bin, three counts, no `levels`) opens read-and-extend: its missing levels above
LOD2 are made on open from its LOD2 gists (in RAM until the next save, which writes v3), nothing is lost. A v2 tree
(no telemetry, tags or curation) opens as is and is written as v3 by its next save.
The .bin files are append-only logs and meta.json is the commit record: a save appends the new rows in place after
the committed ones (a level born since the last save gets a new file), fsyncs them and the directory (so a new file's
name is durable before anything names it), writes changed access telemetry to a new access.<n+1>.bin (temp file,
fsync, rename: the committed one is untouched), then replaces meta.json atomically (temp file, flush, fsync,
os.replace); the access file the old meta.json named is removed after the commit.
A crash at any point leaves the previous meta.json, whose counts and checksums describe a consistent prefix; bytes
and files past it are ignored and overwritten by the next save. (Rewriting a whole .bin through a temp file on every
save would be atomic too, but costs O(history) per save.) `open` memory-maps the committed rows and checks checksums
by streaming the files, so history is bounded by disk, not RAM, and opening does not grow the resident set.
A folder holding .bin files but no meta.json, files that are not a tree's (notes, a training run, prepared data),
or one that cannot be written is refused before any write (check_folder). A save checks the free space for its rows
first, commits an empty generation before the first rows of a new folder (so no folder ever holds tree files without
a commit record), and on a failure part-way (a full disk) truncates every file back to its committed rows and
removes the files it created: the folder opens as the previous generation.

One writer per folder: TreeLock, an exclusive flock on DIR/lock held for a whole session (a save takes it for its own
duration when the caller holds none). The kernel drops it when its process dies, so a dead holder's lock is simply
taken over; the file names the holder (pid, host, since) for the message a second writer gets. Readers take no lock:
they map only the committed rows of the meta.json they read, and a writer never rewrites those.
"""
import collections
import contextlib
import datetime
import fcntl
import json
import os
import re
import socket
import tempfile
import time
import zlib

import numpy as np
import torch

import durable

FORMAT_VERSION = 3  # v3 adds access telemetry, tags and curated spans; v1 and v2 are read and written back as v3
GIST_DTYPES = ("float32", "float16")  # numpy-native, so np.memmap can map them (bf16 is not)
CHUNK_BYTES = 1 << 24  # streaming unit of checksums and whole-file copies: bounded RAM whatever the history
TYPE_SPAN = 512  # nodes of at least this many tokens keep their token-type sets in RAM (MegaContextTree.types)
LOCK_FILE = "lock"  # TreeLock's file in the tree folder
FILL = -1  # what a read of a token curation dropped returns (never a vocabulary id)
CURATE_DIR = "curate"  # curate.py's folder in a tree folder: the previous generation and the audit log
# a tree folder's own names: the commit record, the level files, the lock, and temp files of an interrupted write
OWN_NAME = re.compile(r"(meta\.json|tokens(\.g\d+)?\.bin|lod\d+(\.g\d+)?\.bin|access\.\d+\.bin)(\.tmp\d+)?|lock|curate|"
                      r"\.write-probe-.*")
DATA_NAME = re.compile(r"tokens(\.g\d+)?\.bin|lod\d+(\.g\d+)?\.bin")


def depth_of(n_tokens: int, K: int) -> int:
    """Levels above LOD0 of a history of n_tokens: the largest l with K**l <= n_tokens (0 below K tokens)."""
    l = 0
    while K ** (l + 1) <= n_tokens:
        l += 1
    return l


def level_file(lod: int) -> str:
    return "tokens.bin" if lod == 0 else f"lod{lod}.bin"


def span_types(tokens: np.ndarray, first: int, n: int, size: int, vocab_size: int, markers: int = 0) -> np.ndarray:
    """(n, vocab_size) bool: which ids occur in each of n consecutive spans of `size` tokens, the first starting at
    token `first` of `tokens` (any array-like of ids: a memory map, a block of a training batch). With markers > 0,
    which ids *follow a marker* instead (tokens whose predecessor is one of the vocabulary's top `markers` ids,
    prepare.py's special tokens): the payload a marker introduces, e.g. a needle's key, named exactly at any depth
    where book text would hide a plain word among thousands of occurrences."""
    out = np.zeros((n, vocab_size), bool)
    step = max(1, (1 << 22) // size)  # ~4M tokens per scatter
    for a in range(0, n, step):
        b = min(n, a + step)
        lo, hi = first + a * size, first + b * size
        ids = np.asarray(tokens[lo:hi], np.int64)
        row = np.arange(a, b).repeat(size)
        keep = ids >= 0  # (FILL: a token curation dropped shows no id)
        if markers:
            prev = np.asarray(tokens[max(lo - 1, 0):hi - 1], np.int64)
            prev = np.concatenate([[0], prev]) if lo == 0 else prev  # token 0 follows nothing
            keep &= prev >= vocab_size - markers
        out[row[keep], ids[keep]] = True
    return out


def gather_types(take, starts: np.ndarray, size: int, vocab_size: int, markers: int = 0, end=None) -> np.ndarray:
    """span_types of spans [start, start + size) of a history whose ids take(positions) returns (positions before
    0 or from `end` on are skipped): (m, vocab_size), and with markers (m, 2 vocab_size), the ids after a marker in
    the second half."""
    V, pos = vocab_size, starts[:, None] + np.arange(size)  # (m, size)
    ok = (pos >= 0) & (pos < (np.iinfo(np.int64).max if end is None else end))
    ids = np.asarray(take(np.where(ok, pos, 0).reshape(-1)), np.int64).reshape(pos.shape)
    ok &= ids >= 0  # (FILL: a token curation dropped)
    rows = np.zeros((len(starts), V * (2 if markers else 1)), bool)
    row = np.broadcast_to(np.arange(len(starts))[:, None], pos.shape)
    rows[row[ok], ids[ok]] = True
    if markers:
        prev = np.asarray(take(np.where(ok, np.maximum(pos - 1, 0), 0).reshape(-1))).reshape(pos.shape)
        tag = ok & (pos >= 1) & (prev >= V - markers)
        rows[row[tag], V + ids[tag]] = True
    return rows


def node_types(take, lod, index, K: int, vocab_size: int, markers: int = 0, margin: int = 0, ram=None,
               end: int | None = None) -> np.ndarray:
    """(n, vocab_size) bool: which ids occur in the span of each node (lod[i], index[i]) of a history of `end` tokens
    whose ids take(positions) returns. With markers > 0: (n, 2 vocab_size), the second half the ids that follow a
    marker in the span (span_types). margin: every span starts `margin` tokens earlier and takes in the one token
    after it (clipped to the history), so a needle that straddles a node boundary shows its key in both nodes'
    previews: the right one reaches back to it, the left one, when an opening marker ends it, sees what the marker
    introduces. (A needle's key is its second token: margin = its length - 2 reaches it from wherever the needle is
    cut, and no further, so a neighbour that holds none of the needle does not show its key.) ram(lod, markers,
    index), when given, supplies
    the bitsets of nodes of TYPE_SPAN tokens or more (MegaContextTree.types); else every span is read from the
    tokens."""
    lod, index = np.asarray(lod, np.int64).reshape(-1), np.asarray(index, np.int64).reshape(-1)
    V = vocab_size
    out = np.zeros((len(lod), V * (2 if markers else 1)), bool)
    for l in np.unique(lod).tolist():
        at = lod == l
        if ram is None or K**l < TYPE_SPAN:  # every entry's tokens in one gather, one scatter
            out[at] = gather_types(take, index[at] * K**l, K**l, V, markers)
            continue
        for half, kind in enumerate((0, markers) if markers else (0,)):
            out[at, half * V:(half + 1) * V] = ram(l, kind, index[at])
    if margin:
        out |= gather_types(take, index * K**lod - margin, margin, V, markers)
        out |= gather_types(take, (index + 1) * K**lod, 1, V, markers, end)
    return out


def _crash_point(what: str):
    """Called before every durable step of `save` (a no-op): tests replace it to crash a save at each point."""


class TreeError(ValueError):
    """A tree directory that cannot be used: missing, truncated, corrupt, or from another model; one line."""


def node_span(lod, index, K: int):
    """Tokens [start, end) covered by node (lod, index); works on ints and on int64 tensors alike."""
    size = K ** lod
    return index * size, (index + 1) * size


def parent(lod: int, index: int, K: int):
    return lod + 1, index // K


def children(lod: int, index: int, K: int):
    """The K children of a gist node, oldest first."""
    assert lod > 0, "LOD0 tokens have no children"
    return [(lod - 1, index * K + j) for j in range(K)]


class _Rows:
    """Append-only rows (n, *shape): a committed prefix memory-mapped from a file, then a growable RAM tail."""

    def __init__(self, shape, dtype, cache: "PageCache | None" = None, lod: int = 0):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.cache, self.lod = cache, lod  # committed rows are read through the tree's page cache
        self.disk, self.n_disk = None, 0  # np.memmap of the committed rows (read-only)
        self.ram, self.n_ram = np.zeros((16, *self.shape), self.dtype), 0
        self.holes = None  # (starts, ends, dropped before each) of logical rows not stored (set_holes), or None

    def __len__(self):
        """Logical rows: the stored ones plus those in holes."""
        return self.n_disk + self.n_ram + self.dropped

    @property
    def row_bytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def append(self, rows: np.ndarray):
        rows = np.asarray(rows, self.dtype).reshape(-1, *self.shape)
        need = self.n_ram + len(rows)
        if need > len(self.ram):  # capacity doubling: amortised O(1) per row
            grown = np.zeros((max(need, 2 * len(self.ram)), *self.shape), self.dtype)
            grown[:self.n_ram] = self.ram[:self.n_ram]
            self.ram = grown
        self.ram[self.n_ram:need] = rows
        self.n_ram = need

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows at int64 logical indices idx (any order) -> (len(idx), *shape); rows in a hole read as FILL."""
        if self.holes is None:
            return self._take(idx)
        phys, dropped = self.physical(idx)
        out = np.full((len(idx), *self.shape), FILL, self.dtype)
        out[~dropped] = self._take(phys[~dropped])
        return out

    def physical(self, idx: np.ndarray):
        """(stored row of each logical index, whether it lies in a hole) for int64 indices idx."""
        idx = np.asarray(idx, np.int64)
        if self.holes is None:
            return idx, np.zeros(len(idx), bool)
        starts, ends, before = self.holes
        j = np.searchsorted(ends, idx, "right")  # holes that end at or before idx: wholly behind it
        inside = (j < len(starts)) & (starts[np.minimum(j, len(starts) - 1)] <= idx)
        return idx - before[j], inside

    def set_holes(self, runs):
        """Logical rows [a, b) of each run are not stored (curation dropped them); runs sorted, disjoint."""
        runs = np.asarray(runs, np.int64).reshape(-1, 2)
        if not len(runs):
            self.holes = None
            return
        before = np.concatenate([[0], np.cumsum(runs[:, 1] - runs[:, 0])])  # rows dropped before hole j
        self.holes = (runs[:, 0].copy(), runs[:, 1].copy(), before)

    @property
    def dropped(self) -> int:
        return 0 if self.holes is None else int(self.holes[2][-1])

    @property
    def stored(self) -> int:
        return self.n_disk + self.n_ram

    def _take(self, idx: np.ndarray) -> np.ndarray:
        """Stored rows at physical indices idx."""
        out = np.empty((len(idx), *self.shape), self.dtype)
        on_disk = idx < self.n_disk
        if on_disk.any():
            small = self.cache is not None and len(idx) <= PageCache.MAX_READ
            out[on_disk] = self.cache.read(self, self.lod, idx[on_disk]) if small else self.disk[idx[on_disk]]
        out[~on_disk] = self.ram[idx[~on_disk] - self.n_disk]
        return out

    def slice(self, a: int, b: int) -> np.ndarray:
        return self.take(np.arange(a, b, dtype=np.int64))

    def __getitem__(self, s: slice) -> np.ndarray:
        return self.slice(s.start, s.stop)

    def put(self, a: int, rows: np.ndarray):
        """Overwrite rows [a, a + len(rows)) in memory: committed rows through a copy-on-write map (the file is
        never written), the others in the RAM tail."""
        rows = np.asarray(rows, self.dtype).reshape(-1, *self.shape)
        idx, dropped = self.physical(np.arange(a, a + len(rows), dtype=np.int64))
        if dropped.any():
            raise ValueError(f"rows from {a} lie in a span whose rows curation dropped; they cannot be rewritten")
        on_disk = idx < self.n_disk
        if on_disk.any():
            if self.cache is not None:
                self.cache.drop(self.lod)
            if self.disk.mode != "c":
                self.disk = np.memmap(self.disk.filename, self.dtype, "c", shape=self.disk.shape)
            self.disk[idx[on_disk]] = rows[on_disk]
        self.ram[idx[~on_disk] - self.n_disk] = rows[~on_disk]

    def tail(self) -> np.ndarray:
        """The rows not yet on disk."""
        return self.ram[:self.n_ram]

    def chunks(self):
        """All stored rows, oldest first, as contiguous arrays of at most ~CHUNK_BYTES (a whole-file copy in bounded
        RAM)."""
        step = max(1, CHUNK_BYTES // max(self.row_bytes, 1))
        for a in range(0, self.stored, step):  # stored rows: holes are not written
            yield np.ascontiguousarray(self._take(np.arange(a, min(self.stored, a + step), dtype=np.int64)))

    def map(self, path: str, n: int):
        """Make rows [0, n) the memory-mapped prefix of `path` and drop the RAM tail (they are on disk now)."""
        self.disk = np.memmap(path, self.dtype, "r", shape=(n, *self.shape)) if n else None
        self.n_disk, self.n_ram = n, 0
        self.ram = np.zeros((16, *self.shape), self.dtype)


class PageCache:
    """One LRU cache of tree pages (`page_rows` consecutive committed rows of one level) between the memory-mapped
    files and the refocus path, bounded by `max_bytes`, with telemetry: page hits and misses, the read latency of a
    miss, and prefetches (pages loaded ahead, and how many a later read used). Only small reads (at most MAX_READ
    rows) go through it, so a scan (a save, a curation, type bitsets)
    cannot flush it; only pages wholly on disk are cached (committed rows never change; a rewrite drops its level's
    pages), so appends never make a page stale. Pages live in RAM (a GPU copy is future work)."""
    MAX_READ = 1 << 15  # rows: a working context's entries and their previews, not a scan

    def __init__(self, max_bytes: int = 64 << 20, page_rows: int = 64):
        self.max_bytes, self.page_rows = max_bytes, page_rows
        self.pages, self.bytes, self.ahead = collections.OrderedDict(), 0, set()  # ahead: prefetched, not yet read
        self.stats = dict(hits=0, misses=0, read_s=0.0, prefetched=0, prefetch_hits=0)

    def _load(self, level, lod: int, p: int) -> np.ndarray:
        t0 = time.perf_counter()
        rows = np.array(level.disk[p * self.page_rows:(p + 1) * self.page_rows])  # a copy: the read happens here
        self.stats["read_s"] += time.perf_counter() - t0
        self.pages[lod, p] = rows
        self.bytes += rows.nbytes
        while self.bytes > self.max_bytes and self.pages:
            key, old = self.pages.popitem(last=False)
            self.bytes -= old.nbytes
            self.ahead.discard(key)
        return rows

    def _page(self, level, lod: int, p: int) -> np.ndarray:
        rows = self.pages.get((lod, p))
        if rows is None:
            self.stats["misses"] += 1
            return self._load(level, lod, p)
        self.stats["hits"] += 1
        if (lod, p) in self.ahead:
            self.stats["prefetch_hits"] += 1
            self.ahead.discard((lod, p))
        self.pages.move_to_end((lod, p))
        return rows

    def read(self, level, lod: int, idx: np.ndarray) -> np.ndarray:
        """Committed rows idx (physical, all < level.n_disk) of level `lod`."""
        P = self.page_rows
        page = idx // P
        full = (page + 1) * P <= level.n_disk  # rows of the last, partial page are read directly
        out = np.empty((len(idx), *level.shape), level.dtype)
        if (~full).any():
            out[~full] = level.disk[idx[~full]]
        if full.any():
            u, inv = np.unique(page[full], return_inverse=True)
            block = np.stack([self._page(level, lod, p) for p in u.tolist()])  # (pages, P, *shape)
            out[full] = block[inv, idx[full] - u[inv] * P]
        return out

    def prefetch(self, level, lod: int, idx: np.ndarray):
        """Load the pages of committed rows idx that are not cached yet (no hit or miss is counted)."""
        idx = idx[idx < level.n_disk]
        for p in np.unique(idx // self.page_rows).tolist():
            if (p + 1) * self.page_rows <= level.n_disk and (lod, p) not in self.pages:
                self._load(level, lod, p)
                self.ahead.add((lod, p))
                self.stats["prefetched"] += 1

    def drop(self, lod: int):
        for key in [k for k in self.pages if k[0] == lod]:
            self.bytes -= self.pages.pop(key).nbytes
            self.ahead.discard(key)

    def summary(self) -> dict:
        s = self.stats
        looked = s["hits"] + s["misses"]
        return dict(hits=s["hits"], misses=s["misses"], hit_rate=s["hits"] / looked if looked else None,
                    read_ms=1e3 * s["read_s"] / max(s["misses"] + s["prefetched"], 1), prefetched=s["prefetched"],
                    prefetch_hits=s["prefetch_hits"], pages=len(self.pages), mib=self.bytes / 2**20)


def _crc(rows: np.ndarray, prev: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(rows).view(np.uint8).reshape(-1), prev)


def _crc_file(path: str, nbytes: int) -> int:
    """crc32 of the first nbytes of a file, streamed (through the page cache, not this process's memory)."""
    crc = 0
    with open(path, "rb") as f:
        while nbytes > 0:
            buf = f.read(min(CHUNK_BYTES, nbytes))
            if not buf:
                break
            crc, nbytes = zlib.crc32(buf, crc), nbytes - len(buf)
    return crc


def _is_tree_meta(path: str) -> bool | None:
    """Whether the meta.json at `path` is a tree's commit record: True; False for another program's JSON (prepare.py's
    meta.json); None when it cannot be read (corrupt: open() names that)."""
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return isinstance(meta, dict) and "format_version" in meta and "counts" in meta


def check_folder(path: str, write: bool) -> bool:
    """Whether folder `path` holds a committed tree (a meta.json). Called before anything is read or written; raises
    TreeError (one line) for a folder that is neither empty nor a tree (another program's files: a tree is never
    written beside them), for tree files without a commit record (which writing a new tree there would destroy),
    and, when `write`, for a folder (or, if it does not exist yet, its nearest existing parent) or tree file that
    cannot be written. Writability is probed, not read from mode bits, so root, ACLs and read-only mounts all count.
    Files of someone else beside a committed tree are left alone (a save writes only the tree's own names)."""
    path = os.path.abspath(path)
    folder = path
    while not os.path.isdir(folder):  # the folder, or the nearest existing parent a save would create it in
        if os.path.exists(folder):
            raise TreeError(f"{folder} is a file, not a folder")
        folder = os.path.dirname(folder)
    names = sorted(os.listdir(path)) if folder == path else []
    data = [n for n in names if DATA_NAME.fullmatch(n)]
    committed = "meta.json" in names
    tree_meta = _is_tree_meta(os.path.join(path, "meta.json")) if committed else None
    foreign = ["meta.json (not a tree's)"] * (tree_meta is False) + [n for n in names if not OWN_NAME.fullmatch(n)]
    if foreign and not tree_meta:
        more = f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        raise TreeError(f"{path} is not empty and holds no MegaContext tree (found {', '.join(foreign[:4])}{more}); "
                        "nothing was written: a tree goes into an empty folder or the folder of a saved tree")
    if data and not committed:
        raise TreeError(f"{path} holds tree files ({', '.join(data)}) but no commit record (meta.json missing); "
                        "nothing was written: restore meta.json to resume, or start over in an empty folder")
    if not write:
        return committed
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
        for name in data + ["meta.json"] * committed:  # appends reopen these in place
            open(os.path.join(path, name), "r+b").close()
    except OSError as e:
        where = folder if not e.filename or ".write-probe-" in e.filename else e.filename
        raise TreeError(f"cannot write to {where} ({e.strerror}); choose a writable folder") from None
    return committed


class TreeLocked(TreeError):
    """The tree folder is locked by another live process."""


_HELD = {}  # real path of a folder -> the TreeLock this process holds on it (saves inside a session reuse it)


def _holder(fd: int) -> str:
    """'pid P on HOST since T' from a lock file; its holder may be writing it this instant, so read a few times."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.01)
    return "a process that has not written its name yet"


class TreeLock:
    """One writer per tree folder (module docstring): an exclusive, non-blocking flock on DIR/lock.

        with TreeLock(path):        # TreeLocked (one line naming the holder) if another process writes the tree
            ...                     # the whole session; saves in it reuse this lock

    The folder is created if needed and removed again on release when the lock file was all it held (a run that
    failed before its first save leaves nothing behind). The lock file is unlinked on release while still locked,
    so an acquirer checks, after its flock, that the file it locked is still the one the folder names."""

    def __init__(self, path: str):
        self.path, self.fd, self.made = os.path.abspath(path), None, False

    def __enter__(self):
        file = os.path.join(self.path, LOCK_FILE)
        try:
            while self.fd is None:
                if not os.path.isdir(self.path):  # (again if a holder that made it removed it as it released)
                    os.makedirs(self.path, exist_ok=True)
                    self.made = True
                try:
                    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
                except FileNotFoundError:  # the folder went between the check and the open: make it anew
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    raise TreeLocked(f"{self.path} is in use by another session ({holder}); nothing was written: "
                                     "wait for it to end, or open the tree read-only (sample.py --read-only)") from None
                except BaseException:
                    os.close(fd)
                    raise
                try:
                    same = os.stat(file).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:  # released (and unlinked) between our open and our flock: lock anew
                    same = False
                if same:
                    self.fd = fd
                else:
                    os.close(fd)
            _HELD[os.path.realpath(self.path)] = self  # (a save may name the folder through another link)
        except OSError as e:
            self.__exit__()
            raise TreeError(f"cannot write to {self.path} ({e.strerror}); choose a writable folder") from None
        except BaseException:  # Ctrl-C while loading: no lock may outlive this call in a process that goes on
            self.__exit__()
            raise
        try:  # who holds it, for the next writer's message; a full disk only loses the name, not the lock
            os.ftruncate(self.fd, 0)
            since = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
            os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode())
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        if self.fd is None:
            self._remove_made()
            return
        _HELD.pop(os.path.realpath(self.path), None)
        durable.remove_quietly(os.path.join(self.path, LOCK_FILE))  # still locked: nobody else holds this file
        os.close(self.fd)
        self.fd = None
        self._remove_made()

    def _remove_made(self):
        if self.made:
            try:
                os.rmdir(self.path)  # only when empty: nothing was saved into the folder this lock created
            except OSError:
                pass


@contextlib.contextmanager
def _writer(path: str):
    """The folder's lock for one save: the session's when this process holds it, else taken for the save."""
    if os.path.realpath(path) in _HELD:
        yield
        return
    with TreeLock(path):
        yield


class MegaContextTree:
    """Token ids and gists of one history, addressed by (lod, index); `levels[l]` holds LOD l (0 = token ids).

    embed(ids: LongTensor (n,)) -> (n, d) input embeddings of the base model;
    gist(lod, x: (N, K, d)) -> (N, d) gists of N complete blocks of children (x may arrive as fp32 on the CPU).
    identity: a string that names the base model and GistNet weights (their hash); a tree only opens under it.
    """

    def __init__(self, K: int, d: int, vocab_size: int, identity: str, embed, gist, dtype: str = "float32"):
        if dtype not in GIST_DTYPES:
            raise ValueError(f"gist dtype must be one of {', '.join(GIST_DTYPES)}, got {dtype!r}")
        self.K, self.d, self.vocab_size, self.identity, self.dtype = K, d, vocab_size, identity, dtype
        self.embed, self.gist = embed, gist
        self.cache = PageCache()  # reads of committed rows on the refocus path (set max_bytes = 0 to turn it off)
        self.levels = [_Rows((), np.int32, self.cache, 0)]  # LOD0 ids; gist levels are added as they are born
        self.path, self.crcs = None, [0]  # backing directory and the crc32 of each level's committed prefix
        self.rewritten = False  # rewrite() changed rows in memory only: saving would lose them
        self._types = {}  # (lod, markers) -> packed bitsets of its first nodes (types(); RAM only, derived)
        self.token_file, self.generation = "tokens.bin", 0  # LOD0's file: tokens.g<G>.bin in curation generation G
        self.gist_files = {}  # lod -> file name, where curation rewrote a gist level (lod<l>.g<G>.bin)
        self.tags = {}  # name -> [[a, b], ...] token ranges, kept with the tree (curation protects spans by tag)
        self.curation = None  # the audit record of the curation that made this generation (curate.py)
        # access telemetry: (lod, index) -> [expansions, last access], the access time being the history's length in
        # tokens then (monotonic across sessions); gist nodes only, since only gists expand
        self.access, self.access_meta, self.access_dirty = {}, None, False

    def __len__(self):
        return len(self.levels[0])

    @property
    def depth(self) -> int:
        """The top level (0 until K tokens exist); it holds fewer than K nodes."""
        return len(self.levels) - 1

    def n_nodes(self, lod: int) -> int:
        return len(self.levels[lod]) if lod < len(self.levels) else 0

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self.levels[0].slice(start, end).astype(np.int64)

    def ids_at(self, positions) -> np.ndarray:
        """Token ids (int64) at the given positions, in one gather."""
        return self.levels[0].take(np.asarray(positions, np.int64)).astype(np.int64)

    def gists(self, lod: int, index: np.ndarray) -> np.ndarray:
        assert 1 <= lod <= self.depth, f"this tree has gists at LOD1..LOD{self.depth}, not LOD{lod}"
        return self.levels[lod].take(np.asarray(index, np.int64))

    def types(self, lod, index, markers: int = 0, margin: int = 0) -> np.ndarray:
        """(n, vocab) bool: which token ids occur in the span of each node (lod[i], index[i]) (a LOD0 node: its own
        id); with markers and margin as in `node_types`. A derived index, never on disk: nodes spanning TYPE_SPAN
        tokens or more keep bitsets in RAM (vocab / 8 bytes each, per kind: 4 MB for 16M tokens at K = 8 and a
        1,024-id vocabulary), made on first use from the tokens (or their children's bitsets) and extended as the
        history grows; smaller spans are read from the tokens."""
        def ram(l, kind, index):
            self._extend_types(l, kind)
            return np.unpackbits(self._types[l, kind][index], axis=1, count=self.vocab_size).astype(bool)
        return node_types(self.levels[0].take, lod, index, self.K, self.vocab_size, markers, margin, ram, len(self))

    def _type_rows(self, lod: int, a: int, b: int, markers: int = 0) -> np.ndarray:
        """Packed bitsets of nodes [a, b) of a level at or above TYPE_SPAN (present ids, or with markers the ids
        after a marker): from the tokens at the lowest such level, else OR over the K children's bitsets."""
        if self.K ** (lod - 1) < TYPE_SPAN:
            return np.packbits(span_types(self.levels[0], a * self.K**lod, b - a, self.K**lod, self.vocab_size,
                                          markers), 1)
        self._extend_types(lod - 1, markers)
        kids = self._types[lod - 1, markers][a * self.K:b * self.K]
        return np.bitwise_or.reduce(kids.reshape(b - a, self.K, -1), axis=1)

    def _extend_types(self, lod: int, markers: int = 0):
        have, need = len(self._types.get((lod, markers), ())), self.n_nodes(lod)
        if have < need:
            rows = self._type_rows(lod, have, need, markers)
            self._types[lod, markers] = np.concatenate([self._types[lod, markers], rows]) if have else rows

    # ------------------------------------------------------------------------------------------------------------
    # access telemetry, tags and curated spans

    def record_expansion(self, lod: int, index: int):
        """The allocator zoomed node (lod, index): one more expansion, accessed now (at the history's length)."""
        rec = self.access.setdefault((int(lod), int(index)), [0, -1])
        rec[0], rec[1] = rec[0] + 1, len(self)
        self.access_dirty = True

    def access_rows(self) -> np.ndarray:
        """(n, 4) int64 rows (lod, index, expansions, last access) of every node ever accessed, sorted by node."""
        rows = np.array([[l, k, e, t] for (l, k), (e, t) in self.access.items()], np.int64).reshape(-1, 4)
        return rows[np.lexsort((rows[:, 1], rows[:, 0]))]

    def tag(self, name: str, start: int, end: int):
        """Name tokens [start, end) (a book, a conversation): curation policies protect spans by tag. Saved with the
        tree."""
        if not 0 <= start < end <= len(self):
            raise ValueError(f"tag {name!r}: [{start}, {end}) is not a span of the history [0, {len(self)})")
        self.tags.setdefault(name, []).append([int(start), int(end)])

    def expandable(self, lod, index) -> np.ndarray:
        """bool (n,): whether node (lod[i], index[i]) has children to expand into: a gist whose children curation did
        not drop (it drops whole sibling groups, so the first child tells)."""
        lod, index = np.asarray(lod, np.int64).reshape(-1), np.asarray(index, np.int64).reshape(-1)
        out = lod > 0
        for l in range(1, len(self.levels)):
            at = lod == l
            if at.any() and self.levels[l - 1].holes is not None:
                out[at] = ~self.levels[l - 1].physical(index[at] * self.K)[1]
        return out

    def dropped(self, lod: int, index) -> np.ndarray:
        """bool (n,): whether curation dropped nodes (lod, index[i])."""
        return self.levels[lod].physical(np.asarray(index, np.int64).reshape(-1))[1]

    def prefetch_children(self, lod, index):
        """Load the pages of the children of gists (lod[i], index[i]) into the page cache (a zoom is coming)."""
        lod, index = np.asarray(lod, np.int64).reshape(-1), np.asarray(index, np.int64).reshape(-1)
        for l in np.unique(lod[lod > 0]).tolist():
            kids = (index[lod == l][:, None] * self.K + np.arange(self.K)).reshape(-1)
            phys, dropped = self.levels[l - 1].physical(kids)
            self.cache.prefetch(self.levels[l - 1], l - 1, phys[~dropped])

    @property
    def holes(self) -> list:
        """Token ranges [a, b) whose tokens curation dropped (their gists are kept)."""
        return self.level_holes(0)

    def level_holes(self, lod: int) -> list:
        """Row ranges [a, b) of level lod that curation dropped."""
        h = self.levels[lod].holes
        return [] if h is None else np.stack([h[0], h[1]], 1).tolist()

    def check_ids(self, tokens) -> np.ndarray:
        """Token ids as int64 (n,); ValueError (one line) unless all are in [0, vocab_size)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def append(self, tokens, batch: int | None = None):
        """Append token ids and make every gist that completes, at every level, creating levels as they are born.
        All-or-nothing: a bad id or a failing gist leaves the tree unchanged. Gists are computed `batch` blocks per
        GistNet call (default: ~4M children values, 16 MB per fp32 activation: large batches amortise the per-call
        cost on a CPU). `append([])` only completes missing levels (a v1 tree on open)."""
        batch = batch or max(1, 2**22 // (self.K * self.d))
        ids = self.check_ids(tokens)
        new, lod = [ids], 1  # new[l]: rows that level l gains
        while True:
            have, below = self.n_nodes(lod), self.n_nodes(lod - 1)
            n_blocks = (below + len(new[-1])) // self.K - have
            if n_blocks == 0:  # most appends (one decoded token) complete no block
                if lod > self.depth:  # and no level is born
                    break
                new.append(np.zeros((0, self.d), self.dtype))
                lod += 1
                continue
            old = self.levels[lod - 1].slice(have * self.K, below) if below else new[-1][:0]  # children not pooled
            kids = np.concatenate([old, new[-1]]) if len(new[-1]) else old
            made = [self._pool(lod, kids[i * self.K:(i + b) * self.K], b)
                    for i in range(0, n_blocks, batch) for b in [min(batch, n_blocks - i)]]
            new.append(np.concatenate(made))
            lod += 1
        for l, rows in enumerate(new):  # commit only once everything is computed
            if l == len(self.levels):  # a level is born
                self.levels.append(_Rows((self.d,), self.dtype, self.cache, l))
                self.crcs.append(0)
            self.levels[l].append(rows)

    def rewrite(self, start: int, tokens):
        """Replace tokens [start, start + n) by `tokens` and remake every gist above them: depth x (1 or 2) GistNet
        calls, however long the history (a needle planted into a saved 16M-token history without re-ingesting it).
        In memory only: the files are not touched, and this tree can no longer be saved (its files would not hold
        the rewrite). ValueError on bad ids or a span outside the history."""
        ids = self.check_ids(tokens)
        if not 0 <= start <= start + len(ids) <= len(self):
            raise ValueError(f"rewrite of tokens [{start}, {start + len(ids)}) is outside the history "
                             f"[0, {len(self)})")
        self.levels[0].put(start, ids)
        # nodes [a, b) of the level below changed (the token after the span too: what follows a marker may change)
        a, b = start, min(len(self), start + len(ids) + 1)
        for lod in range(1, self.depth + 1):
            a, b = a // self.K, min(-(-b // self.K), self.n_nodes(lod))  # their parents (complete ones only)
            if a >= b:
                break
            self.levels[lod].put(a, self._pool(lod, self.levels[lod - 1].slice(a * self.K, b * self.K), b - a))
            for (l, markers), rows in self._types.items():  # its bitsets too (levels go upwards: children are fresh)
                hi = min(b, len(rows))
                if l == lod and a < hi:
                    rows[a:hi] = self._type_rows(lod, a, hi, markers)
        self.rewritten = True

    @torch.no_grad()
    def _pool(self, lod: int, kids: np.ndarray, n: int) -> np.ndarray:
        """Gists of n complete blocks: kids holds n*K token ids (lod 1) or n*K gist rows of LOD(lod-1)."""
        x = self._to_embeddings(lod - 1, kids)  # (n*K, d)
        out = self.gist(lod, x.view(n, self.K, self.d))
        return out.float().cpu().numpy().astype(self.dtype)

    def _to_embeddings(self, lod: int, rows: np.ndarray) -> torch.Tensor:
        if lod == 0:
            return self.embed(torch.from_numpy(np.asarray(rows, np.int64)))
        return torch.from_numpy(np.asarray(rows, np.float32))  # `gist` moves it to the model's device

    def node_embeddings(self, lod: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Input embeddings (n, d) of nodes (lod[i], index[i]): token embeddings for LOD0, stored gists above. A token
        curation dropped reads as a zero vector (only LensNet's previews of a compacted gist's children ask for one:
        they see nothing below the gist)."""
        lod_np, idx_np = lod.cpu().numpy(), index.cpu().numpy()
        tok = lod_np == 0
        ids = self.levels[0].take(idx_np[tok]).astype(np.int64)
        gone = torch.from_numpy(ids == FILL)
        x = self.embed(torch.from_numpy(np.where(ids == FILL, 0, ids)))  # (n0, d)
        if gone.any():
            x = x.masked_fill(gone.to(x.device)[:, None], 0)
        if tok.all():
            return x
        out = x.new_empty((len(lod_np), self.d))
        out[torch.from_numpy(tok).to(x.device)] = x
        for l in np.unique(lod_np[~tok]).tolist():
            sel = lod_np == l
            rows = self.gists(l, idx_np[sel]).astype(np.float32)
            if self.levels[l].holes is not None:  # a gist curation deleted reads as zeros too
                rows[self.dropped(l, idx_np[sel])] = 0
            rows = torch.from_numpy(rows)
            out[torch.from_numpy(sel).to(x.device)] = rows.to(x.device, x.dtype)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # disk

    def file(self, lod: int) -> str:
        """The file of level lod in this tree's folder (LOD0's name changes with the curation generation)."""
        return self.token_file if lod == 0 else self.gist_files.get(lod, level_file(lod))

    def _meta(self, counts, crcs, extra, access=None) -> dict:
        return {"format_version": FORMAT_VERSION, "K": self.K, "d": self.d, "dtype": self.dtype,
                "token_dtype": "int32", "vocab_size": self.vocab_size, "identity": self.identity,
                "levels": len(counts), "counts": counts, "crc32": crcs, "token_file": self.token_file,
                "holes": self.holes, "gist_files": {str(l): f for l, f in self.gist_files.items()},
                "gist_holes": {str(l): self.level_holes(l) for l in range(1, len(self.levels))
                               if self.levels[l].holes is not None},
                "generation": self.generation, "tags": self.tags, "curation": self.curation,
                "access": access, "extra": extra}

    def save(self, path: str, extra: dict | None = None):
        """Write (or append to) the tree in directory `path`; then the tree is backed by it (memory-mapped).

        Refused before anything is written (TreeError, one line): a folder holding another tree, tree files without
        a commit record or another program's files (check_folder), a folder another process holds the lock of, and
        a save the disk has no room for. A save that fails part-way (a full disk) undoes its writes: the folder
        opens as its previous generation, and this tree keeps its unsaved rows in RAM (a later save can retry)."""
        path = os.path.abspath(path)
        if self.rewritten:
            raise TreeError("this tree was rewritten in memory (MegaContextTree.rewrite) and cannot be saved")
        with _writer(path):
            if check_folder(path, write=True) and path != self.path:
                raise TreeError(f"{path} already holds a MegaContext tree; open it, or save to another directory")
            fresh = path != self.path
            start = [0 if fresh else level.n_disk for level in self.levels]  # rows the folder already stores
            counts = [len(level) for level in self.levels]  # logical rows (a curated LOD0 stores fewer)
            meta_bytes = len(json.dumps(self._meta(counts, [2**32 - 1] * len(counts), extra or {})))
            new_bytes = sum((level.stored - a) * level.row_bytes for level, a in zip(self.levels, start))
            new_bytes += 32 * len(self.access)  # the access file
            kept = "nothing was saved there" if fresh else f"it keeps its last saved generation ({start[0]:,} tokens)"
            committed, made = [], []  # committed: set once meta.json names the new rows (nothing is undone then)
            try:
                durable.check_space(path, new_bytes + 2 * meta_bytes, f"{counts[0] - start[0]:,} new tokens and "
                                                                      "their gists")
                self._write(path, fresh, start, counts, extra, committed, made)
            except OSError as e:
                if not committed:
                    self._undo(path, fresh, start, made)
                raise TreeError(f"cannot save the tree to {path} ({durable.reason(e)}); {kept}") from None
            except BaseException:  # a simulated crash in the tests, a bug: still no half-written generation
                if not committed:
                    self._undo(path, fresh, start, made)
                raise

    def _write_access(self, path: str, fresh: bool, made: list) -> dict | None:
        """The access telemetry as a new file access.<seq>.bin (never the committed one's name, so the committed
        generation stays whole until meta.json names the new file); its record for meta.json, None when empty."""
        if not self.access:
            return None
        if self.access_meta and not fresh and not self.access_dirty:
            return self.access_meta  # unchanged: the committed file stays
        seq = 1 + (int(self.access_meta["file"].split(".")[1]) if self.access_meta else 0)
        name, rows = f"access.{seq}.bin", self.access_rows()
        made.append(name)
        durable.write_atomic(os.path.join(path, name), lambda f: f.write(rows.tobytes()))
        return {"file": name, "rows": len(rows), "crc32": _crc(rows)}

    def _write(self, path: str, fresh: bool, start: list, counts: list, extra: dict | None, committed: list,
               made: list):
        """The durable steps of save: rows appended after the committed ones, the access file, fsyncs, then meta.json
        replaced."""
        if fresh:  # an empty commit first: from now on the folder never holds tree files without a commit record
            durable.write_atomic(os.path.join(path, "meta.json"),
                                 lambda f: f.write(json.dumps(self._meta([0], [0], {})).encode()))
        crcs = []
        for l, level in enumerate(self.levels):
            _crash_point(f"write {level_file(l)}")
            crc = 0 if fresh else self.crcs[l]
            # after the committed rows, over any uncommitted bytes; a level born since the last save (or a leftover
            # file of a crashed save) starts at offset 0; a save into another folder writes every row, in chunks
            rows = [level.tail()] if start[l] == level.n_disk else level.chunks()
            with os.fdopen(os.open(os.path.join(path, self.file(l)), os.O_RDWR | os.O_CREAT, 0o644), "r+b") as f:
                f.seek(start[l] * level.row_bytes)
                for chunk in rows:
                    crc = _crc(chunk, crc)
                    f.write(np.ascontiguousarray(chunk).tobytes())
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            crcs.append(crc)
        _crash_point("write access telemetry")
        access = self._write_access(path, fresh, made)
        _crash_point("fsync directory")
        durable.fsync_dir(path)  # the data files' names (new levels) are durable before meta.json names them
        _crash_point("write meta.json")
        meta = json.dumps(self._meta(counts, crcs, extra or {}, access)).encode()
        durable.write_atomic(os.path.join(path, "meta.json"), lambda f: f.write(meta))  # the commit
        committed.append(True)
        _crash_point("fsync directory after commit")  # (write_atomic fsyncs the folder after its rename)
        for l, level in enumerate(self.levels):
            level.map(os.path.join(path, self.file(l)), level.stored)
        self.path, self.crcs, self.access_meta, self.access_dirty = path, crcs, access, False
        for name in os.listdir(path):  # access files of earlier commits (or of crashed saves): nothing names them
            if re.fullmatch(r"access\.\d+\.bin", name) and (access is None or name != access["file"]):
                durable.remove_quietly(os.path.join(path, name))

    def _undo(self, path: str, fresh: bool, start: list, made: list = ()):
        """After a failed save: every level file back to its committed rows (files with none removed), new access
        files removed and, in a folder that held no tree, the empty commit too. Truncating and removing need no free
        space."""
        for l, level in enumerate(self.levels):
            file = os.path.join(path, self.file(l))
            if start[l]:
                try:
                    os.truncate(file, start[l] * level.row_bytes)
                except OSError:
                    pass
            else:
                durable.remove_quietly(file)
        for name in made:
            durable.remove_quietly(os.path.join(path, name))
        if fresh:
            durable.remove_quietly(os.path.join(path, "meta.json"))

    @classmethod
    def open(cls, path: str, K: int, d: int, vocab_size: int, identity: str, embed, gist, verify: bool = True):
        """Open a saved tree (format v3, v2, or v1 read-and-extend) memory-mapped; returns (tree, extra). Checks
        version, K, d, model identity, sizes and (when `verify`) checksums, raising TreeError with one line that
        names the problem. A v1 tree's levels above LOD2 are made here (with `gist`) and written by the next save;
        v1 and v2 trees have no access telemetry, tags or curated spans, and are written as v3 by the next save."""
        path = os.path.abspath(path)
        meta_path = os.path.join(path, "meta.json")
        if not check_folder(path, write=False):
            raise TreeError(f"no MegaContext tree in {path} (meta.json missing)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            counts, crcs, dtype, version = meta["counts"], meta["crc32"], meta["dtype"], meta.get("format_version")
            n_levels = meta["levels"] if version in (2, FORMAT_VERSION) else 3
        except (ValueError, KeyError, TypeError) as e:
            raise TreeError(f"{meta_path} is corrupt ({type(e).__name__})") from None
        if version not in (1, 2, FORMAT_VERSION):
            raise TreeError(f"tree in {path} has format version {version}, this code reads 1 to {FORMAT_VERSION}")
        if meta["K"] != K:
            raise TreeError(f"tree in {path} was built with block size K={meta['K']}, this session uses K={K}")
        if meta["d"] != d or meta["vocab_size"] != vocab_size or meta["identity"] != identity:
            raise TreeError(f"tree in {path} was built by another model (identity {meta['identity'][:12]}, "
                            f"d={meta['d']}, vocab {meta['vocab_size']}; this model: {identity[:12]}, d={d}, "
                            f"vocab {vocab_size})")
        if dtype not in GIST_DTYPES or not len(counts) == len(crcs) == n_levels >= 1:
            raise TreeError(f"{meta_path} is corrupt (dtype {dtype!r}, {len(counts)} counts for {n_levels} levels)")
        for lod in range(1, n_levels):  # every complete span has its gist and no partial one does
            if counts[lod] != counts[lod - 1] // K:
                raise TreeError(f"{meta_path} is corrupt: {counts[lod]} LOD{lod} gists for {counts[lod - 1]} "
                                f"LOD{lod - 1} nodes at K={K}")
        if version != 1 and depth_of(counts[0], K) != n_levels - 1:
            raise TreeError(f"{meta_path} is corrupt: {n_levels} levels for {counts[0]} tokens at K={K} (the depth "
                            f"is {depth_of(counts[0], K)})")
        tree = cls(K, d, vocab_size, identity, embed, gist, dtype)
        try:
            tree.token_file, tree.generation = meta.get("token_file", "tokens.bin"), int(meta.get("generation", 0))
            tree.tags, tree.curation = dict(meta.get("tags") or {}), meta.get("curation")
            tree.levels[0].set_holes(meta.get("holes") or [])
            tree.gist_files = {int(l): str(f) for l, f in (meta.get("gist_files") or {}).items()}
            gist_holes = {int(l): runs for l, runs in (meta.get("gist_holes") or {}).items()}
            names = [tree.token_file] + list(tree.gist_files.values())
            if not all(DATA_NAME.fullmatch(n) for n in names) or tree.levels[0].dropped > counts[0]:
                raise ValueError
        except (ValueError, TypeError, AttributeError):
            raise TreeError(f"{meta_path} is corrupt (token file, generation, tags or curated spans)") from None
        for lod in range(n_levels):
            if lod and not counts[lod]:  # v1 kept empty LOD1/LOD2 files; v2 has a level once it has a node
                break
            if lod:
                tree.levels.append(_Rows((d,), dtype, tree.cache, lod))
                try:
                    tree.levels[lod].set_holes(gist_holes.get(lod, []))
                except (ValueError, TypeError):
                    raise TreeError(f"{meta_path} is corrupt (curated spans of LOD{lod})") from None
            level, file = tree.levels[lod], os.path.join(path, tree.file(lod))
            n = counts[lod] - level.dropped  # rows stored in the file
            size = os.path.getsize(file) if os.path.isfile(file) else -1
            if n and size < n * level.row_bytes:
                raise TreeError(f"tree file {file} is truncated: {max(size, 0)} bytes, meta.json commits "
                                f"{n * level.row_bytes}")
            if verify and n and _crc_file(file, n * level.row_bytes) != crcs[lod]:
                raise TreeError(f"tree file {file} is corrupt (crc32 mismatch over its {n} committed rows)")
            level.map(file, n)
        tree.path, tree.crcs = path, [int(c) for c in crcs[:len(tree.levels)]]
        tree._open_access(path, meta.get("access"))
        tree.append([])  # a v1 tree with K or more LOD2 gists: the levels above are born now
        return tree, meta.get("extra", {})

    def _open_access(self, path: str, access: dict | None):
        """Load the committed access telemetry (its file's size and crc32 checked)."""
        if not access:
            return
        file = os.path.join(path, str(access.get("file")))
        if not re.fullmatch(r"access\.\d+\.bin", str(access.get("file"))):
            raise TreeError(f"{path}/meta.json is corrupt (access file {access.get('file')!r})")
        try:
            rows = np.fromfile(file, np.int64).reshape(-1, 4)[:access["rows"]]
        except (OSError, ValueError, KeyError, TypeError):
            rows = None
        if rows is None or len(rows) != access["rows"] or _crc(rows) != access["crc32"]:
            raise TreeError(f"access telemetry {file} is missing, truncated or corrupt (meta.json commits "
                            f"{access.get('rows')} rows)")
        self.access = {(int(l), int(k)): [int(e), int(t)] for l, k, e, t in rows}
        self.access_meta = access
