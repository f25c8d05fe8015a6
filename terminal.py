"""How sample.py talks to a person at a terminal: Ctrl-C, the `> ` prompt and the live status line.

    ctrlc = CtrlC()                      # installs the SIGINT handler
    for line in prompts():               # `> ` lines until EOF, an empty line, a quit word or Ctrl-C at the prompt
        with ctrlc.soft():               # Ctrl-C here only sets a flag: the reply loop checks ctrlc() per token
            ...
    status = StatusLine(); status.show("[mc] ..."); status.close()

Split from sample.py by concept: that file decides what to generate; this one owns the terminal (signals, escape
sequences, a stdout whose reader went away).
"""
import contextlib
import os
import shutil
import signal
import sys

QUIT_WORDS = ("quit", "exit", "/quit", "/exit")


class CtrlC:
    """SIGINT as the REPL wants it. Inside `soft()` (a reply or a book on its way in) Ctrl-C only counts a hit; the
    loops check between tokens, so the session is never left half-updated (a third Ctrl-C there aborts without
    saving). Elsewhere (at the prompt, while loading) it raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.soft_now, self.hits, self.torn = False, 0, False  # torn: raised inside soft(), mid-update
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        self.hits += 1
        if not (self.soft_now and self.hits < 3):
            self.torn = self.soft_now
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def soft(self):
        self.soft_now, self.hits = True, 0
        try:
            yield
        finally:
            self.soft_now = False

    def __call__(self) -> bool:
        return self.hits > 0


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
        if self.rows:
            self.stream.write(f"\x1b7\x1b[r\x1b[{self.rows};1H\x1b[2K\x1b8")
            self.stream.flush()
            self.rows = 0


def prompts(out=sys.stdout):
    """Lines typed after a `> ` marker until EOF (Ctrl-D), an empty line, a quit word or Ctrl-C at the marker. Piped
    input is echoed after the marker, so stdout reads as a transcript either way."""
    echo = not sys.stdin.isatty()
    while True:
        try:
            out.write("> ")
            out.flush()
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if echo or not line:  # a terminal echoes what was typed itself; EOF or Ctrl-C needs a line break
            out.write(line if line.endswith("\n") else line + "\n")
            out.flush()
        if not line.strip() or line.strip().lower() in QUIT_WORDS:
            return
        yield line


def stdout_gone():
    """Stop writing to a stdout whose reader went away, quietly (also for the interpreter's flush at exit)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
