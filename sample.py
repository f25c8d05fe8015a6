"""Sample from a trained checkpoint, streaming tokens as they are generated.

    python sample.py --ckpt out/tiny/ckpt.pt --prompt "It was a dark and stormy night"
    python sample.py --ckpt out/tiny/ckpt.pt --prompt-file chapter.txt --max-new-tokens 200 --top-p 0.9
    python sample.py --ckpt out/tiny/ckpt.pt --interactive          # a REPL; the conversation stays in the KV cache
    python sample.py --ckpt out/tiny/ckpt.pt --mc --tree out/book --interactive  # chat over a saved MegaContext
    python sample.py --ckpt out/tiny/ckpt.pt --mc --prompt-file book.txt --budget 512 --tree out/book  # MegaContext
    python sample.py --ckpt out/tiny/ckpt.pt --mc --tree out/book --read-only --interactive  # beside its writer
    python sample.py --ckpt out/tiny/ckpt.pt --mc --tree out/chat --mount out/library --interactive  # + a library

The tokenizer is read from the checkpoint's data_dir (override with --data-dir) and must be the one the checkpoint
was trained with. When the KV cache fills up, the newest half of the conversation is re-encoded into a fresh cache
(the base model alone cannot see further back). --mc removes that limit: the whole history goes into a gist tree and
the model reads a working context of --budget entries (megacontext.py). --prompt-file streams a whole book into the
tree (a progress line past 64k tokens); --tree DIR resumes the session saved in DIR and saves it there every 1M
tokens of a long prompt and on exit, so memory stays flat; the same command after a kill continues the book from
the first token the tree does not hold. One process writes a tree at a time (tree.TreeLock); --read-only opens
one another process holds and saves nothing. After each refocus one line goes to stderr (stdout stays the generated
text): a map of the history by level of detail (oldest left), entries used / budget, edits, swap rate and KV
entries kept / held; on a terminal it is one status line on the bottom row, rewritten in place. A checkpoint
without trained GistNet/LensNet weights gets untrained ones from a fixed seed (the same on every run, so a saved tree
reopens), which keeps the loop usable before the MegaContext training stages. --mount DIR (repeatable) mounts saved
trees read-only (never written, no lock): the base reads their working contexts first, each under an equal part of
--mount-share of the budget (the session's own tree keeps the rest, at least half), and the status line adds each
mount's entries / share.

--interactive reads one prompt per `> ` line until Ctrl-D, an empty line or a quit word (quit, exit). Ctrl-C stops
the reply being generated (the session keeps it) and, at the prompt, ends the session; SIGTERM and SIGHUP end it
wherever they arrive. A --tree session is saved on every one of these exits, whatever the number and spacing of the
signals (terminal.Signals never cuts a save), and the exit status is 0. Every bad flag is a one-line error before
any work.
"""
import argparse
import codecs
import contextlib
import errno
import math
import os
import sys

import terminal

terminal.quit_while_importing()  # a signal while torch loads exits with one line, not a traceback

import torch  # noqa: E402

