"""Sample from a trained checkpoint, streaming tokens as they are generated.

    python sample.py --ckpt out/tiny/ckpt.pt --prompt "It was a dark and stormy night"
    python sample.py --ckpt out/tiny/ckpt.pt --prompt-file chapter.txt --max-new-tokens 200 --top-p 0.9
    python sample.py --ckpt out/tiny/ckpt.pt --interactive          # a REPL; the conversation stays in the KV cache

The tokenizer is read from the checkpoint's data_dir (override with --data-dir). When the KV cache fills up, the
newest half of the conversation is re-encoded into a fresh cache (the base model alone cannot see further back;
MegaContext's --mc mode is what removes that limit).
"""
import argparse
import codecs
import sys

import torch

import prepare
from model import GPT, GPTConfig, sample_next
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
    args = p.parse_args(argv)
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) or args.max_new_tokens < 0:
        fail("need temperature >= 0, 0 < top-p <= 1 and max-new-tokens >= 0")
    return args


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

    def reply(self, ids, args, out=sys.stdout):
        """Feed `ids`, then sample and print up to max_new_tokens, stopping at a document boundary."""
        logits = self.feed(ids)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # tokens may split a character
        bos = self.enc.encode_single_token(prepare.BOS)
        for _ in range(args.max_new_tokens):
            nxt = sample_next(logits, args.temperature, args.top_k, args.top_p, self.generator)
            tok = nxt.item()
            if tok == bos:
                break
            out.write(utf8.decode(self.enc.decode_single_token_bytes(tok)))
            out.flush()
            logits = self.feed([tok])
        out.write(utf8.decode(b"", final=True) + "\n")


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
        prompt = args.prompt or ""
        if args.prompt_file:
            try:
                prompt = open(args.prompt_file, encoding="utf-8").read()
            except OSError as e:
                fail(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}")
        sys.stdout.write(prompt)
        session.reply(bos + enc.encode_ordinary(prompt), args)


if __name__ == "__main__":
    main(sys.argv[1:])
