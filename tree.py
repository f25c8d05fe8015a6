"""The MegaContext tree (DESIGN §2, §7): every token (LOD0) and a gist of every complete aligned span (LOD1, LOD2),
in memory and on disk.

Nodes are `(lod, index)` integer pairs: level l node k covers tokens [k*K**l, (k+1)*K**l); its parent is
(l+1, k // K) and its children are (l-1, k*K + j), j < K. Storage is one append-only array per level: token ids
(int32) for LOD0, gist vectors (n, d) for LOD1..TOP. A gist is made exactly when its span completes: LOD1 node k
when token (k+1)*K - 1 arrives, LOD2 node k when its K-th LOD1 child exists. Partial blocks are never pooled.

This file is split from megacontext.py by concept: it is the storage layer (arrays, files, checksums) and knows
nothing of the networks; `embed` (token ids -> embeddings) and `gist` (level, children -> gists) are callables.

On disk a tree is a directory:
    tokens.bin   int32 token ids                     lod1.bin, lod2.bin   gist rows, `dtype` (float32 or float16)
    meta.json    format version, K, d, dtype, vocab size, model identity, committed row counts, crc32 per file, and
                 `extra` (the caller's state, e.g. the working context of a session)
The .bin files are append-only logs and meta.json is the commit record: a save appends the new rows in place after
the committed ones, fsyncs, then replaces meta.json atomically (temp file, flush, fsync, os.replace). A crash at any
point leaves the previous meta.json, whose counts and checksums describe a consistent prefix; bytes past it are
ignored and overwritten by the next save. (Rewriting a whole .bin through a temp file on every save would be atomic
too, but costs O(history) per save.) `open` memory-maps the committed rows, so history is bounded by disk, not RAM.
A folder holding .bin files but no meta.json, or one that cannot be written, is refused before any write
(check_folder).
"""
import json
import os
import tempfile
import zlib

import numpy as np
import torch

TOP = 2  # the coarsest level of detail: LOD2 covers K**2 tokens and is never collapsed
FORMAT_VERSION = 1
GIST_DTYPES = ("float32", "float16")  # numpy-native, so np.memmap can map them (bf16 is not)


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

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.disk, self.n_disk = None, 0  # np.memmap of the committed rows (read-only)
        self.ram, self.n_ram = np.zeros((16, *self.shape), self.dtype), 0

    def __len__(self):
        return self.n_disk + self.n_ram

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
        """Rows at int64 indices idx (any order) -> (len(idx), *shape)."""
        out = np.empty((len(idx), *self.shape), self.dtype)
        on_disk = idx < self.n_disk
        if on_disk.any():
            out[on_disk] = self.disk[idx[on_disk]]
        out[~on_disk] = self.ram[idx[~on_disk] - self.n_disk]
        return out

    def slice(self, a: int, b: int) -> np.ndarray:
        return self.take(np.arange(a, b, dtype=np.int64))

    def tail(self) -> np.ndarray:
        """The rows not yet on disk."""
        return self.ram[:self.n_ram]

    def map(self, path: str, n: int):
        """Make rows [0, n) the memory-mapped prefix of `path` and drop the RAM tail (they are on disk now)."""
        self.disk = np.memmap(path, self.dtype, "r", shape=(n, *self.shape)) if n else None
        self.n_disk, self.n_ram = n, 0
        self.ram = np.zeros((16, *self.shape), self.dtype)


def _crc(rows: np.ndarray, prev: int = 0) -> int:
    return zlib.crc32(np.ascontiguousarray(rows).view(np.uint8).reshape(-1), prev)


