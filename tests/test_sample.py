"""sample.py as users drive it: bad flags, Ctrl-C, quit words, Ctrl-D, a damaged or unwritable --tree folder, and
the live [mc] status line on a terminal. Every run is a subprocess with pipes (or a pty), signalled as a terminal
would signal it."""
import fcntl
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import types

import numpy as np
import pytest
import torch

import checkpoint as ckpt_lib
import prepare
import sample
from conftest import ROOT
from model import GPT, GPTConfig
from session import Session, ingest_stream, stream_offset, stream_source
from test_megacontext import checkpoint  # noqa: F401  (a random tiny GPT in train.py's format, a book, a folder)
from test_megacontext import mc_model as tiny_mc
from test_tree import dir_digest, unwritable

MC = ["--mc", "--budget", "128", "--block", "8", "--recent", "16"]
LAUNCHED = []


@pytest.fixture(autouse=True)
def _no_leftovers():
    """A failed test must not leave a sample.py generating 100000 tokens behind."""
    yield
    while LAUNCHED:
        p = LAUNCHED.pop()
        if p.poll() is None:
            p.kill()
            p.wait()


def launch(args, env=None, **kw):
    env = env or {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "60"}
    env = {**env, "MC_KERNELS": "torch", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    kw = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    LAUNCHED.append(subprocess.Popen([sys.executable, "sample.py", *args], cwd=ROOT, env=env, **kw))
    return LAUNCHED[-1]


def read_until(p, done, seen=b"", timeout=120):
    """Read p's stdout until done(all read so far) holds; returns it."""
    end = time.time() + timeout
    while not done(seen):
        assert time.time() < end and p.poll() is None, f"gave up waiting; stdout so far {seen[-300:]!r}"
        if select.select([p.stdout], [], [], 0.1)[0]:
            seen += os.read(p.stdout.fileno(), 65536)
    return seen


def talk(p, line, seen):
    """Type `line`, wait until the reply has streamed 40 bytes, then press Ctrl-C and wait for the next prompt."""
    p.stdin.write(line)
    p.stdin.flush()
    n = len(seen)
    seen = read_until(p, lambda b: len(b) > n + len(line) + 40, seen)
    p.send_signal(signal.SIGINT)
    return read_until(p, lambda b: b.endswith(b"\n> "), seen)


def finish(p, seen):
    out, err = p.communicate(timeout=120)
    return p.returncode, (seen + out).decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.parametrize("args, message", [
    (["--top-k", "0"], "--top-k must be >= 1 (leave it out to sample from the whole vocabulary), got 0"),
    (["--top-k", "-1", "--mc"], "--top-k must be >= 1 (leave it out to sample from the whole vocabulary), got -1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
    (["--prompt", "a", "--prompt-file", "b"], "give --prompt or --prompt-file, not both"),
    (["--interactive", "--prompt", "a"], "--interactive reads its prompts from stdin: drop --prompt/--prompt-file"),
    (["--tree", "t", "--budget", "64"], "--budget, --tree need --mc"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA device is available")]))
def test_sample_bad_flags_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_sample_prompt_file_not_utf8_is_one_line_error(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    args = sample.parse_args(["--prompt-file", str(tmp_path / "latin1.txt")])
    with pytest.raises(SystemExit):
        sample.read_prompt(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latin1.txt is not UTF-8 text (byte 0xe9 at offset 3)" in err[0], err


def test_sample_ctrl_c_stops_the_reply_and_keeps_the_conversation(checkpoint):  # noqa: F811
    """Plain --interactive: Ctrl-C ends a reply (not the program), the next prompt continues the conversation, Ctrl-C
    at the prompt exits 0; turns are `> ` + the line (echoed when piped), then the reply on its own line."""
    p = launch(["--ckpt", checkpoint[0], "--interactive", "--max-new-tokens", "100000", "--temperature", "0"])
    seen = read_until(p, lambda b: b == b"> ")
    seen = talk(p, b"hello there\n", seen)
    seen = talk(p, b"and more\n", seen)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p, seen)
    assert rc == 0 and "Traceback" not in err and "error" not in err, err
    turns = out.split("\n> ")  # the reply ends with a line break, then the next marker
    assert out.startswith("> hello there\n") and turns[1].startswith("and more\n") and turns[2] == "\n", out[:500]
    assert len(turns[0]) > len("> hello there\n") + 20 and len(turns[1]) > len("and more\n") + 20, out[:500]


def test_sample_mc_session_saved_on_ctrl_c_and_quit(checkpoint, tmp_path):  # noqa: F811
    """--mc --tree: replies stopped with Ctrl-C and an exit by Ctrl-C at the prompt save every turn (exit 0, no
    traceback); the next run resumes it and a quit word ends it, saving again; lines after the quit word are not
    read."""
    tree = str(tmp_path / "tree")
    p = launch(["--ckpt", checkpoint[0], *MC, "--tree", tree, "--interactive", "--max-new-tokens", "100000",
                "--temperature", "0"])
    seen = read_until(p, lambda b: b == b"> ")
    seen = talk(p, b"hello there\n", seen)
    seen = talk(p, b"and more\n", seen)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p, seen)
    assert rc == 0 and "Traceback" not in err and "[mc] saved" in err, err
    counts = json.load(open(os.path.join(tree, "meta.json")))["counts"]
    assert counts[0] > 1 + 80 and counts[1] == counts[0] // 8  # the BOS, both lines, both stopped replies, gists
    p = launch(["--ckpt", checkpoint[0], *MC, "--tree", tree, "--interactive", "--max-new-tokens", "5"])
    out, err = (b.decode() for b in p.communicate(b"one more\nquit\nnever read\n", timeout=120))
    assert p.returncode == 0 and "resumed session" in err and "[mc] saved" in err, err
    assert out.count("> ") == 2 and "> quit\n" in out and "never read" not in out, out
    assert json.load(open(os.path.join(tree, "meta.json")))["counts"][0] > counts[0]


def test_sample_mc_ctrl_c_while_streaming_a_book_saves_it(checkpoint, tmp_path):  # noqa: F811
    ckpt, book, _ = checkpoint
    tree = str(tmp_path / "tree")
    p = launch(["--ckpt", ckpt, *MC, "--prompt-file", book, "--tree", tree, "--max-new-tokens", "100000"])
    seen = read_until(p, lambda b: len(b) > 40)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p, seen)
    assert rc == 0 and "Traceback" not in err and "stopped (Ctrl-C)" in err and "[mc] saved" in err, err
    assert json.load(open(os.path.join(tree, "meta.json")))["counts"][0] > 5000  # the whole book and the reply


def test_sample_mc_tree_files_without_commit_record_are_not_overwritten(checkpoint, tmp_path):  # noqa: F811
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "tokens.bin").write_bytes(os.urandom(4096))  # a session whose meta.json was deleted
    (tree / "lod1.bin").write_bytes(os.urandom(8192))
    before = dir_digest(str(tree))
    p = launch(["--ckpt", checkpoint[0], *MC, "--tree", str(tree), "--prompt", "hello", "--max-new-tokens", "3"])
    rc, out, err = finish(p, b"")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "holds tree files (lod1.bin, tokens.bin) but no commit record (meta.json missing)" in err
    assert "start over in an empty folder" in err and dir_digest(str(tree)) == before


def test_sample_mc_unwritable_tree_folder_fails_before_any_work(checkpoint, tmp_path):  # noqa: F811
    ckpt, book, _ = checkpoint
    folder = tmp_path / "ro"
    folder.mkdir()
    with unwritable(str(folder)):
        p = launch(["--ckpt", ckpt, *MC, "--prompt-file", book, "--tree", str(folder / "book")])
        rc, out, err = finish(p, b"")
    assert rc == 1 and err.startswith("error: cannot write to") and len(err.strip().splitlines()) == 1, err
    assert out == "" and os.listdir(folder) == []


def test_sample_mc_status_line_updates_in_place_on_a_terminal(checkpoint):  # noqa: F811
    """stderr on a terminal: the map is the bottom row (scroll region above it), rewritten in place, then released;
    no status update adds a line. (On a pipe each update is a plain line: test_sample_mc_end_to_end.)"""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # 30 rows, 100 columns
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}  # the size comes from the pty
    p = launch(["--ckpt", checkpoint[0], *MC, "--prompt", "hello", "--max-new-tokens", "40", "--temperature", "0"],
               env={**env, "TERM": "xterm"}, stdin=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536) if select.select([master], [], [], 0.2)[0] else None
        except OSError:  # the child closed the terminal
            break
        if chunk == b"" or (chunk is None and p.poll() is not None):
            break
        err += chunk or b""
    os.close(master)
    out = p.stdout.read().decode()
    assert p.wait() == 0 and out.startswith("hello") and len(out) > 20
    err = err.decode()
    assert "\x1b[1;29r" in err and err.endswith("\x1b[r\x1b[30;1H\x1b[2K\x1b8")  # row 30 reserved, then given back
    updates = err.split("\x1b[30;1H\x1b[2K")[1:-1]
    assert len(updates) == 5 and all(u.startswith("[mc] 0") and "\n" not in u for u in updates), updates


# ----------------------------------------------------------------------------------------------------------------
# issue 18: one writer per tree, signals that never lose a turn, resumable streams, the checkpoint's tokenizer


def read_err_until(p, text: str, timeout=120):
    """Read p's stderr until `text` appears; returns what was read."""
    seen, end = b"", time.time() + timeout
    while text.encode() not in seen:
        assert time.time() < end and p.poll() is None, f"gave up waiting for {text!r}; stderr so far {seen[-500:]!r}"
        if select.select([p.stderr], [], [], 0.1)[0]:
            seen += os.read(p.stderr.fileno(), 65536)
    return seen.decode(errors="replace")


def tree_tokens(tree):
    """The committed token ids of a saved tree (read as any reader would: meta.json's count of tokens.bin)."""
    n = json.load(open(os.path.join(tree, "meta.json")))["counts"][0]
    return np.fromfile(os.path.join(tree, "tokens.bin"), np.int32, n).tolist()


def clean(err):
    return "Traceback" not in err and "Exception ignored" not in err and "error" not in err


def encode(text, data_dir):
    return prepare.load_tokenizer(data_dir).encode_ordinary(text)


def start_session(ckpt, tree, max_new="5", line=b"hello there\n", extra=()):
    """An interactive --mc --tree session that has answered `line` and waits at its next prompt."""
    p = launch(["--ckpt", ckpt, *MC, "--tree", tree, "--interactive", "--max-new-tokens", max_new, "--temperature",
                "0", *extra])
    seen = read_until(p, lambda b: b == b"> ")
    p.stdin.write(line)
    p.stdin.flush()
    return p, read_until(p, lambda b: b.endswith(b"\n> "), seen)


def test_sample_mc_one_writer_per_tree(checkpoint, data_dir, tmp_path):  # noqa: F811
    """Two writers, one tree (issue 18 item 1). Two book streams started together: one streams, the other gets one
    line naming it and exits 1 (the tree then holds one copy). While an interactive session holds the tree, another
    writer is refused before touching anything and --read-only reads it beside the writer, saving nothing; the
    holder's turns all land."""
    ckpt, book, _ = checkpoint
    tree = str(tmp_path / "tree")
    racers = [launch(["--ckpt", ckpt, *MC, "--prompt-file", book, "--tree", tree, "--max-new-tokens", "200"])
              for _ in range(2)]  # (each holds the tree for seconds, from before loading: the two overlap)
    results = sorted((finish(r, b"") for r in racers), key=lambda r: r[0])
    (rc0, _, err0), (rc1, _, err1) = results
    assert (rc0, rc1) == (0, 1) and "[mc] saved" in err0 and len(err1.strip().splitlines()) == 1, (err0, err1)
    winner = next(r.pid for r in racers if r.returncode == 0)
    assert re.fullmatch(rf"error: {tree} is in use by another session \(pid {winner} on \S+ since [-\d: ]+\); "
                        r"nothing was written: wait for it to end, or open the tree read-only \(sample.py "
                        r"--read-only\)", err1.strip()), err1
    ids = encode(open(book).read(), data_dir)
    assert tree_tokens(tree)[1:1 + len(ids)] == ids and len(tree_tokens(tree)) <= 1 + len(ids) + 200  # one copy

    holder, seen = start_session(ckpt, tree)
    before = dir_digest(tree)
    p = launch(["--ckpt", ckpt, *MC, "--tree", tree, "--prompt", "x", "--max-new-tokens", "3"])
    rc, out, err = finish(p, b"")
    assert rc == 1 and f"is in use by another session (pid {holder.pid} on" in err and out == "", err
    assert dir_digest(tree) == before
    p = launch(["--ckpt", ckpt, *MC, "--tree", tree, "--read-only", "--interactive", "--max-new-tokens", "3"])
    out, err = (b.decode() for b in p.communicate(b"just reading\n", timeout=120))
    assert p.returncode == 0 and "resumed session" in err and "read-only: the" in err and "not saved" in err, err
    assert "[mc] saved" not in err and dir_digest(tree) == before
    holder.stdin.write(b"quit\n")
    holder.stdin.flush()
    rc, out, err = finish(holder, seen)
    assert rc == 0 and "[mc] saved" in err
    hello = encode("hello there\n", data_dir)
    tokens = tree_tokens(tree)
    assert any(tokens[i:i + len(hello)] == hello for i in range(len(ids), len(tokens))) and "lock" not in \
        os.listdir(tree)  # (a holder killed -9 and its stale lock: test_tree.py, with a real second process)


def test_sample_mc_tree_on_a_folder_of_other_files_is_refused(checkpoint, data_dir, tmp_path):  # noqa: F811
    """--tree on a prepared data folder (was: `meta.json is corrupt (KeyError)`) or a folder with notes: one line
    saying what was found, nothing written."""
    for name, make in [("data", lambda d: shutil.copytree(data_dir, d)),
                       ("notes", lambda d: (os.makedirs(d), open(os.path.join(d, "notes.txt"), "w").write("hi")))]:
        folder = str(tmp_path / name)
        make(folder)
        before = dir_digest(folder)
        p = launch(["--ckpt", checkpoint[0], *MC, "--tree", folder, "--prompt", "x", "--max-new-tokens", "3"])
        rc, out, err = finish(p, b"")
        found = "meta.json (not a tree's), test.bin, test.idx.npy, tokenizer.json and 4 more" if name == "data" \
            else "notes.txt"
        assert rc == 1 and err.strip() == (f"error: {folder} is not empty and holds no MegaContext tree (found "
                                           f"{found}); nothing was written: a tree goes into an empty folder or the "
                                           "folder of a saved tree"), err
        assert dir_digest(folder) == before


@pytest.mark.parametrize("gap", [0.001, 0.004], ids=["1ms", "4ms"])  # (0.5-6 ms in bulk: test_signal_fuzz.py)
def test_sample_mc_two_sigints_at_the_prompt_save_the_session(checkpoint, data_dir, tmp_path, gap):  # noqa: F811
    """Two SIGINTs `gap` apart at the `> ` prompt (what a wrapper that forwards Ctrl-C sends): saved, exit 0, no
    traceback (none from atexit either), and the turn is in the tree (was: `error: interrupted`, not saved, at
    1-2 ms; an atexit KeyboardInterrupt traceback at 3-6 ms)."""
    tree = str(tmp_path / "tree")
    p, seen = start_session(checkpoint[0], tree)
    time.sleep(0.3)  # in the prompt's wait
    p.send_signal(signal.SIGINT)
    time.sleep(gap)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p, seen)
    assert rc == 0 and clean(err) and "[mc] stopped (Ctrl-C)" in err and "[mc] saved" in err, err
    hello = encode("hello there\n", data_dir)
    assert tree_tokens(tree)[1:1 + len(hello)] == hello


@pytest.mark.parametrize("sig, when", [(signal.SIGTERM, "prompt"), (signal.SIGHUP, "reply")],
                         ids=["TERM-prompt", "HUP-reply"])  # (every mix, in bulk: test_signal_fuzz.py)
def test_sample_mc_sigterm_and_sighup_save_the_session(checkpoint, data_dir, tmp_path, sig, when):  # noqa: F811
    """SIGTERM (a kill, a shutdown) and SIGHUP (the terminal closed) at the prompt or mid-reply end the session:
    the reply stops after the current token, the session is saved, exit 0 (was: rc 143, nothing saved)."""
    tree = str(tmp_path / "tree")
    if when == "prompt":
        p, seen = start_session(checkpoint[0], tree)
        time.sleep(0.3)
    else:
        p = launch(["--ckpt", checkpoint[0], *MC, "--tree", tree, "--interactive", "--max-new-tokens", "100000"])
        seen = read_until(p, lambda b: b == b"> ")
        p.stdin.write(b"tell me\n")
        p.stdin.flush()
        seen = read_until(p, lambda b: len(b) > len("> tell me\n") + 40, seen)
    p.send_signal(sig)
    rc, out, err = finish(p, seen)
    name = signal.Signals(sig).name
    assert rc == 0 and clean(err) and f"[mc] stopped ({name})" in err and "[mc] saved" in err, err
    assert "\n> " not in out[len(seen):]  # no further prompt
    tokens, first = tree_tokens(tree), encode("hello there\n" if when == "prompt" else "tell me\n", data_dir)
    assert any(tokens[i:i + len(first)] == first for i in range(len(tokens)))
    if when == "reply":
        assert len(tokens) > 1 + len(first) + 5  # the reply streamed so far (40+ bytes) is kept


def test_sample_mc_any_number_of_sigints_in_a_reply_only_stop_it(checkpoint, data_dir, tmp_path):  # noqa: F811
    """Five SIGINTs 1 ms apart mid-reply stop that reply and nothing else: the next prompt reads the next line
    (was: the third aborted the session unsaved); EOF then ends and saves, both turns in the tree."""
    tree = str(tmp_path / "tree")
    p = launch(["--ckpt", checkpoint[0], *MC, "--tree", tree, "--interactive", "--max-new-tokens", "100000"])
    seen = read_until(p, lambda b: b == b"> ")
    p.stdin.write(b"first line\n")
    p.stdin.flush()
    seen = read_until(p, lambda b: len(b) > 60, seen)
    for _ in range(5):
        p.send_signal(signal.SIGINT)
        time.sleep(0.001)
    seen = read_until(p, lambda b: b.endswith(b"\n> "), seen)
    time.sleep(0.5)  # (past the double-press window: the next Ctrl-C is a new press)
    seen = talk(p, b"second line\n", seen)
    p.stdin.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0 and clean(err) and "[mc] saved" in err, err
    tokens = tree_tokens(tree)
    for line in ("first line\n", "second line\n"):
        ids = encode(line, data_dir)
        assert any(tokens[i:i + len(ids)] == ids for i in range(len(tokens))), line


def test_sample_signal_while_loading_is_one_line_and_writes_nothing(checkpoint, tmp_path):  # noqa: F811
    """A signal before the session opens (torch importing, the checkpoint loading): `error: interrupted`, exit 1,
    no traceback, and the --tree folder is not created."""
    tree = str(tmp_path / "tree")
    p = launch(["--ckpt", checkpoint[0], *MC, "--tree", tree, "--interactive"])
    end = time.time() + 60
    while True:  # until sample.py's own handlers are in (SIGTERM caught): before that it is Python's startup
        with open(f"/proc/{p.pid}/status") as f:
            caught = int(next(line for line in f if line.startswith("SigCgt:")).split()[1], 16)
        if caught >> (signal.SIGTERM - 1) & 1 or time.time() > end:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    p.send_signal(signal.SIGINT)
    rc, out, err = finish(p, b"")
    assert rc == 1 and err == "error: interrupted\n" and not os.path.exists(tree), err


def test_sample_mc_stream_cut_short_continues_where_the_tree_stops(checkpoint, data_dir, tmp_path):  # noqa: F811
    """A --prompt-file book of three 65,536-token chunks stopped by SIGTERM in its second chunk, then the same
    command: it continues from the first token the tree does not hold (and says so), and the tree holds the
    book exactly once, in order (issue 18 item 7; the kill -9 case is the session-level test below)."""
    enc = prepare.load_tokenizer(data_dir)
    ordinary = enc.n_vocab - len(prepare.SPECIAL_TOKENS)
    ids = [t for s in ("train", "val") for t in prepare.load_split(data_dir, s)[0].tolist() if t < ordinary]
    book = tmp_path / "long.txt"
    book.write_text(enc.decode(ids))
    ids = enc.encode_ordinary(book.read_text())
    assert 2 * 65536 < len(ids) <= 3 * 65536  # three chunks
    tree = str(tmp_path / "tree")
    args = ["--ckpt", checkpoint[0], *MC, "--prompt-file", str(book), "--tree", tree, "--max-new-tokens", "4"]
    p = launch(args)
    read_err_until(p, "[ingest] 65,536 / ")  # the first chunk is in; the signal lands in the second
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p, b"")
    done = len(tree_tokens(tree)) - 1
    assert rc == 0 and "[mc] stopped (SIGTERM)" in err and done % 65536 == 0 and 0 < done < len(ids), err
    p = launch(args)
    rc, out, err = finish(p, b"")
    assert rc == 0 and clean(err), err
    assert f"[mc] continuing {book} from token {done:,} of {len(ids):,} (the tree holds the ones before it)" in err
    tokens = tree_tokens(tree)
    assert tokens[1:1 + len(ids)] == ids and len(tokens) <= 1 + len(ids) + 4


