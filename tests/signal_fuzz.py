"""Seeded fuzz of signal timings during `sample.py --mc --tree DIR --interactive` sessions (issue 18), in one process.

    python tests/signal_fuzz.py --ckpt C --tree DIR --timings 1000 --seed 0 --out summary.json

Each session is sample.main() exactly as the command line runs it, with stdin a pipe that a feeder thread writes
prompt lines into (random gaps; then EOF, an empty line or `quit`) while a sender thread delivers SIGINT, SIGTERM
and SIGHUP to this process with os.kill at seeded random times over the session: alone, or in bursts 0.5-6 ms
apart (a wrapper that forwards Ctrl-C), landing while the checkpoint loads, at the prompt, mid-reply, mid-save and
on the way out. After every session the tree is reopened (checksums verified) and must hold exactly the previous
generation plus every turn the session showed: each accepted prompt's ids and each reply token handed to the
screen (a session cut while loading adds nothing and says `error: interrupted`). Its stderr must hold no traceback.
The summary counts timings sent, sessions, lost trees, lost turns, tracebacks and other errors, and stops early on
the first lost tree. Sessions run one after another in this process (model loading is cheap at this size), so a
thousand timings take about a minute on two cores; the test runs it with a fixed seed (tests/test_signal_fuzz.py).
"""
import argparse
import json
import os
import queue
import random
import signal
import sys
import threading
import time

os.environ.setdefault("MC_KERNELS", "torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import sample  # noqa: E402
from tree import MegaContextTree  # noqa: E402

SIGNALS = [signal.SIGINT] * 6 + [signal.SIGTERM, signal.SIGHUP]  # mostly Ctrl-C, the REPL's everyday signal
CALIBRATE = 3  # sessions without signals first: how long a session takes here sets the spread of signal times
WORDS = "the pass key is what was said of her and a long road in winter light".split()


def blocked_thread(target, *args):
    """A daemon thread that never takes a signal: they go to the main thread, as in the real program."""
    def run():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        target(*args)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def feed(fd: int, rng: random.Random, done: threading.Event):
    """Prompt lines with gaps, then an ending; stops early once the session is over."""
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(1, 8))) + "\n" for _ in range(rng.randint(1, 4))]
    lines.append(rng.choice(["", "", "quit\n", "\n"]))  # "" = just EOF
    try:
        for i, line in enumerate(lines):
            pause = rng.uniform(0.1, 0.4) if rng.random() < 0.3 else rng.uniform(0, 0.05)  # a user thinking, or not
            if done.wait(pause):
                break
            os.write(fd, line.encode())
    except OSError:  # the session ended and its read end is closed
        pass
    finally:
        os.close(fd)


PHASE = ["idle"]  # where the main thread is: loading, session (replies), prompt, save; read when a signal is sent
OPENED = [0.0]  # when the current session opened (loading done)


def track_phases():
    """Wrap the points where a session changes phase, so the summary can say where the signals landed."""
    import session as session_module
    import terminal
    hold, wait, save = terminal.Signals.hold, terminal.Signals.wait, session_module.Session.save

    def held(self):
        PHASE[0] = "session"
        OPENED[0] = time.perf_counter()
        hold(self)

    def waiting(self, fd):
        PHASE[0] = "prompt"
        try:
            return wait(self, fd)
        finally:
            PHASE[0] = "session"

    def saving(self, path):
        PHASE[0] = "save"
        try:
            save(self, path)
        finally:
            PHASE[0] = "exit"
    terminal.Signals.hold, terminal.Signals.wait, session_module.Session.save = held, waiting, saving


def send(plan: queue.Queue, active: list, sent: list):
    """For each session: deliver its signals at their times (seconds after its start) while it runs; a plan whose
    session has ended is dropped (its late signals would land in the next session's start)."""
    pid = os.getpid()
    while True:
        number, start, times = plan.get()
        for t, sig in times:
            delay = start + t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            if active[0] != number:
                break
            os.kill(pid, sig)
            sent.append((sig, PHASE[0]))


def schedule(rng: random.Random, horizon: float) -> list:
    """Signal times for one session: the first while loading (15 %) or over the rest of a session, then 1-5 more within
    0-40 ms of each other (after the one that ends the session they land in its save and its exit); a third of them
    are bursts of 2-3 signals 0.5-6 ms apart."""
    load, whole = horizon  # seconds until the session opens, and of a whole session
    times, t = [], rng.uniform(0, load) if rng.random() < 0.15 else rng.uniform(load, whole)  # the others after it
    for i in range(rng.randint(2, 6)):
        t, sig = t + (i > 0) * rng.uniform(0, 0.04), rng.choice(SIGNALS)  # soon: before, in, after the save
        times.append((t, sig))
        if rng.random() < 0.33:
            for _ in range(rng.randint(1, 2)):
                t += rng.uniform(0.0005, 0.006)
                times.append((t, rng.choice([sig, sig, signal.SIGINT])))
    return sorted(times)


