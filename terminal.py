"""How sample.py talks to a person at a terminal: signals, the `> ` prompt and the live status line.

    signals = Signals()                  # SIGINT/SIGTERM/SIGHUP; while loading the first one raises KeyboardInterrupt
    signals.hold()                       # the session is open: from now on a signal is only recorded
    for line in prompts(signals):        # `> ` lines until EOF, an empty line, a quit word or a signal at the prompt
        with signals.reply():            # a signal here stops the reply: the loop checks signals.stop() per token
            ...
    signals.close()                      # saved and leaving: later signals are ignored
    status = StatusLine(); status.show("[mc] ..."); status.close()

Split from sample.py by concept: that file decides what to generate; this one owns the terminal (signals, escape
sequences, a stdout whose reader went away).
"""
import contextlib
import errno
import os
import select
import shutil
import signal
import sys
import time

QUIT_WORDS = ("quit", "exit", "/quit", "/exit")
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ENDING = {signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}  # these end the session wherever they arrive
DOUBLE_S = 0.25  # a SIGINT this soon after the one that stopped a reply is the same key press (a wrapper that
# forwards Ctrl-C to its process group doubles every press): it does not also end the session at the next prompt


def quit_while_importing():
    """For a CLI, before its heavy imports: a signal then exits at once with one line (nothing is open yet), not a
    KeyboardInterrupt traceback from inside torch's import. Signals() replaces it."""
    def handler(signum, frame):
        try:
            os.write(2, b"error: interrupted\n")
        except OSError:  # stderr gone with the terminal (SIGHUP)
            pass
        os._exit(1)
    for s in HANDLED:
        signal.signal(s, handler)


