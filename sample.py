"""Sample from a trained checkpoint, streaming tokens as they are generated.

    python sample.py --ckpt out/tiny/ckpt.pt --prompt "It was a dark and stormy night"
    python sample.py --ckpt out/tiny/ckpt.pt --prompt-file chapter.txt --max-new-tokens 200 --top-p 0.9
    python sample.py --ckpt out/tiny/ckpt.pt --interactive          # a REPL; the conversation stays in the KV cache
    python sample.py --ckpt out/tiny/ckpt.pt --mc --prompt-file book.txt --budget 512 --tree out/book  # MegaContext

The tokenizer is read from the checkpoint's data_dir (override with --data-dir). When the KV cache fills up, the
newest half of the conversation is re-encoded into a fresh cache (the base model alone cannot see further back).
--mc removes that limit: the whole history goes into a gist tree and the model reads a working context of --budget
entries (megacontext.py). --prompt-file streams a whole book into the tree (a progress line past 64k tokens);
--tree DIR resumes the session saved in DIR and saves it there every 1M tokens of a long prompt and on exit, so
memory stays flat. After each refocus one line goes to stderr (stdout stays the generated text):
a map of the history by level of detail (oldest left), entries used / budget, edits and swap rate. A checkpoint
without trained GistNet/LensNet weights gets untrained ones from a fixed seed (the same on every run, so a saved
tree reopens), which keeps the loop usable before the MegaContext training stages.
"""
import argparse
import codecs
import dataclasses
import os
import shutil
import sys

import torch

import prepare
from megacontext import MegaContextConfig, MegaContextModel
from model import GPT, GPTConfig, sample_next
from session import Session as MCSession
from session import ingest_stream
from train import fail, load_checkpoint


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
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) or args.max_new_tokens < 0:
        fail("need temperature >= 0, 0 < top-p <= 1 and max-new-tokens >= 0")
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

    def sample(self, ids, args):
        """Feed `ids`, then yield up to max_new_tokens sampled ids, each fed back once the consumer asks for more."""
        logits = self.feed(ids)
        for _ in range(args.max_new_tokens):
            tok = sample_next(logits, args.temperature, args.top_k, args.top_p, self.generator).item()
            yield tok
            logits = self.feed([tok])

    def reply(self, ids, args, out=sys.stdout):
        """Feed `ids`, then sample and print up to max_new_tokens, stopping at a document boundary."""
        write_stream(self.sample(ids, args), self.enc, out)


def mc_model(ckpt, args, gpt):
    """The checkpoint's MegaContext config and weights when it has them (training stages), else untrained nets."""
    fields = {f.name for f in dataclasses.fields(MegaContextConfig)}
    saved = {k: v for k, v in ckpt.get("mc_config", {}).items() if k in fields}
    given = {"block_k": args.block, "w_max": args.budget, "recent_tokens": args.recent, "policy": args.policy}
    cfg = MegaContextConfig(**{**saved, **{k: v for k, v in given.items() if v is not None}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # untrained nets are identical on every run, so the model identity of a tree holds
        mc = MegaContextModel(gpt, cfg)
    for name in ("gistnet", "lensnet"):
        if name in ckpt:
            getattr(mc, name).load_state_dict(ckpt[name])
    return mc.eval()


def mc_status(session) -> str:
    """One line: history map by level (scaled to the terminal), entries / budget, edits, swap rate, history."""
    t, wc, cfg = session.telemetry, session.wc, session.cfg
    text = (f" | {len(wc)}/{cfg.w_max} entries | +{t['expands']} -{t['collapses']} edits | swap {t['swap_rate']:.2f}"
            f" | {wc.cursor:,} tokens")
    width = shutil.get_terminal_size((100, 24)).columns - len(text) - 6
    return f"[mc] {wc.level_map(max(width, 8))}{text}"


def mc_sample(session, ids, args, generator):
    """Ingest `ids`, then yield up to max_new_tokens sampled over the working context, refocusing every K tokens."""
    session.ingest(ids)
    for _ in range(args.max_new_tokens):
        if session.pending >= session.cfg.refocus_tokens:  # what step() would do, made visible
            session.refocus()
            print(mc_status(session), file=sys.stderr, flush=True)
        yield session.step(args.temperature, args.top_k, args.top_p, generator)


def run_mc(args, ckpt, model, enc, generator):
    """--mc: a MegaContext session, resumed from and saved to --tree when given. Bad input fails before any write."""
    bos = [enc.encode_single_token(prepare.BOS)]
    try:
        mc = mc_model(ckpt, args, model)
        resume = args.tree is not None and os.path.exists(os.path.join(args.tree, "meta.json"))
        session = MCSession.open(mc, args.tree) if resume else MCSession(mc)
        if not resume:
            session.ingest(bos)
        print(f"[mc] {'resumed' if resume else 'new'} session: {session.describe()}", file=sys.stderr, flush=True)
        if args.interactive:
            for line in sys.stdin:
                if not line.strip():
                    break
                write_stream(mc_sample(session, enc.encode_ordinary(line), args, generator), enc)
        else:
            ids = enc.encode_ordinary(read_prompt(args) if args.prompt_file else args.prompt or "")
            if args.prompt and not args.prompt_file:
                sys.stdout.write(args.prompt)  # a short prompt is echoed as without --mc; a book is not
            # a book streams into the tree chunk by chunk, saved to --tree as it goes (RAM stays flat)
            ingest_stream(session, ids, save_to=args.tree, out=sys.stderr if len(ids) > 65536 else None)
            write_stream(mc_sample(session, [], args, generator), enc)
    except ValueError as e:  # bad config, a tree from another model or K, a history the budget cannot hold
        fail(str(e))
    if args.tree:
        try:
            session.save(args.tree)
        except OSError as e:
            fail(f"cannot save the session to --tree {args.tree}: {e.strerror}")
        print(f"[mc] saved {len(session.tree):,} tokens to {args.tree}", file=sys.stderr)


def read_prompt(args) -> str:
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        fail(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}")


def main(argv):
    args = parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    data_dir = args.data_dir or ckpt["config"]["data_dir"]
    try:
        enc = prepare.load_tokenizer(data_dir)
    except (FileNotFoundError, ValueError) as e:
        fail(f"cannot load the tokenizer from {data_dir!r} ({e}); pass --data-dir")
    if enc.n_vocab > model.config.vocab_size:
        fail(f"tokenizer in {data_dir!r} has {enc.n_vocab} tokens but the model only {model.config.vocab_size}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if args.mc:
        with torch.no_grad():
            return run_mc(args, ckpt, model, enc, generator)
    session = Session(model, enc, generator)
    bos = [enc.encode_single_token(prepare.BOS)]
    with torch.no_grad():
        if args.interactive:
            print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter model; empty line or EOF ends")
            session.feed(bos)
            for line in sys.stdin:
                if not line.strip():
                    break
                session.reply(enc.encode_ordinary(line), args)
            return
        prompt = read_prompt(args) if args.prompt_file else args.prompt or ""
        sys.stdout.write(prompt)
        session.reply(bos + enc.encode_ordinary(prompt), args)


if __name__ == "__main__":
    main(sys.argv[1:])