def test_session_stream_continues_from_the_last_save_after_a_kill(tmp_path):
    """ingest_stream saves every save_every tokens with how far the file got; after a kill (the session dropped,
    unsaved) the reopened tree continues from the first token it does not hold and ends exactly as one stream; a
    finished stream streams nothing; a changed file, history added after the stream, or another file say why
    they do not continue."""
    m = tiny_mc(w_max=96, recent_tokens=16)
    ids = np.random.default_rng(0).integers(0, 97, 5000).tolist()
    data, path = b"a book of 5000 tokens", str(tmp_path / "t")
    source = stream_source("book.txt", data, len(ids))
    s = Session(m)
    s.ingest([1])
    assert stream_offset(s, source) == (0, None)
    chunks = []
    ingest_stream(s, ids, chunk=300, save_to=path, save_every=1024, out=None,
                  stop=lambda: chunks.append(1) or len(chunks) > 13, source={**source, "start": 1, "done": 0})
    assert len(s.tree) == 1 + 13 * 300  # ... and killed here: 3,900 tokens in, saved at 1,200, 2,400, 3,600
    s = Session.open(m, path)
    offset, note = stream_offset(s, source)
    assert (offset, len(s.tree)) == (3600, 3601)
    assert note == "continuing book.txt from token 3,600 of 5,000 (the tree holds the ones before it)"
    ingest_stream(s, ids[offset:], chunk=300, save_to=path, save_every=1024, out=None,
                  source={**source, "start": s.stream["start"], "done": offset})
    s.save(path)
    s = Session.open(m, path)
    assert s.tree.tokens(0, len(s.tree)).tolist() == [1] + ids
    assert stream_offset(s, source) == (5000, "the tree holds all 5,000 tokens of book.txt already: nothing to "
                                              "stream")
    changed = stream_source("book.txt", data + b"!", len(ids))
    assert stream_offset(s, changed) == (0, "book.txt changed since the tree took 5,000 tokens of it (21 -> 22 bytes, "
                                            "another checksum): streaming it from its start")
    s.stream = {**s.stream, "done": 4000}
    assert stream_offset(s, stream_source("other.txt", b"x", 9))[1] == ("the tree holds an unfinished stream of "
                                                                        "book.txt (4,000 of 5,000 tokens); other.txt "
                                                                        "is streamed after it")
    s.ingest([2])
    assert stream_offset(s, source)[0] == 0 and "more history came after them" in stream_offset(s, source)[1]