class Signals:
    """SIGINT, SIGTERM and SIGHUP as a session wants them: recorded, never raised into the middle of an update.

    Until hold() (loading a checkpoint, opening a tree: nothing to save yet) the first signal raises
    KeyboardInterrupt, once. From hold() on the handler only records: a reply, an ingest or a save is never cut
    part-way, so a save always completes however many signals arrive, at any spacing. The loops ask stop() between
    tokens and chunks; prompts() waits on stdin and on the wakeup fd (signal.set_wakeup_fd) together, so a signal
    wakes it even when it lands just before the wait blocks. SIGINT stops a reply, and at the prompt ends the
    session; SIGTERM and SIGHUP (the terminal closed) end it wherever they arrive; every end is a saved session."""

    def __init__(self):
        self.hits = []  # (monotonic time, signum) of every signal so far
        self.used = 0  # hits[:used] have been acted upon
        self.quiet_until = 0.0  # SIGINTs until then are the press that stopped the last reply (DOUBLE_S)
        self.raising = True
        self.stopped = self.ended = None  # the signal that stopped the last reply / ended the session at the prompt
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for s in HANDLED:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.hits.append((time.monotonic(), signum))
        if self.raising:  # once: a second signal must not raise again inside the handler of the first
            self.raising = False
            raise KeyboardInterrupt

    def hold(self):
        """The session is open: signals are recorded from now on, never raised."""
        self.raising = False

    def close(self):
        """Leaving (the session saved): signals are ignored, so nothing can cut the exit."""
        self.raising = False
        for s in HANDLED:
            signal.signal(s, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        os.close(self.wake_r)
        os.close(self.wake_w)

    def stop(self) -> bool:
        """Whether the running reply or ingest should stop: a signal not acted upon yet, or one ending the session."""
        return len(self.hits) > self.used or self.ending is not None

    __call__ = stop

    @property
    def ending(self) -> str | None:
        """The name of the signal that ends the session wherever it arrives (SIGTERM, SIGHUP), if one came."""
        return next((ENDING[s] for _, s in self.hits if s in ENDING), None)

    @contextlib.contextmanager
    def reply(self):
        """A reply (or a streamed book): the signals that arrive in it stop it, and are used up by that."""
        try:
            yield
        finally:
            n = len(self.hits)
            if n > self.used:
                self.used, self.quiet_until = n, self.hits[n - 1][0] + DOUBLE_S
                self.stopped = self.ending or "Ctrl-C"

    def at_prompt(self) -> bool:
        """Whether the session ends at the prompt: SIGTERM/SIGHUP, or a SIGINT that is not the second half of the
        press that stopped the last reply."""
        n = len(self.hits)  # (the handler may append while this runs)
        if self.ending is not None or any(t > self.quiet_until for t, _ in self.hits[self.used:n]):
            self.ended = self.ending or "Ctrl-C"
            return True
        self.used = n
        return False

    def wait(self, fd: int) -> bool:
        """Block until `fd` is readable (True) or a signal arrives; at most a second, so a missed wakeup only delays."""
        ready = select.select([fd, self.wake_r], [], [], 1.0)[0]
        if self.wake_r in ready:
            while True:
                try:
                    if not os.read(self.wake_r, 512):
                        break
                except BlockingIOError:
                    break
        return fd in ready


class StatusLine:
    """The live [mc] line on stderr. On a terminal it is the bottom row, fenced off with a scroll region (DECSTBM) so
    the streamed reply scrolls above it, and rewritten in place; elsewhere every update is a plain line."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.rows = stream, 0  # rows: terminal height when the bottom row was reserved; 0 = not yet
        self.live = stream.isatty() and os.environ.get("TERM", "dumb") != "dumb"

    def size(self):
        try:
            cols, rows = os.get_terminal_size(self.stream.fileno())
        except (OSError, ValueError):
            cols, rows = 0, 0
        fallback = shutil.get_terminal_size((100, 24))
        return cols or fallback.columns, rows or fallback.lines

    def show(self, text: str):
        try:
            self._show(text)
        except OSError:  # stderr is gone (the terminal closed): a status line is not worth failing a session for
            self.live, self.rows = False, 0

    def _show(self, text: str):
        cols, rows = self.size()
        if not self.live or rows < 3:
            print(text, file=self.stream, flush=True)
            return
        w = self.stream.write
        if rows != self.rows:  # index down + up (scrolls if on the last row, keeps the column), then fence it off
            w(f"\x1bD\x1b[1A\x1b7\x1b[1;{rows - 1}r\x1b8")
            self.rows = rows
        w(f"\x1b7\x1b[{rows};1H\x1b[2K{text[:cols - 1]}\x1b8")  # save cursor, bottom row, clear, write, restore
        self.stream.flush()

    def close(self):
        """Give the bottom row back to the terminal (cleared); later output is plain lines again."""
        rows, self.rows = self.rows, 0
        if rows:
            try:
                self.stream.write(f"\x1b7\x1b[r\x1b[{rows};1H\x1b[2K\x1b8")
                self.stream.flush()
            except OSError:
                pass


def prompts(signals: Signals, out=sys.stdout):
    """Lines typed after a `> ` marker until EOF (Ctrl-D), an empty line, a quit word or a signal at the marker
    (Signals.at_prompt). Piped input is echoed after the marker, so stdout reads as a transcript either way. stdin is
    read from its descriptor, never through sys.stdin's buffer, so that a signal can end the wait (Signals.wait)."""
    fd = sys.stdin.fileno()
    echo, buf, eof = not os.isatty(fd), b"", False
    while True:
        out.write("> ")
        out.flush()
        line = None  # None: a signal ended the session at the prompt
        while not signals.at_prompt():
            cut = buf.find(b"\n") + 1
            if cut or eof:  # a whole line, or at EOF the rest ("" when nothing is left: Ctrl-D)
                cut = cut or len(buf)
                line, buf = buf[:cut].decode("utf-8", errors="replace"), buf[cut:]
                break
            try:
                data = os.read(fd, 65536) if signals.wait(fd) else None
            except OSError:  # EIO: the terminal is gone
                data = b""
            if data is not None:
                buf, eof = buf + data, not data
        line = line or ""
        if echo or not line:  # a terminal echoes what was typed itself; EOF or a signal needs a line break
            out.write(line if line.endswith("\n") else line + "\n")
            out.flush()
        if not line.strip() or line.strip().lower() in QUIT_WORDS:
            return
        yield line


def stdout_gone(error: OSError | None = None):
    """Stop writing to a stdout whose reader went away (`| head`), quietly, also for the interpreter's flush at exit;
    after EIO (the terminal closed: SIGHUP) stderr goes too."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    if error is not None and error.errno == errno.EIO:
        os.dup2(null, sys.stderr.fileno())