import checkpoint  # noqa: E402
import predict  # noqa: E402
import prepare  # noqa: E402
from model import GPT, sample_next  # noqa: E402
from session import MOUNT_SHARE, Session, ingest_stream, open_mounts, stream_offset, stream_source  # noqa: E402
from terminal import Signals, StatusLine, prompts, stdout_gone  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402
from tree import TreeError, TreeLock, check_folder  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="out/tiny/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--data-dir", default=None, help="tokenizer directory (default: the checkpoint's data_dir)")
    p.add_argument("--prompt", default=None, help="prompt text (default: start a new document)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF")
    p.add_argument("--mc", action="store_true", help="MegaContext: unbounded history in a gist tree")
    # --mc settings default to the checkpoint's MegaContext config (training stages), else MegaContextConfig's
    p.add_argument("--budget", type=int, default=None, help="--mc: working-context entries (w_max)")
    p.add_argument("--block", type=int, default=None, help="--mc: block size K, a power of two in 2..64")
    p.add_argument("--recent", type=int, default=None, help="--mc: newest tokens always kept raw")
    p.add_argument("--policy", default=None, choices=["lens", "recency"], help="--mc: focus policy")
    p.add_argument("--edit-cost", type=float, default=None, help="--mc: score margin an edit needs per fraction of "
                   "the KV cache it makes stale (MegaContextConfig.edit_cost; 0 = off)")
    p.add_argument("--show-plan", default=None, metavar="HEADS", help="--mc: every K tokens, print the gist the "
                   "MegaPrediction heads in HEADS (a predict-stage checkpoint or a bench/megaprediction.py "
                   "--save-heads file) predict for the next K")
    p.add_argument("--tree", default=None, help="--mc: session directory, resumed when it exists, saved on exit")
    p.add_argument("--read-only", action="store_true", help="--tree: open a saved session (even one another process "
                                                             "writes) and never save")
    p.add_argument("--mount", action="append", default=[], metavar="DIR", help="--mc: mount a saved tree read-only "
                   "(a library): the session reads it too, under a share of the budget; repeatable")
    p.add_argument("--mount-share", type=float, default=None, help="--mount: the mounted trees' share of the budget, "
                   "together (default 0.25, at most 0.5: the session's own tree keeps at least half)")
    args = p.parse_args(argv)
    mc_flags = [f"--{k.replace('_', '-')}" for k in ("budget", "block", "recent", "policy", "edit_cost", "tree",
                                                      "show_plan") if getattr(args, k) is not None]
    mc_flags += ["--read-only"] * args.read_only + ["--mount"] * bool(args.mount)
    for wrong, msg in [  # one line naming the flag and what it accepts; the first that applies is reported
        (args.max_new_tokens < 0, f"--max-new-tokens must be >= 0, got {args.max_new_tokens}"),
        (not 0 <= args.temperature < math.inf, f"--temperature must be a finite number >= 0 (0 = greedy), "
                                               f"got {args.temperature}"),
        (args.top_k is not None and args.top_k < 1, f"--top-k must be >= 1 (leave it out to sample from the whole "
                                                    f"vocabulary), got {args.top_k}"),
        (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}"),
        (not -2**63 <= args.seed < 2**64, f"--seed must be in [-2**63, 2**64), got {args.seed}"),
        (args.prompt is not None and args.prompt_file is not None, "give --prompt or --prompt-file, not both"),
        (args.interactive and (args.prompt is not None or args.prompt_file is not None),
         "--interactive reads its prompts from stdin: drop --prompt/--prompt-file (to stream a book in first, run "
         "once with --mc --prompt-file F --tree DIR, then --mc --tree DIR --interactive)"),
        (bool(mc_flags) and not args.mc, f"{', '.join(mc_flags)} need{'s' * (len(mc_flags) == 1)} --mc"),
        (args.read_only and args.tree is None, "--read-only needs --tree DIR (the saved session to read)"),
        (args.mount_share is not None and not args.mount, "--mount-share needs --mount DIR"),
        (args.mount_share is not None and not 0 < args.mount_share <= 0.5,
         f"--mount-share must be in (0, 0.5] (the session's own tree keeps at least half), got {args.mount_share}"),
        (args.tree is not None and any(os.path.realpath(d) == os.path.realpath(args.tree) for d in args.mount),
         "--mount DIR is the session's own --tree: a tree is mounted read-only or written, not both"),
        (args.device == "cuda" and not torch.cuda.is_available(), "--device cuda: no CUDA device is available"),
    ]:
        if wrong:
            fail(msg)
    return args