def test_sample_refuses_another_tokenizer(checkpoint, data_dir, tmp_path):  # noqa: F811
    """A checkpoint names its tokenizer (sha256, vocab size): another one, even of the same size, is one line from
    sample.py (was: silently garbled text, or a KeyError traceback for another size); older checkpoints without
    the record are held to the model's vocabulary size; ids the tokenizer lacks decode as U+FFFD, not KeyError."""
    other = str(tmp_path / "other")
    prepare.main(["--synthetic", "--out", other, "--vocab-size", "512", "--syn-docs", "8", "--syn-chars", "40000",
                  "--seed", "7"])
    ckpt = torch.load(checkpoint[0], weights_only=False)
    old_enc, other_enc = prepare.load_tokenizer(data_dir), prepare.load_tokenizer(other)
    ckpt_lib.check_tokenizer(ckpt, other, other_enc)  # an old checkpoint: same size passes (nothing to tell them)
    recorded = {**ckpt, "tokenizer": ckpt_lib.tokenizer_record(data_dir)}
    ckpt_lib.check_tokenizer(recorded, data_dir, old_enc)
    with pytest.raises(ValueError, match=r"the tokenizer in .*other \(sha256 \w{12}, 512 ids\) is not the one the "
                                         r"checkpoint was trained with \(sha256 \w{12}, 512 ids\); pass --data-dir"):
        ckpt_lib.check_tokenizer(recorded, other, other_enc)
    small = str(tmp_path / "small")
    prepare.main(["--synthetic", "--out", small, "--vocab-size", "300", "--syn-docs", "2", "--syn-chars", "5000"])
    with pytest.raises(ValueError, match="has 300 ids but the model 512: it is not the one the model was trained"):
        ckpt_lib.check_tokenizer(ckpt, small, prepare.load_tokenizer(small))
    path = str(tmp_path / "recorded.pt")
    torch.save(recorded, path)
    p = launch(["--ckpt", path, "--data-dir", other, "--prompt", "x", "--max-new-tokens", "3"])
    rc, out, err = finish(p, b"")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "is not the one the checkpoint was trained with" in err
    out = io.StringIO()
    sample.write_stream([5, 10**6, 6], old_enc, out)  # an id past the vocabulary (unused ids of older data)
    assert "\ufffd" in out.getvalue()


