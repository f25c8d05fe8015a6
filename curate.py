"""MegaCuration: telemetry-driven compaction of a saved tree, with a dry run, an audit log and a rollback.

    python curate.py report  --tree out/book --policy configs/curate/default.py   # dry run: what would go, bytes saved
    python curate.py apply   --tree out/book --policy configs/curate/default.py   # a new generation + an audit line
    python curate.py restore --tree out/book                                     # the previous generation, exactly
    python curate.py tag     --tree out/book --name library --span 0:1000000     # protect a span by tag

Compact = drop the tokens (LOD0) of a K-token block and keep every gist over it: the tree still opens and serves
gists there, and a session never zooms below LOD1 into it (MegaContextTree.expandable). A block is compacted when
all of: it ends at least `min_age` tokens and `keep_recent` tokens before the history's end; its LOD1 gist was
expanded at most `max_expansions` times (the access telemetry sessions record) and not within the last `min_idle`
tokens; it meets no protected range (`protect_ranges`, or the spans of the tags in `protect_tags`). Delete (with
`delete_age` > 0) = also drop the K LOD1 gists of a K*K-token span older than `delete_age` whose blocks are all
compacted and whose LOD2 gist is not in use: a session then zooms no further than LOD2 there. Gists are most of a
tree's bytes (d values per K tokens), so deleting is what shrinks the whole tree; compacting shrinks its tokens.

Generations (the tree's meta.json says which; generation G keeps its tokens in tokens.g<G>.bin, G = 0 in tokens.bin)
and their durable steps, each a point where a crash leaves the folder opening as one whole generation:
  apply    1. the live generation's commit record, access file and the level files it replaces (the token file; the
              LOD1 file when deleting) are hard-linked (copied where links fail) into curate/gen<G>.tmp with
              files.json (those names, and the sizes of the gist files both generations share), then renamed to
              curate/gen<G>;
           2. the kept rows are written to tokens.g<G+1>.bin (and lod1.g<G+1>.bin): new names, the live generation
              is untouched;
           3. meta.json is replaced atomically (the commit): generation G+1, its files, the dropped rows (`holes`,
              `gist_holes`), and the audit record of this apply (`curation`);
           4. the replaced files' top-level names go, and the record is appended to curate/audit.jsonl.
  restore  the backup's files are linked back under their names, its meta.json replaces the live one (the commit),
           then the shared gist files are cut back to their recorded sizes and the newer generation's files
           removed: every tree file is byte for byte what it was before the apply. Rows appended after the apply
           are lost (restore brings the previous generation back, not a merge).
Gist files a generation does not rewrite are append-only, so it shares them with the one before: a backup costs
links, not copies. Only the one previous generation is kept (the next apply replaces it); its token
file stays on disk until then, so the bytes a compaction saves are free once the next apply (or `rm -r curate/gen*`)
lets the backup go. The audit log is the `curation` record in meta.json (atomic with the commit) and its copy in
curate/audit.jsonl, re-appended by the next command if a crash fell between the two.
"""
import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys

import numpy as np

import durable
from configs import ConfigError, load_config
from tree import CURATE_DIR, FILL, OWN_NAME, MegaContextTree, TreeError, TreeLock, _crc, check_folder

CHUNK = 1 << 22  # tokens per streamed chunk of a token-file rewrite


@dataclasses.dataclass(frozen=True)
class CurationPolicy:
    min_age: int = 1 << 20  # tokens between a block's end and the history's end before it may be compacted
    keep_recent: int = 1 << 16  # the newest tokens are never curated (a session's raw region lives there)
    max_expansions: int = 0  # a block whose LOD1 gist was expanded more often than this keeps its tokens
    min_idle: int = 1 << 20  # a block accessed within the last min_idle tokens keeps its tokens
    delete_age: int = 0  # tokens: a K*K-token span older than this, none of whose blocks (nor its LOD2 gist) would
    # be kept, loses its LOD1 gists too (only its LOD2 gist and above stay); 0 = never
    protect_tags: list = dataclasses.field(default_factory=list)  # tag names (curate.py tag) never curated
    protect_ranges: list = dataclasses.field(default_factory=list)  # [[a, b], ...] token ranges never curated

    def validate(self):
        if min(self.min_age, self.keep_recent, self.max_expansions, self.min_idle, self.delete_age) < 0:
            raise ConfigError("min_age, keep_recent, max_expansions, min_idle and delete_age must be >= 0")
        if not all(isinstance(t, str) for t in self.protect_tags):
            raise ConfigError(f"protect_tags must be a list of tag names, got {self.protect_tags!r}")
        for r in self.protect_ranges:
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) for v in r)
                    and 0 <= r[0] < r[1]):
                raise ConfigError(f"protect_ranges must be [[a, b], ...] with 0 <= a < b, got {r!r}")