def write_stream(tokens, enc, out=sys.stdout):
    """Print token ids as they come, stopping at a document boundary."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens may split a character
    bos = enc.encode_single_token(prepare.BOS)
    for tok in tokens:
        if tok == bos:
            break
        try:
            piece = enc.decode_single_token_bytes(tok)
        except KeyError:  # an id the tokenizer lacks (data prepared before prepare.py capped its vocabulary)
            piece = "\ufffd".encode()
        out.write(utf8.decode(piece))
        out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")


class Conversation:
    """Plain decoding (no --mc): a model, its tokenizer and one KV cache that holds the whole conversation so far."""

    def __init__(self, model: GPT, enc, generator):
        self.model, self.enc, self.generator = model, enc, generator
        self.device = next(model.parameters()).device
        self.cache = model.make_cache(1, model.config.block_size)
        self.history = []  # every token in the cache, for the re-encode when it fills up

    def feed(self, ids):
        """Append prompt tokens to the cache; returns the logits after the last one."""
        block = self.model.config.block_size
        if len(self.history) + len(ids) >= block:  # keep the newest half, re-encoded from scratch
            keep = (self.history + ids)[-(block // 2):]
            self.cache, self.history, ids = self.model.make_cache(1, block), [], keep
        self.history += ids
        logits, _ = self.model(torch.tensor([ids], device=self.device), cache=self.cache)
        return logits[:, -1]

    def sample(self, ids, args, stop=lambda: False):
        """Feed `ids`, then yield up to max_new_tokens sampled ids, each fed back once the consumer asks for more;
        ends early once stop() is true (every id yielded is in the cache by then)."""
        logits = self.feed(ids)
        for _ in range(args.max_new_tokens):
            if stop():
                return
            tok = sample_next(logits, args.temperature, args.top_k, args.top_p, self.generator).item()
            yield tok
            logits = self.feed([tok])

    def reply(self, ids, args, out=sys.stdout, stop=lambda: False):
        """Feed `ids`, then sample and print up to max_new_tokens, stopping at a document boundary or at stop()."""
        write_stream(self.sample(ids, args, stop), self.enc, out)


def mc_status(session, columns: int) -> str:
    """One line: history map by level (scaled to `columns`), entries / budget, edits, swap rate, KV entries the
    refocus kept / held (the rest are re-read), history."""
    t, wc, cfg = session.telemetry, session.wc, session.cfg
    text = (f" | {len(wc)}/{cfg.w_max} entries | +{t['expands']} -{t['collapses']} edits | swap {t['swap_rate']:.2f}"
            f" | kv {t['reused']}/{t['reused'] + t['recomputed']} | {wc.cursor:,} tokens")
    for m in session.mounts:  # each mounted tree: its name, entries / share, deepest zoom
        text += f" | {os.path.basename(os.path.normpath(m.name))} {len(m.wc)}/{m.cfg.w_max} LOD{int(m.wc.lod.min())}+"
    return f"[mc] {wc.level_map(max(columns - len(text) - 6, 8))}{text}"


def mc_sample(session, ids, args, generator, status, stop=lambda: False):
    """Ingest `ids` and refocus until the working context stops changing (a prompt is a question: zoom to what it
    asks for), then yield up to max_new_tokens sampled over the working context, refocusing every K tokens; ends
    early once stop() is true (every id yielded is in the history by then)."""
    session.ingest(ids)
    session.refocus(until_stable=True)
    status.show(mc_status(session, status.size()[0]))
    plan, wrote = getattr(args, "plan", None), []
    for _ in range(args.max_new_tokens):
        if stop():
            return
        if session.pending >= session.cfg.refocus_tokens:  # what step() would do, made visible
            session.refocus()
            status.show(mc_status(session, status.size()[0]))
            if plan is not None:
                session.logits()  # (the newest token's state, read by the decode that follows anyway)
                say(plan.line(wrote))
                wrote = []
        wrote.append(session.step(args.temperature, args.top_k, args.top_p, generator))
        yield wrote[-1]


def say(line: str):
    """One line on stderr; nothing when stderr is gone (the terminal closed: the session must still be saved)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def run_mc(args, ckpt, model, enc, generator, signals):
    """--mc: a MegaContext session, resumed from and saved to --tree when given (never saved with --read-only).
    Bad input fails before any write. Once the session is open, signals are only recorded (Signals.hold), and every
    way the session ends saves it: EOF, an empty line, the quit word, any number of Ctrl-C at any spacing, SIGTERM,
    SIGHUP, a stdout whose reader went away; a history the budget cannot hold saves what came before it."""
    try:
        mc = checkpoint.mc_model(ckpt, args, model)
        resume = args.tree is not None and check_folder(args.tree, write=False)
        mounts = dict(mounts=open_mounts(mc, args.mount), mount_share=args.mount_share or MOUNT_SHARE)
        session = Session.open(mc, args.tree, **mounts) if resume else Session(mc, **mounts)
        args.plan = predict.Plan(args.show_plan, mc, enc) if args.show_plan else None
    except ValueError as e:  # bad config, a tree from another model or K, a damaged tree
        fail(str(e))
    signals.hold()
    if not len(session.tree):  # a new session (or the empty commit of one whose first save was cut short)
        session.ingest([enc.encode_single_token(prepare.BOS)])
    save_to = None if args.read_only else args.tree
    say(f"[mc] {'resumed' if resume else 'new'} session: {session.describe()}"
        f"{'; read-only: nothing will be saved' if args.read_only else ''}")
    status, error, opened = StatusLine(), None, len(session.tree)
    try:
        if args.interactive:
            say("[mc] a line per prompt; an empty line, quit, Ctrl-D or Ctrl-C at the prompt ends (and saves); "
                "Ctrl-C stops a reply")
            for line in prompts(signals):
                with signals.reply():
                    write_stream(mc_sample(session, enc.encode_ordinary(line), args, generator, status, signals), enc)
        else:
            ids, start, source = enc.encode_ordinary(args.prompt_text), 0, None
            if args.prompt_file and save_to:  # recorded in the tree, so that a run cut short can be continued
                source = stream_source(os.path.abspath(args.prompt_file), args.prompt_bytes, len(ids))
                start, note = stream_offset(session, source)
                if note:
                    say(f"[mc] {note}")
                source = {**source, "start": len(session.tree) - start, "done": start}
            if args.prompt:
                sys.stdout.write(args.prompt)  # a short prompt is echoed as without --mc; a book is not
            with signals.reply():  # a book streams into the tree chunk by chunk, saved to --tree as it goes
                ingest_stream(session, ids[start:], save_to=save_to, stop=signals, source=source,
                              out=sys.stderr if len(ids) - start > 65536 else None)
                if not signals.stop():  # (stopped: no refocus and reply to wait for before the save)
                    write_stream(mc_sample(session, [], args, generator, status, signals), enc)
    except TreeError as e:  # a save of the streaming book failed (a full disk): DIR keeps its last generation
        fail(str(e))
    except ValueError as e:  # a history the budget cannot hold: ingest changed nothing, so what came before is kept
        error = str(e)
    except OSError as e:  # the reader of stdout is gone (`| head`, a `| tee` that took the Ctrl-C; EIO: a closed
        if e.errno not in (errno.EPIPE, errno.EIO):  # terminal): still save
            raise
        stdout_gone(e)
    finally:
        status.close()
    why = signals.ended if args.interactive else signals.stopped
    if why:
        say(f"[mc] stopped ({why}) at {len(session.tree):,} tokens of history")
    if not save_to:
        if args.read_only and len(session.tree) > opened:
            say(f"[mc] read-only: the {len(session.tree) - opened:,} tokens of this session were not saved")
    elif error is None or len(session.tree) > opened:  # a failed run that added nothing writes nothing
        try:
            session.save(save_to)
        except TreeError as e:  # a full disk: the message says what DIR keeps
            fail(str(e))
        if error is None:
            say(f"[mc] saved {len(session.tree):,} tokens to {save_to}")
    if error is not None:
        fail(f"{error}{f' (the session so far is saved in {save_to})' if save_to else ''}")