def test_mc_model_on_a_base_whose_block_cannot_hold_a_working_context():
    """A block-64 base with the default K=32 / 64-token tail: one line giving both limits and a setting that fits
    (was: 'needs w_max >= 159', then with --budget 159 'above the 64-token block')."""
    gpt = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32))
    none = types.SimpleNamespace(block=None, budget=None, recent=None, policy=None)
    with pytest.raises(ValueError) as e:
        ckpt_lib.mc_model({}, none, gpt)
    assert str(e.value) == ("this base model cannot hold a working context at K=32 with a 64-token tail: that needs a "
                            "budget of at least 159 entries, and a budget may not exceed the 64-token block the base "
                            "was trained on; use a smaller --block and --recent (--block 8 --recent 16 needs 39), or a "
                            "base trained on longer blocks")
    ckpt_lib.mc_model({}, types.SimpleNamespace(block=8, budget=None, recent=16, policy=None), gpt)  # the hint works


def test_cli_modules_are_imported_by_none():
    """One name and one home per concept: sample.py's plain decoding loop is Conversation (session.Session is the
    MegaContext one), and no library module or benchmark imports a command-line program's internals."""
    assert sample.Session is Session and sample.Conversation.__doc__.startswith("Plain decoding")
    libraries = ["checkpoint.py", "session.py", "tree.py", "terminal.py", "durable.py", "megacontext.py"]
    for path in libraries + [os.path.join("bench", n) for n in os.listdir(os.path.join(ROOT, "bench"))
                             if n.endswith(".py")]:
        text = open(os.path.join(ROOT, path)).read()
        assert not re.search(r"^\s*(from sample import|import sample\b)", text, re.M), path