def _crash_point(what: str):
    """Called before every durable step of apply (a no-op): tests replace it to crash an apply at each point."""


def _need_tree(path: str) -> str:
    """The absolute path of a folder holding a committed tree, checked before a lock would create the folder."""
    path = os.path.abspath(path)
    if not os.path.isdir(path) or not check_folder(path, write=False):
        raise TreeError(f"no MegaContext tree in {path} (meta.json missing)")
    return path


def open_tree(path: str) -> tuple[MegaContextTree, dict]:
    """Open the tree in `path` under its own model identity (curation reads stored rows; it runs no model)."""
    path = _need_tree(path)
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        K, d, V, identity = meta["K"], meta["d"], meta["vocab_size"], meta["identity"]
    except (ValueError, KeyError, TypeError) as e:
        raise TreeError(f"{path}/meta.json is corrupt ({type(e).__name__})") from None
    if meta.get("format_version") == 1:
        raise TreeError(f"tree in {path} is format v1: open and save it in a session once (sample.py --mc --tree), "
                        "which writes it as v3")
    tree, _ = MegaContextTree.open(path, K, d, V, identity, None, None)
    return tree, meta


def protected_blocks(tree: MegaContextTree, policy: CurationPolicy) -> np.ndarray:
    """bool (n_blocks,): blocks that meet a protected range or tagged span."""
    nb, K = tree.n_nodes(1), tree.K
    out = np.zeros(nb, bool)
    missing = [t for t in policy.protect_tags if t not in tree.tags]
    if missing:
        raise ConfigError(f"protect_tags names {', '.join(missing)}, which this tree does not have (its tags: "
                          f"{', '.join(sorted(tree.tags)) or 'none'})")
    spans = [r for t in policy.protect_tags for r in tree.tags[t]] + list(policy.protect_ranges)
    for a, b in spans:
        out[a // K:min(nb, -(-b // K))] = True
    return out


def plan(tree: MegaContextTree, policy: CurationPolicy) -> dict:
    """What `apply` would do: compact (bool per block: drop its tokens), delete (bool per LOD2 node: drop its LOD1
    gists as well), the reasons blocks are kept, and the footprint."""
    n, K, nb, n2 = len(tree), tree.K, tree.n_nodes(1), tree.n_nodes(2)
    rows = tree.access_rows()

    def usage(lod, count):
        expansions, last = np.zeros(count, np.int64), np.full(count, -1, np.int64)
        at = rows[(rows[:, 0] == lod) & (rows[:, 1] < count)]
        expansions[at[:, 1]], last[at[:, 1]] = at[:, 2], at[:, 3]
        return (expansions > policy.max_expansions) | ((last >= 0) & (n - last < policy.min_idle))
    end = (np.arange(nb, dtype=np.int64) + 1) * K
    old = (n - end >= policy.min_age) & (end <= n - policy.keep_recent)
    used, protect = usage(1, nb), protected_blocks(tree, policy)
    gone = np.zeros(nb, bool)  # blocks an earlier generation already compacted
    if tree.levels[0].holes is not None:
        gone = tree.dropped(0, np.arange(nb, dtype=np.int64) * K)
    compact = old & ~used & ~protect & ~gone
    delete = np.zeros(n2, bool)
    if policy.delete_age and n2:
        end2 = (np.arange(n2, dtype=np.int64) + 1) * K * K
        kids = (compact | gone)[:n2 * K].reshape(n2, K)  # every block of the span loses (or lost) its tokens
        delete = (n - end2 >= policy.delete_age) & (end2 <= n - policy.keep_recent) & kids.all(1) & ~usage(2, n2)
        if tree.levels[1].holes is not None:
            delete &= ~tree.dropped(1, np.arange(n2, dtype=np.int64) * K)
    stored, gist_bytes = tree.levels[0].stored, tree.levels[1].row_bytes if nb else 0
    return dict(compact=compact, delete=delete, tokens=n, blocks=nb, K=K, old_blocks=int((old & ~gone).sum()),
                kept_accessed=int((old & used & ~gone).sum()),
                kept_protected=int((old & ~used & protect & ~gone).sum()),
                already=int(gone.sum()), compact_blocks=int(compact.sum()), bytes_before=4 * stored,
                bytes_after=4 * (stored - K * int(compact.sum())), delete_spans=int(delete.sum()),
                gist_bytes_saved=int(delete.sum()) * K * gist_bytes)


def runs(mask: np.ndarray) -> list:
    """[[a, b], ...] index runs where mask is true."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return edges.reshape(-1, 2).tolist()


def merge(spans: list) -> list:
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def describe(p: dict, policy_file: str) -> str:
    saved = p["bytes_before"] - p["bytes_after"]
    spans = runs(p["compact"])
    show = ", ".join(f"[{a * p['K']:,}, {b * p['K']:,})" for a, b in spans[:5]) + (" ..." if len(spans) > 5 else "")
    return "\n".join([
        f"policy {policy_file}: {p['tokens']:,} tokens, {p['blocks']:,} blocks of {p['K']}",
        f"  old enough: {p['old_blocks']:,} blocks; kept as accessed: {p['kept_accessed']:,}; kept as protected: "
        f"{p['kept_protected']:,}; compacted before: {p['already']:,}",
        f"  compact: {p['compact_blocks']:,} blocks ({p['compact_blocks'] * p['K']:,} tokens) in {len(spans):,} spans"
        + (f": {show}" if spans else ""),
        f"  delete: {p['delete_spans']:,} spans of {p['K'] ** 2:,} tokens lose their LOD1 gists "
        f"(saves {durable.mib(p['gist_bytes_saved'])}; their LOD2 gists and above are kept)",
        f"  token file: {durable.mib(p['bytes_before'])} -> {durable.mib(p['bytes_after'])} "
        f"(saves {durable.mib(saved)})"])


def _link(src: str, dst: str):
    """dst becomes a name of src's bytes (a hard link; a copy where the filesystem has none), atomically."""
    tmp = f"{dst}.tmp{os.getpid()}"
    durable.remove_quietly(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def _sync_audit(path: str, meta: dict, extra: dict | None = None):
    """Append the audit record of the live generation's apply to curate/audit.jsonl when it is missing (a crash
    between commit and log), then `extra` (a restore's line)."""
    log = os.path.join(path, CURATE_DIR, "audit.jsonl")
    lines = open(log).read().splitlines() if os.path.isfile(log) else []
    add = []
    if meta.get("curation") and not any(json.loads(x) == meta["curation"] for x in lines if x.strip()):
        add.append(meta["curation"])
    if extra:
        add.append(extra)
    if add:
        text = "".join(line + "\n" for line in lines) + "".join(json.dumps(r) + "\n" for r in add)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        durable.write_atomic(log, lambda f: f.write(text.encode()))


def _write_level(path: str, tree: MegaContextTree, lod: int, holes: list, name: str) -> int:
    """Level lod's rows outside `holes` (logical row runs, a superset of its current ones) into file `name`, streamed
    (temp file, fsync, rename); returns their crc32."""
    level, n = tree.levels[lod], len(tree.levels[lod])
    keep = np.ones(n, bool)
    for a, b in holes:
        keep[a:b] = False

    def write(f):
        crc = 0
        step = max(1, CHUNK // max(1, level.row_bytes // 4))
        for a in range(0, n, step):
            idx = np.arange(a, min(n, a + step), dtype=np.int64)[keep[a:a + step]]
            assert not level.physical(idx)[1].any(), "a dropped row would be written"
            rows = level.take(idx)
            crc = _crc(rows, crc)
            f.write(rows.tobytes())
        return crc
    return durable.write_atomic(os.path.join(path, name), write, level.row_bytes * int(keep.sum()), name)


def apply(path: str, policy: CurationPolicy, policy_file: str = "") -> dict:
    """Compact (and delete) what `plan` says into a new generation (module docstring); returns the audit record."""
    path = _need_tree(path)
    with TreeLock(path):
        tree, meta = open_tree(path)
        p = plan(tree, policy)
        if not p["compact_blocks"] and not p["delete_spans"]:
            return {"op": "apply", "generation": tree.generation, "compact_blocks": 0, "delete_spans": 0}
        G, K, n = tree.generation, tree.K, len(tree)
        holes = {0: merge(tree.holes + [[a * K, b * K] for a, b in runs(p["compact"])])}
        if p["delete_spans"]:
            holes[1] = merge(tree.level_holes(1) + [[a * K, b * K] for a, b in runs(p["delete"])])
        names = {l: (f"tokens.g{G + 1}.bin" if l == 0 else f"lod{l}.g{G + 1}.bin") for l in holes}
        # 1. the live generation into curate/gen<G>: links of its commit record, access file and the level files
        # this apply replaces; the sizes of the gist files it shares with the new generation
        curate = os.path.join(path, CURATE_DIR)
        os.makedirs(curate, exist_ok=True)
        backup, tmp = os.path.join(curate, f"gen{G}"), os.path.join(curate, f"gen{G}.tmp")
        _crash_point("backup")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        links = ["meta.json"] + [tree.file(l) for l in holes] + ([meta["access"]["file"]] if meta.get("access") else [])
        for name in links:
            _link(os.path.join(path, name), os.path.join(tmp, name))
        sizes = {tree.file(l): os.path.getsize(os.path.join(path, tree.file(l)))
                 for l in range(1, len(tree.levels)) if l not in holes}
        files = json.dumps({"links": links, "sizes": sizes}).encode()
        durable.write_atomic(os.path.join(tmp, "files.json"), lambda f: f.write(files))
        durable.fsync_dir(tmp)
        for old in os.listdir(curate):  # only one previous generation is kept
            if old.startswith("gen") and old != f"gen{G}.tmp":
                shutil.rmtree(os.path.join(curate, old), ignore_errors=True)
        os.replace(tmp, backup)
        durable.fsync_dir(curate)
        # 2. the kept rows under the new generation's names
        crcs = list(meta["crc32"])
        for l in sorted(holes):
            _crash_point(f"write {'tokens' if l == 0 else f'LOD{l} gists'}")
            crcs[l] = _write_level(path, tree, l, holes[l], names[l])
        # 3. the commit
        _crash_point("write meta.json")
        record = {"op": "apply", "generation": G + 1,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "policy": policy_file, "settings": dataclasses.asdict(policy), "tokens": n,
                  "compact_blocks": p["compact_blocks"], "kept_accessed": p["kept_accessed"],
                  "kept_protected": p["kept_protected"], "bytes_before": p["bytes_before"],
                  "bytes_after": p["bytes_after"], "spans": [[a * K, b * K] for a, b in runs(p["compact"])],
                  "delete_spans": p["delete_spans"], "gist_bytes_saved": p["gist_bytes_saved"],
                  "deleted": [[a * K * K, b * K * K] for a, b in runs(p["delete"])]}
        gist_files = {**(meta.get("gist_files") or {}), **{str(l): names[l] for l in holes if l}}
        gist_holes = {**(meta.get("gist_holes") or {}), **{str(l): holes[l] for l in holes if l}}
        new = {**meta, "format_version": 3, "token_file": names[0], "holes": holes[0], "gist_files": gist_files,
               "gist_holes": gist_holes, "generation": G + 1, "crc32": crcs, "curation": record}
        new.setdefault("tags", {})
        new.setdefault("access", None)
        durable.write_atomic(os.path.join(path, "meta.json"), lambda f: f.write(json.dumps(new).encode()))
        # 4. the replaced files' top-level names (the backup keeps them), and the log
        _crash_point("remove replaced files")
        for l in holes:
            if tree.file(l) != names[l]:
                durable.remove_quietly(os.path.join(path, tree.file(l)))
        _crash_point("audit log")
        _sync_audit(path, new)
        return record


def restore(path: str) -> dict:
    """Bring back the generation before the last apply, byte for byte (module docstring)."""
    path = _need_tree(path)
    with TreeLock(path):
        tree, meta = open_tree(path)
        G = tree.generation
        backup = os.path.join(path, CURATE_DIR, f"gen{G - 1}")
        if G == 0 or not os.path.isfile(os.path.join(backup, "meta.json")):
            raise TreeError(f"{path} has no previous generation to restore (generation {G}; curate.py keeps the one "
                            f"before the last apply in {CURATE_DIR}/)")
        with open(os.path.join(backup, "meta.json")) as f:
            old = json.load(f)
        with open(os.path.join(backup, "files.json")) as f:
            files = json.load(f)
        links, sizes = files["links"], files["sizes"]
        for name, size in sizes.items():
            if os.path.getsize(os.path.join(path, name)) < size:
                raise TreeError(f"{path}/{name} is shorter than the previous generation's ({size} bytes): it cannot "
                                "be restored")
        for name in links[1:]:  # the replaced level files and the access file under their names
            _link(os.path.join(backup, name), os.path.join(path, name))
        durable.fsync_dir(path)
        _link(os.path.join(backup, "meta.json"), os.path.join(path, "meta.json"))  # the commit
        durable.fsync_dir(path)
        for name in os.listdir(path):  # the newer generation's files: gist bytes past the old commit, new files
            if name in sizes:
                os.truncate(os.path.join(path, name), sizes[name])
            elif name not in links and name not in ("lock", CURATE_DIR) and OWN_NAME.fullmatch(name):
                durable.remove_quietly(os.path.join(path, name))
        shutil.rmtree(backup, ignore_errors=True)
        record = {"op": "restore", "generation": G - 1,
                  "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        _sync_audit(path, old, record)
        return record


def tag(path: str, name: str, span: str) -> dict:
    """Tag tokens [a, b) of the tree in `path` (saved with it: a new commit record, rows unchanged)."""
    path = _need_tree(path)
    try:
        a, b = (int(v.replace(",", "").replace("_", "")) for v in span.split(":"))
    except ValueError:
        raise ConfigError(f"--span must look like START:END (token positions), got {span!r}") from None
    with TreeLock(path):
        tree, meta = open_tree(path)
        tree.tag(name, a, b)
        tree.save(path, meta.get("extra", {}))
    return {"op": "tag", "name": name, "span": [a, b]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["report", "apply", "restore", "tag"])
    ap.add_argument("--tree", required=True, help="the tree folder (sample.py --mc --tree DIR)")
    ap.add_argument("--policy", help="a policy file (configs/curate/*.py); report and apply")
    ap.add_argument("--name", help="tag: the tag's name")
    ap.add_argument("--span", help="tag: START:END token positions")
    args = ap.parse_args(argv)
    try:
        if args.command in ("report", "apply"):
            if not args.policy:
                raise ConfigError(f"{args.command} needs --policy FILE (e.g. configs/curate/default.py)")
            policy = load_config(CurationPolicy, [args.policy])
            if args.command == "report":
                tree, _ = open_tree(args.tree)
                print(describe(plan(tree, policy), args.policy))
            else:
                r = apply(args.tree, policy, args.policy)
                done = r["compact_blocks"] or r["delete_spans"]
                print(f"generation {r['generation']}: {r['compact_blocks']:,} blocks compacted"
                      + (f", {r['delete_spans']:,} spans' LOD1 gists deleted, token file "
                         f"{durable.mib(r['bytes_before'])} -> {durable.mib(r['bytes_after'])}"
                         if done else " (nothing to do)"))
        elif args.command == "restore":
            r = restore(args.tree)
            print(f"restored generation {r['generation']}")
        else:
            if not (args.name and args.span):
                raise ConfigError("tag needs --name NAME and --span START:END")
            tag(args.tree, args.name, args.span)
            print(f"tagged [{args.span}) as {args.name!r}")
    except (TreeError, ConfigError, ValueError) as e:
        print(f"curate.py: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"curate.py: {args.tree}: {durable.reason(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