def read_tree(path: str) -> list:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    tree, _ = MegaContextTree.open(path, meta["K"], meta["d"], meta["vocab_size"], meta["identity"], None, None)
    return tree.tokens(0, len(tree)).tolist()


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tree", required=True)
    p.add_argument("--timings", type=int, default=1000, help="stop once this many signals were delivered")
    p.add_argument("--max-sessions", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="summary JSON (default: stdout)")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # between sessions (sample.py sets its own in them)
        signal.signal(s, signal.SIG_IGN)
    real_sample, turns = sample.mc_sample, []

    def recorded(session, ids, *args, **kw):  # a turn as the user sees it: the prompt's ids, then each reply token
        turn = list(ids)
        turns.append(turn)
        for tok in real_sample(session, ids, *args, **kw):
            turn.append(tok)
            yield tok

    sample.mc_sample = recorded
    track_phases()
    plan, active, sent = queue.Queue(), [None], []  # active: the number of the running session
    blocked_thread(send, plan, active, sent)
    out_fd, err_fd = os.dup(1), os.dup(2)
    null, err_path = os.open(os.devnull, os.O_WRONLY), a.tree.rstrip("/") + ".stderr"
    stats = dict(sessions=0, timings=0, lost_trees=0, lost_turns=0, tracebacks=0, errors=0, interrupted_loading=0,
                 ended_by={}, turns=0, tokens=0, seconds=0.0)
    prev, horizon, lengths, t_start, problems = [], (0.1, 0.3), [], time.perf_counter(), []
    while len(sent) < a.timings and stats["sessions"] < a.max_sessions and not stats["lost_trees"]:
        r, w = os.pipe()
        os.dup2(r, 0)
        os.close(r)
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(null, 1)
        os.dup2(err, 2)
        os.close(err)
        argv = ["--ckpt", a.ckpt, "--mc", "--budget", "64", "--block", "8", "--recent", "16", "--tree", a.tree,
                "--interactive", "--max-new-tokens", str(rng.randint(0, 24)), "--seed", str(rng.randrange(10**6))]
        turns.clear()
        done, n_sent = threading.Event(), len(sent)
        feeder = blocked_thread(feed, w, random.Random(rng.random()), done)
        t0 = time.perf_counter()
        PHASE[0], active[0] = "loading", stats["sessions"]
        calibrating = stats["sessions"] < CALIBRATE
        plan.put((stats["sessions"], t0, [] if calibrating else schedule(rng, horizon)))
        code, crash = 0, None
        try:
            sample.main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # noqa: BLE001  (anything escaping main is a traceback the user would see)
            crash = repr(e)
        PHASE[0], active[0] = "idle", None
        done.set()
        dt = time.perf_counter() - t0
        if calibrating:  # signal times follow how long loading and a whole session take here without signals
            lengths.append((OPENED[0] - t0, dt))
            horizon = tuple(sum(x) / len(lengths) for x in zip(*lengths))
        feeder.join()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        with open(err_path, errors="replace") as f:
            err_text = f.read()
        stats["sessions"] += 1
        kinds = [signal.Signals(s).name for s, _ in sent[n_sent:]]
        if crash or "Traceback" in err_text or "Exception ignored" in err_text:
            stats["tracebacks"] += 1
            problems.append(dict(session=stats["sessions"], kind="traceback", crash=crash, stderr=err_text[-2000:],
                                 signals=kinds))
        if code not in (0, None):
            if err_text.strip() == "error: interrupted" and not turns:
                stats["interrupted_loading"] += 1
            else:
                stats["errors"] += 1
                problems.append(dict(session=stats["sessions"], kind=f"exit {code}", stderr=err_text[-2000:],
                                     signals=kinds))
        try:
            now = read_tree(a.tree) if os.path.exists(os.path.join(a.tree, "meta.json")) else []
        except Exception as e:  # noqa: BLE001
            stats["lost_trees"] += 1
            problems.append(dict(session=stats["sessions"], kind="lost tree", error=str(e), signals=kinds))
            break
        expect = prev + ([sample_bos(a.ckpt)] if not prev and (turns or now) else []) + [t for tn in turns for t in tn]
        if now != expect:
            lost = sum(1 for tn in turns if not contains(now, tn))
            stats["lost_turns"] += max(lost, 1)
            problems.append(dict(session=stats["sessions"], kind="lost turns", have=len(now), want=len(expect),
                                 prefix_kept=now[:len(prev)] == prev, signals=kinds, stderr=err_text[-600:]))
        ended = err_text.split("[mc] stopped (")[1].split(")")[0] if "[mc] stopped (" in err_text else "eof/quit"
        stats["ended_by"][ended] = stats["ended_by"].get(ended, 0) + 1
        stats["turns"] += len(turns)
        prev = now
    where = {}
    for _, phase in sent:
        where[phase] = where.get(phase, 0) + 1
    stats.update(timings=len(sent), landed_in=where, tokens=len(prev), seconds=round(time.perf_counter() - t_start, 1),
                 horizon_s=[round(x, 3) for x in horizon], problems=problems[:10])
    text = json.dumps(stats, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)


_BOS = {}


def sample_bos(ckpt_path: str) -> int:
    """The <|bos|> id a new session starts with (the checkpoint's tokenizer)."""
    if ckpt_path not in _BOS:
        import prepare
        import torch
        data_dir = torch.load(ckpt_path, weights_only=False)["config"]["data_dir"]
        _BOS[ckpt_path] = prepare.load_tokenizer(data_dir).encode_single_token(prepare.BOS)
    return _BOS[ckpt_path]


def contains(history: list, turn: list) -> bool:
    """Whether `turn` occurs as a contiguous run in `history` (a diagnostic for the summary only)."""
    if not turn:
        return True
    h, t = np.asarray(history), np.asarray(turn)
    if len(t) > len(h):
        return False
    windows = np.lib.stride_tricks.sliding_window_view(h, len(t))
    return bool((windows == t).all(1).any())


if __name__ == "__main__":
    main(sys.argv[1:])
