"""sample.py as users drive it: bad flags, Ctrl-C, quit words, Ctrl-D, a damaged or unwritable --tree folder, and
the live [mc] status line on a terminal. Every run is a subprocess with pipes (or a pty), signalled as a terminal
would signal it."""
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

import sample
from conftest import ROOT
from test_megacontext import checkpoint  # noqa: F401  (a random tiny GPT in train.py's format, a book, a folder)
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
