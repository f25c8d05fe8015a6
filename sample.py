"""Sample from a trained checkpoint, streaming tokens as they are generated.

    python sample.py --ckpt out/tiny/ckpt.pt --prompt "It was a dark and stormy night"
    python sample.py --ckpt out/tiny/ckpt.pt --prompt-file chapter.txt --max-new-tokens 200 --top-p 0.9
    python sample.py --ckpt out/tiny/ckpt.pt --interactive          # a REPL; the conversation stays in the KV cache
    python sample.py --ckpt out/tiny/ckpt.pt --mc --tree out/book --interactive  # chat over a saved MegaContext
    python sample.py --ckpt out/tiny/ckpt.pt --mc --prompt-file book.txt --budget 512 --tree out/book  # MegaContext

The tokenizer is read from the checkpoint's data_dir (override with --data-dir). When the KV cache fills up, the
newest half of the conversation is re-encoded into a fresh cache (the base model alone cannot see further back).
--mc removes that limit: the whole history goes into a gist tree and the model reads a working context of --budget
entries (megacontext.py). --prompt-file streams a whole book into the tree (a progress line past 64k tokens);
--tree DIR resumes the session saved in DIR and saves it there every 1M tokens of a long prompt and on exit, so
memory stays flat. After each refocus one line goes to stderr (stdout stays the generated text): a map of the
history by level of detail (oldest left), entries used / budget, edits and swap rate; on a terminal it is one status
line on the bottom row, rewritten in place. A checkpoint without trained GistNet/LensNet weights gets untrained ones
from a fixed seed (the same on every run, so a saved tree reopens), which keeps the loop usable before the
MegaContext training stages.

--interactive reads one prompt per `> ` line until Ctrl-D, an empty line or a quit word (quit, exit). Ctrl-C stops
the reply being generated (the session keeps it) and, at the prompt, ends the session; a --tree session is saved on
every one of these exits, and the exit status is 0. Every bad flag is a one-line error before any work.
"""
import argparse
import codecs
import dataclasses
import math
import os
import sys

import torch

import prepare
from megacontext import MegaContextConfig, MegaContextModel
from model import GPT, GPTConfig, sample_next
from session import Session as MCSession, ingest_stream
from terminal import CtrlC, StatusLine, prompts, stdout_gone
from train import fail, load_checkpoint
from tree import TreeError, check_folder


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
    p.add_argument("--tree", default=None, help="--mc: session directory, resumed when it exists, saved on exit")
    args = p.parse_args(argv)
    mc_flags = [f"--{k}" for k in ("budget", "block", "recent", "policy", "tree") if getattr(args, k) is not None]
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
        out.write(utf8.decode(enc.decode_single_token_bytes(tok)))
        out.flush()
    out.write(utf8.decode(b"", final=True) + "\n")


class Session:
    """A model, its tokenizer and one KV cache that holds the whole conversation so far."""

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


