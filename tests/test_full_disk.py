"""A real full disk (issue 18 item 4): every writer on a small tmpfs, mounted in a new user + mount namespace
(`unshare -Urm`, no root needed; skipped where the kernel forbids it). Each writer reports one line, cleans its
temp files, and harms nothing already committed: train.py's config.json, log and checkpoints, sample.py's trees,
prepare.py's shards. Each case runs twice where it can: refused by the free-space check before any byte (the
figures in the line), and with that check switched off, so the write itself hits ENOSPC part-way and is undone.
Injected-ENOSPC tests at every durable step of a tree save are in test_tree.py."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from test_megacontext import checkpoint  # noqa: F401  (a random tiny GPT in train.py's format, a book)

PY = sys.executable
NO_CHECK = "import durable; durable.check_space = lambda *a: None"  # as if the disk filled after the check
SMALL = ["configs/tiny.py", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=2",
         "--eval_iters=1", "--log_interval=1", "--eval_gap=0", "--warmup_iters=1"]


def namespaces_work():
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = pytest.mark.skipif(not namespaces_work(), reason="cannot mount a tmpfs here (unshare -Urm refused)")


def on_small_disk(disk, size: str, script: str):
    """Run bash `script` with a fresh tmpfs of `size` mounted at `disk` (only this namespace sees it; it is gone
    afterwards, so the script checks what it left). Returns (rc, stdout, stderr)."""
    os.makedirs(disk, exist_ok=True)
    env = {**os.environ, "MC_KERNELS": "torch", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["unshare", "-Urm", "bash", "-c", f"mount -t tmpfs -o size={size} tmpfs {disk} && cd {ROOT} "
                        f"&& {script}"], env=env, capture_output=True, text=True, timeout=600)
    return r.returncode, r.stdout, r.stderr


def python(code: str) -> str:
    return f"{PY} -c {shlex.quote(code)}"


def listing(folder: str) -> str:
    """A script line printing every file under folder with its size, as JSON, after a marker."""
    return python(f"import os, json; print('FILES', json.dumps({{os.path.relpath(os.path.join(d, n), {folder!r}): "
                  f"os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk({folder!r}) for n in ns}}))")


def files_of(stdout: str, nth: int = 0) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("FILES ")][nth][6:])


def test_full_disk_train(data_dir, tmp_path):
    """train.py: a disk already full fails on config.json in one line with the sizes and writes nothing (was: an
    OSError traceback and an empty config.json); a disk that fills after the first checkpoint fails on the second in
    one line saying the first is intact, with no temp file left, and that checkpoint loads."""
    disk, logs = str(tmp_path / "disk"), str(tmp_path)  # (stderr goes beside the disk: on it, it would be lost)
    out = f"{disk}/out"
    run = f"{PY} train.py {' '.join(SMALL)} --data_dir={data_dir} --out_dir={out} --max_iters=4 --eval_interval=2"
    rc, stdout, stderr = on_small_disk(disk, "2m", "; ".join([
        f"dd if=/dev/zero of={disk}/filler bs=64k 2>/dev/null", f"{run} 2>{logs}/err1", "echo RC $?",
        f"cat {logs}/err1", listing(disk)]))
    assert "RC 1" in stdout, stdout + stderr
    err = stdout.split("RC 1\n")[1].split("FILES")[0].strip()
    assert err.startswith(f"error: cannot write {out}/config.json (no room for config.json in {out}: it needs") \
        and err.endswith("free); nothing else was written") and "\n" not in err, err
    assert set(files_of(stdout)) == {"filler"}
    ckpt = f"{out}/ckpt.pt"
    rc, stdout, stderr = on_small_disk(disk, "2560k", "; ".join([
        python(f"{NO_CHECK}; import sys, train; train.main(sys.argv[1:])") + " " +
        f"{' '.join(SMALL)} --data_dir={data_dir} --out_dir={out} --max_iters=4 --eval_interval=2 2>{logs}/err",
        "echo RC $?", f"tail -n 1 {logs}/err", listing(disk),
        python(f"import torch, json; c = torch.load({ckpt!r}, weights_only=False); print('STEP', c['step']); "
               f"[json.loads(line) for line in open({out + '/log.jsonl'!r})]; json.load(open({out + '/config.json'!r}))"
               )]))
    assert "RC 1" in stdout and "STEP 2" in stdout, stdout + stderr
    err = stdout.split("RC 1\n")[1].split("\n")[0]
    assert err == (f"error: cannot write the checkpoint {ckpt} (No space left on device); the checkpoint of step 2 is "
                   "intact: free space, then --init_from=resume"), err
    assert set(files_of(stdout)) == {"out/ckpt.pt", "out/config.json", "out/log.jsonl"}


def test_full_disk_sample_tree(checkpoint, tmp_path):  # noqa: F811
    """sample.py --mc --tree: a session saved, then a book streamed into it on a disk without room for it, with the
    free-space check off so that the save fails part-way through its writes (the check's own refusal: test_tree.py):
    one line that says the tree keeps its last generation; the tree then opens with exactly that generation and
    nothing else in its folder (was: tokens.bin and lod1.bin.tmpNNNN left, the folder refused with advice to restore
    a meta.json that never existed)."""
    ckpt, book, _ = checkpoint
    disk, logs = str(tmp_path / "disk"), str(tmp_path)
    tree = f"{disk}/tree"
    mc = f"--ckpt {ckpt} --mc --budget 128 --block 8 --recent 16 --tree {tree} --max-new-tokens 3"
    stream = f"--prompt-file {book} {mc}"
    verify = python(f"import json, sys; sys.path.insert(0, {ROOT!r}); from tree import MegaContextTree as T; "
                    f"m = json.load(open({tree + '/meta.json'!r})); "
                    f"t, _ = T.open({tree!r}, m['K'], m['d'], m['vocab_size'], m['identity'], None, None); "
                    "print('TOKENS', len(t))")
    unchecked = python(f"{NO_CHECK}; import runpy, sys; sys.argv = ['sample.py'] + sys.argv[1:]; "
                       "runpy.run_path('sample.py', run_name='__main__')")
    rc, stdout, stderr = on_small_disk(disk, "160k", "; ".join([  # the session fits, the book's rows do not
        f"{unchecked} --prompt hello {mc} 2>{logs}/err0", f"grep -o 'saved [0-9]* tokens' {logs}/err0",
        f"{unchecked} {stream} 2>{logs}/err", "echo RC $?", f"cat {logs}/err", verify, listing(tree)]))
    n = int(stdout.split("saved ")[1].split()[0])
    assert f"TOKENS {n}\n" in stdout, stdout + stderr  # the same generation before and after
    part = stdout.split("RC ")[1]
    lines = [x for x in part.splitlines()[1:] if not x.startswith(("TOKENS", "FILES", "[mc] "))]
    assert part.startswith("1\n") and len(lines) == 1, part  # (the session's own [mc] lines before it)
    assert lines[0] == f"error: cannot save the tree to {tree} (No space left on device); it keeps its last saved " \
                       f"generation ({n} tokens)", lines[0]
    assert files_of(stdout) == {"meta.json": files_of(stdout)["meta.json"], "tokens.bin": 4 * n,
                                "lod1.bin": 4 * 64 * (n // 8)}, files_of(stdout)  # nothing torn, no temp file


def test_full_disk_prepare(tmp_path):
    """prepare.py --out on a disk too small for the shards: one line (the sizes, or the OS's words when the check is
    off), the earlier prepared data untouched byte for byte, no temp file left."""
    disk, logs = str(tmp_path / "disk"), str(tmp_path)
    small = "--synthetic --vocab-size 300 --syn-docs 2 --syn-chars 3000"
    big = "--synthetic --vocab-size 300 --syn-docs 16 --syn-chars 100000 --seed 1"  # ~1.2 MB of train shard
    rc, stdout, stderr = on_small_disk(disk, "1536k", "; ".join([
        f"{PY} prepare.py --out {disk}/data {small} >/dev/null", listing(disk),
        f"{PY} prepare.py --out {disk}/data {big} >/dev/null 2>{logs}/err1", "echo RC $?", f"cat {logs}/err1",
        python(f"{NO_CHECK}; import prepare; prepare.main()") + f" --out {disk}/data {big} >/dev/null 2>{logs}/err2",
        "echo RC $?", f"cat {logs}/err2", listing(disk)]))
    before, after = files_of(stdout, 0), files_of(stdout, 1)
    assert before == after and "data/train.bin" in before, (before, after, stderr)
    parts = stdout.split("RC ")
    assert parts[1].startswith("1\nprepare.py: error: no room for train.bin in ") and "MiB free" in parts[1], parts[1]
    assert parts[2].startswith("1\nprepare.py: error: No space left on device; nothing in ") and \
        "was replaced (the temp files are removed)" in parts[2], parts[2]
    for part in parts[1:]:
        assert len([x for x in part.splitlines()[1:] if not x.startswith("FILES")]) == 1, part