def _write_atomic(path: str, data: bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on every platform; the data itself is already fsynced
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_folder(path: str, write: bool) -> bool:
    """Whether folder `path` holds a committed tree (a meta.json). Called before anything is read or written; raises
    TreeError (one line) for tree files without a commit record, which writing a new tree there would destroy, and,
    when `write`, for a folder (or, if it does not exist yet, its nearest existing parent) or tree file that cannot
    be written. Writability is probed, not read from mode bits, so root, ACLs and read-only mounts all count."""
    path = os.path.abspath(path)
    folder = path
    while not os.path.isdir(folder):  # the folder, or the nearest existing parent a save would create it in
        if os.path.exists(folder):
            raise TreeError(f"{folder} is a file, not a folder")
        folder = os.path.dirname(folder)
    names = sorted(os.listdir(path)) if folder == path else []
    data = [n for n in names if n == "tokens.bin" or (n.startswith("lod") and n.endswith(".bin"))]
    committed = "meta.json" in names
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


class MegaContextTree:
    """Token ids and gists of one history, addressed by (lod, index).

    embed(ids: LongTensor (n,)) -> (n, d) input embeddings of the base model;
    gist(lod, x: (N, K, d)) -> (N, d) gists of N complete blocks of children (x may arrive as fp32 on the CPU).
    identity: a string that names the base model and GistNet weights (their hash); a tree only opens under it.
    """

    FILES = ("tokens.bin", "lod1.bin", "lod2.bin")

    def __init__(self, K: int, d: int, vocab_size: int, identity: str, embed, gist, dtype: str = "float32"):
        if dtype not in GIST_DTYPES:
            raise ValueError(f"gist dtype must be one of {', '.join(GIST_DTYPES)}, got {dtype!r}")
        self.K, self.d, self.vocab_size, self.identity, self.dtype = K, d, vocab_size, identity, dtype
        self.embed, self.gist = embed, gist
        self.levels = [_Rows((), np.int32)] + [_Rows((d,), dtype) for _ in range(TOP)]  # LOD0 ids, LOD1.. gists
        self.path, self.crcs = None, [0] * (TOP + 1)  # backing directory and the crc32 of each committed prefix

    def __len__(self):
        return len(self.levels[0])

    def n_nodes(self, lod: int) -> int:
        return len(self.levels[lod])

    def tokens(self, start: int, end: int) -> np.ndarray:
        return self.levels[0].slice(start, end).astype(np.int64)

    def gists(self, lod: int, index: np.ndarray) -> np.ndarray:
        assert lod >= 1
        return self.levels[lod].take(np.asarray(index, np.int64))

    def append(self, tokens, batch: int = 1024):
        """Append token ids and make every gist that completes. All-or-nothing: a bad id or a failing gist leaves
        the tree unchanged. Gists are computed `batch` blocks at a time."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        new = [ids]
        for lod in range(1, TOP + 1):
            below, have = self.levels[lod - 1], self.n_nodes(lod)
            n_blocks = (len(below) + len(new[-1])) // self.K - have
            if n_blocks == 0:  # most appends (one decoded token) complete no block
                new.append(np.zeros((0, self.d), self.dtype))
                continue
            old = below.slice(have * self.K, len(below))  # children not yet pooled, then the new ones
            kids = np.concatenate([old, new[-1]]) if len(new[-1]) else old
            made = [self._pool(lod, kids[i * self.K:(i + b) * self.K], b)
                    for i in range(0, n_blocks, batch) for b in [min(batch, n_blocks - i)]]
            new.append(np.concatenate(made))
        for rows, level in zip(new, self.levels):  # commit only once everything is computed
            level.append(rows)

    @torch.no_grad()
    def _pool(self, lod: int, kids: np.ndarray, n: int) -> np.ndarray:
        """Gists of n complete blocks: kids holds n*K token ids (lod 1) or n*K gist rows (lod 2)."""
        x = self._to_embeddings(lod - 1, kids)  # (n*K, d)
        out = self.gist(lod, x.view(n, self.K, self.d))
        return out.float().cpu().numpy().astype(self.dtype)

    def _to_embeddings(self, lod: int, rows: np.ndarray) -> torch.Tensor:
        if lod == 0:
            return self.embed(torch.from_numpy(np.asarray(rows, np.int64)))
        return torch.from_numpy(np.asarray(rows, np.float32))  # `gist` moves it to the model's device

    def node_embeddings(self, lod: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Input embeddings (n, d) of nodes (lod[i], index[i]): token embeddings for LOD0, stored gists above."""
        lod_np, idx_np = lod.cpu().numpy(), index.cpu().numpy()
        tok = lod_np == 0
        x = self.embed(torch.from_numpy(self.levels[0].take(idx_np[tok]).astype(np.int64)))  # (n0, d)
        if tok.all():
            return x
        out = x.new_empty((len(lod_np), self.d))
        out[torch.from_numpy(tok).to(x.device)] = x
        for l in range(1, TOP + 1):
            sel = lod_np == l
            if sel.any():
                rows = torch.from_numpy(self.levels[l].take(idx_np[sel]).astype(np.float32))
                out[torch.from_numpy(sel).to(x.device)] = rows.to(x.device, x.dtype)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # disk

    def _meta(self, counts, crcs, extra) -> dict:
        return {"format_version": FORMAT_VERSION, "K": self.K, "d": self.d, "dtype": self.dtype,
                "token_dtype": "int32", "vocab_size": self.vocab_size, "identity": self.identity,
                "counts": counts, "crc32": crcs, "extra": extra}

    def save(self, path: str, extra: dict | None = None):
        """Write (or append to) the tree in directory `path`; then the tree is backed by it (memory-mapped).

        A folder holding another tree, or tree files without a commit record, is refused before anything is
        written (check_folder)."""
        path = os.path.abspath(path)
        if check_folder(path, write=True) and path != self.path:
            raise TreeError(f"{path} already holds a MegaContext tree; open it, or save to another directory")
        os.makedirs(path, exist_ok=True)
        fresh = path != self.path
        counts, crcs = [len(level) for level in self.levels], list(self.crcs)
        for l, (name, level) in enumerate(zip(self.FILES, self.levels)):
            file = os.path.join(path, name)
            if fresh:  # a new directory: whole files, each through a temp file
                rows = level.slice(0, len(level))
                crcs[l] = _crc(rows)
                _write_atomic(file, np.ascontiguousarray(rows).tobytes())
                continue
            tail = level.tail()
            crcs[l] = _crc(tail, crcs[l])
            with open(file, "r+b") as f:  # append after the committed rows, over any uncommitted bytes
                f.seek(level.n_disk * level.row_bytes)
                f.write(np.ascontiguousarray(tail).tobytes())
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        _write_atomic(os.path.join(path, "meta.json"), json.dumps(self._meta(counts, crcs, extra or {})).encode())
        _fsync_dir(path)
        for name, level, n in zip(self.FILES, self.levels, counts):
            level.map(os.path.join(path, name), n)
        self.path, self.crcs = path, crcs

    @classmethod
    def open(cls, path: str, K: int, d: int, vocab_size: int, identity: str, embed, gist, verify: bool = True):
        """Open a saved tree memory-mapped; returns (tree, extra). Checks version, K, d, model identity, sizes and
        (when `verify`) checksums, raising TreeError with one line that names the problem."""
        path = os.path.abspath(path)
        meta_path = os.path.join(path, "meta.json")
        if not check_folder(path, write=False):
            raise TreeError(f"no MegaContext tree in {path} (meta.json missing)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            counts, crcs, dtype = meta["counts"], meta["crc32"], meta["dtype"]
        except (ValueError, KeyError, TypeError) as e:
            raise TreeError(f"{meta_path} is corrupt ({type(e).__name__})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise TreeError(f"tree in {path} has format version {meta.get('format_version')}, this code reads "
                            f"{FORMAT_VERSION}")
        if meta["K"] != K:
            raise TreeError(f"tree in {path} was built with block size K={meta['K']}, this session uses K={K}")
        if meta["d"] != d or meta["vocab_size"] != vocab_size or meta["identity"] != identity:
            raise TreeError(f"tree in {path} was built by another model (identity {meta['identity'][:12]}, "
                            f"d={meta['d']}, vocab {meta['vocab_size']}; this model: {identity[:12]}, d={d}, "
                            f"vocab {vocab_size})")
        if dtype not in GIST_DTYPES or len(counts) != TOP + 1 or len(crcs) != TOP + 1:
            raise TreeError(f"{meta_path} is corrupt (dtype {dtype!r}, {len(counts)} levels)")
        tree = cls(K, d, vocab_size, identity, embed, gist, dtype)
        for name, level, n, crc in zip(cls.FILES, tree.levels, counts, crcs):
            file = os.path.join(path, name)
            size = os.path.getsize(file) if os.path.isfile(file) else -1
            if size < n * level.row_bytes:
                raise TreeError(f"tree file {file} is truncated: {max(size, 0)} bytes, meta.json commits "
                                f"{n * level.row_bytes}")
            level.map(file, n)
            if verify and n and _crc(level.disk) != crc:
                raise TreeError(f"tree file {file} is corrupt (crc32 mismatch over its {n} committed rows)")
        for lod in range(1, TOP + 1):  # every complete span has its gist and no partial one does
            if counts[lod] != counts[lod - 1] // K:
                raise TreeError(f"{meta_path} is corrupt: {counts[lod]} LOD{lod} gists for {counts[lod - 1]} "
                                f"LOD{lod - 1} nodes at K={K}")
        tree.path, tree.crcs = path, list(crcs)
        return tree, meta.get("extra", {})