def test_signals_at_every_step_of_a_save_never_cut_it(tmp_path, monkeypatch):
    """Once a session is open (Signals.hold) SIGINT, SIGTERM and SIGHUP are only recorded: delivered (os.kill) at
    every durable step of a tree save, three at a time, the save completes and the folder opens as the new
    generation; before hold (loading) the first signal raises KeyboardInterrupt, once."""
    import terminal
    import tree as tree_module
    from test_tree import Recorder, fake_embed, make_tree
    saved = {s: signal.getsignal(s) for s in terminal.HANDLED}
    signals = terminal.Signals()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs at the next bytecode; the sleep is never finished)
        os.kill(os.getpid(), signal.SIGINT)  # a second one while the first unwinds: recorded only
        signals.hold()
        t = make_tree()
        t.append(np.arange(70) % 50)
        path = str(tmp_path / "t")
        t.save(path)
        t.append(np.arange(90) % 50)  # 160 tokens at K=4: LOD3 is born in this save
        points = []

        def signal_storm(what):
            points.append(what)
            for s in terminal.HANDLED:
                os.kill(os.getpid(), s)

        monkeypatch.setattr(tree_module, "_crash_point", signal_storm)
        t.save(path)
        assert len(points) >= 6 and len(signals.hits) == 2 + 3 * len(points) and signals.ending == "SIGTERM"
    finally:
        signals.close()
        for s, handler in saved.items():
            signal.signal(s, handler)
    back, _ = tree_module.MegaContextTree.open(path, 4, 6, 50, "model-a", fake_embed, Recorder())
    assert len(back) == 160 and back.depth == 3