def read_prompt(args) -> tuple[bytes, str]:
    """The --prompt-file's bytes (their size and checksum identify a streamed book) and its text."""
    try:
        with open(args.prompt_file, "rb") as f:
            data = f.read()
        return data, data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads it
    except OSError as e:
        fail(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}")
    except UnicodeDecodeError as e:
        fail(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
             f"{e.start}); convert it first, e.g. iconv -f latin1 -t utf-8")


def main(argv):
    signals = Signals()
    try:
        run(parse_args(argv), signals)
    except BrokenPipeError:
        stdout_gone()
    except KeyboardInterrupt:  # a signal while loading, before the session opened: nothing to save, no traceback
        fail("interrupted")
    finally:
        signals.close()


def run(args, signals):
    args.prompt_bytes, args.prompt_text = read_prompt(args) if args.prompt_file else (b"", args.prompt or "")
    with contextlib.ExitStack() as held:
        if args.tree is not None:  # refused before anything is read or written: foreign files, a locked tree
            try:
                if not check_folder(args.tree, write=False) and args.read_only:
                    raise TreeError(f"--read-only: {os.path.abspath(args.tree)} holds no saved session to read")
                if not args.read_only:
                    held.enter_context(TreeLock(args.tree))  # one writer per tree, for the whole session
                    check_folder(args.tree, write=True)
            except TreeError as e:
                fail(str(e))
        ckpt = load_checkpoint(args.ckpt)
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                              else "cpu")
        data_dir = args.data_dir or ckpt["config"]["data_dir"]
        try:
            model = checkpoint.load_gpt(ckpt, device)
            enc = prepare.load_tokenizer(data_dir)
            checkpoint.check_tokenizer(ckpt, data_dir, enc)
        except FileNotFoundError:
            fail(f"no tokenizer.json in {data_dir!r} (the checkpoint's data_dir); pass --data-dir")
        except ValueError as e:  # damaged, or not the checkpoint's tokenizer: the message names the file and the fix
            fail(str(e))
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with torch.no_grad():
            if args.mc:
                return run_mc(args, ckpt, model, enc, generator, signals)
            chat(args, model, enc, generator, signals)


def chat(args, model: GPT, enc, generator, signals):
    """Plain decoding: one reply to --prompt/--prompt-file, or --interactive turns in one KV cache."""
    conversation = Conversation(model, enc, generator)
    signals.hold()  # a signal stops a reply or ends the REPL, never cuts a token in two
    bos = [enc.encode_single_token(prepare.BOS)]
    if args.interactive:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter model; a line per prompt; an empty "
              "line, quit, Ctrl-D or Ctrl-C at the prompt ends; Ctrl-C stops a reply", file=sys.stderr)
        conversation.feed(bos)
        for line in prompts(signals):
            with signals.reply():
                conversation.reply(enc.encode_ordinary(line), args, stop=signals)
        return
    sys.stdout.write(args.prompt_text)
    with signals.reply():
        conversation.reply(bos + enc.encode_ordinary(args.prompt_text), args, stop=signals)


if __name__ == "__main__":
    main(sys.argv[1:])