def mc_model(ckpt, args, gpt):
    """The checkpoint's MegaContext config and weights when it has them (training stages), else untrained nets. The
    budget defaults to the checkpoint's, else to the default capped at the base's block."""
    fields = {f.name for f in dataclasses.fields(MegaContextConfig)}
    saved = {"w_max": min(MegaContextConfig.w_max, gpt.config.block_size)}
    saved |= {k: v for k, v in ckpt.get("mc_config", {}).items() if k in fields}
    given = {"block_k": args.block, "w_max": args.budget, "recent_tokens": args.recent, "policy": args.policy}
    cfg = MegaContextConfig(**{**saved, **{k: v for k, v in given.items() if v is not None}})
    if cfg.w_max > gpt.config.block_size:  # DESIGN §2: PoSE trains positions, not spans
        raise ValueError(f"budget {cfg.w_max} is above the {gpt.config.block_size}-token block the base model was "
                         f"trained on: it never attended over that many entries; use --budget <= "
                         f"{gpt.config.block_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # untrained nets are identical on every run, so the model identity of a tree holds
        mc = MegaContextModel(gpt, cfg)
    for name in ("gistnet", "lensnet"):
        if name in ckpt:
            getattr(mc, name).load_state_dict(ckpt[name])
    return mc.eval()


def mc_status(session, columns: int) -> str:
    """One line: history map by level (scaled to `columns`), entries / budget, edits, swap rate, history."""
    t, wc, cfg = session.telemetry, session.wc, session.cfg
    text = (f" | {len(wc)}/{cfg.w_max} entries | +{t['expands']} -{t['collapses']} edits | swap {t['swap_rate']:.2f}"
            f" | {wc.cursor:,} tokens")
    return f"[mc] {wc.level_map(max(columns - len(text) - 6, 8))}{text}"


def mc_sample(session, ids, args, generator, status, stop=lambda: False):
    """Ingest `ids` and refocus until the working context stops changing (a prompt is a question: zoom to what it
    asks for), then yield up to max_new_tokens sampled over the working context, refocusing every K tokens; ends
    early once stop() is true (every id yielded is in the history by then)."""
    session.ingest(ids)
    session.refocus(until_stable=True)
    status.show(mc_status(session, status.size()[0]))
    for _ in range(args.max_new_tokens):
        if stop():
            return
        if session.pending >= session.cfg.refocus_tokens:  # what step() would do, made visible
            session.refocus()
            status.show(mc_status(session, status.size()[0]))
        yield session.step(args.temperature, args.top_k, args.top_p, generator)


def run_mc(args, ckpt, model, enc, generator, ctrlc):
    """--mc: a MegaContext session, resumed from and saved to --tree when given. Bad input fails before any write;
    every way out but a third Ctrl-C mid-reply saves the session (Session.save commits atomically)."""
    try:
        mc = mc_model(ckpt, args, model)
        resume = args.tree is not None and check_folder(args.tree, write=True)
        session = MCSession.open(mc, args.tree) if resume else MCSession(mc)
    except ValueError as e:  # bad config, a tree from another model or K, a damaged tree
        fail(str(e))
    if not resume:
        session.ingest([enc.encode_single_token(prepare.BOS)])
    print(f"[mc] {'resumed' if resume else 'new'} session: {session.describe()}", file=sys.stderr, flush=True)
    status, error, opened = StatusLine(), None, len(session.tree)
    try:
        if args.interactive:
            print("[mc] a line per prompt; an empty line, quit, Ctrl-D or Ctrl-C at the prompt ends (and saves); "
                  "Ctrl-C stops a reply", file=sys.stderr, flush=True)
            for line in prompts():
                with ctrlc.soft():
                    write_stream(mc_sample(session, enc.encode_ordinary(line), args, generator, status, ctrlc), enc)
        else:
            ids = enc.encode_ordinary(args.prompt_text)
            if args.prompt:
                sys.stdout.write(args.prompt)  # a short prompt is echoed as without --mc; a book is not
            with ctrlc.soft():  # a book streams into the tree chunk by chunk, saved to --tree as it goes
                ingest_stream(session, ids, save_to=args.tree, out=sys.stderr if len(ids) > 65536 else None,
                              stop=ctrlc)
                write_stream(mc_sample(session, [], args, generator, status, ctrlc), enc)
    except ValueError as e:  # a history the budget cannot hold: ingest changed nothing, so what came before is kept
        error = str(e)
    except BrokenPipeError:  # the reader of stdout is gone (`| head`, a `| tee` that took the Ctrl-C): still save
        stdout_gone()
    except KeyboardInterrupt:  # between turns the session is whole and is saved; mid-update the saved one stays
        if ctrlc.torn:
            fail(f"interrupted{f'; {args.tree} keeps its last saved session' if args.tree else ''}")
    finally:
        status.close()
    if ctrlc():
        print(f"[mc] stopped (Ctrl-C) at {len(session.tree):,} tokens of history", file=sys.stderr, flush=True)
    saving = args.tree and (error is None or len(session.tree) > opened)  # a failed run that added nothing: no write
    if saving:
        try:
            session.save(args.tree)
        except (OSError, TreeError) as e:
            fail(f"cannot save the session to --tree {args.tree}: {getattr(e, 'strerror', None) or e}")
        if error is None:
            print(f"[mc] saved {len(session.tree):,} tokens to {args.tree}", file=sys.stderr)
    if error is not None:
        fail(f"{error}{f' (the session so far is saved in {args.tree})' if saving else ''}")


def read_prompt(args) -> str:
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}")
    except UnicodeDecodeError as e:
        fail(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
             f"{e.start}); convert it first, e.g. iconv -f latin1 -t utf-8")


def main(argv):
    ctrlc = CtrlC()
    try:
        run(parse_args(argv), ctrlc)
    except BrokenPipeError:
        stdout_gone()
    except KeyboardInterrupt:  # Ctrl-C while loading, or a third one in a reply: no traceback, no half-written file
        fail("interrupted")


def run(args, ctrlc):
    args.prompt_text = read_prompt(args) if args.prompt_file else args.prompt or ""  # bad input before any work
    if args.tree is not None:
        try:
            check_folder(args.tree, write=True)
        except TreeError as e:
            fail(str(e))
    ckpt = load_checkpoint(args.ckpt)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    data_dir = args.data_dir or ckpt["config"]["data_dir"]
    try:
        enc = prepare.load_tokenizer(data_dir)
    except FileNotFoundError:
        fail(f"no tokenizer.json in {data_dir!r} (the checkpoint's data_dir); pass --data-dir")
    except ValueError as e:  # damaged: the message names the file and the fix
        fail(str(e))
    if enc.n_vocab > model.config.vocab_size:
        fail(f"tokenizer in {data_dir!r} has {enc.n_vocab} tokens but the model only {model.config.vocab_size}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.mc:
        with torch.no_grad():
            return run_mc(args, ckpt, model, enc, generator, ctrlc)
    session = Session(model, enc, generator)
    bos = [enc.encode_single_token(prepare.BOS)]
    with torch.no_grad():
        if args.interactive:
            print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter model; a line per prompt; an "
                  "empty line, quit, Ctrl-D or Ctrl-C at the prompt ends; Ctrl-C stops a reply", file=sys.stderr)
            session.feed(bos)
            for line in prompts():
                with ctrlc.soft():
                    session.reply(enc.encode_ordinary(line), args, stop=ctrlc)
            return
        sys.stdout.write(args.prompt_text)
        with ctrlc.soft():
            session.reply(bos + enc.encode_ordinary(args.prompt_text), args, stop=ctrlc)


if __name__ == "__main__":
    main(sys.argv[1:])
