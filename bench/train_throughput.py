"""Training throughput of a config: tokens/s and MFU over N optimizer steps, first interval (warm-up, compile) excluded.

    python bench/train_throughput.py configs/small.py --random-tokens --steps=40     # one GPU, no corpus needed
    python bench/train_throughput.py configs/tiny.py --steps=40 --data_dir=data/synthetic   # CPU (MFU n/a)

Runs train.py itself (same code path as training, no checkpoint written) and reads its JSONL log. --random-tokens
trains on uniform random ids over a --vocab vocabulary written in prepare.py's shard format to a temporary directory:
the cost per token is the real one (the vocabulary sets the head's size), and no tokenizer, corpus or rustbpe is
needed, as on the GPU machine (so a config's retrieval drills must be off: --retrieval_mix=0 --copy_steps=0).
Extra --key=value arguments are train.py config overrides. Writes <out>/train_<config>_<tag>.json (tag:
<device>_<date>_<commit>; commit from git, else $MC_COMMIT), or appends one line to --jsonl. Interrupted (SIGINT:
bench/run_gpu.sh's time slice), it still reports the intervals logged so far.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402
from configs import ConfigError, load_config  # noqa: E402


def random_corpus(path, vocab, n_train=1 << 22, n_val=1 << 16, seed=0):
    """A prepared-data directory (prepare.py's shard format) of uniform random token ids; no tokenizer (meta.json's
    `random_ids` tells train.py not to look for one)."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(os.path.join(path, f"{split}.bin"))
        np.save(os.path.join(path, f"{split}.idx.npy"), np.array([0, n], dtype=np.int64))
        splits[split] = dict(n_docs=1, n_tokens=n, n_chars=0, docs=[])
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(dict(vocab_size=vocab, synthetic="uniform random token ids (throughput only)", splits=splits,
                       facts={}, random_ids=True), f)


def run_tag(device: str) -> tuple[str, str]:
    """(<device>_<date>_<commit>, commit) of this run."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or os.environ.get("MC_COMMIT", "nogit")
    return f"{device.replace(' ', '_')}_{datetime.date.today().isoformat()}_{commit}", commit


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="config files and --key=value overrides, as for train.py")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps to time")
    p.add_argument("--log-every", type=int, default=10, help="steps per timed interval")
    p.add_argument("--random-tokens", action="store_true", help="train on random ids (no prepared data needed)")
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary of --random-tokens (prepare.py's default)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="where the JSON goes")
    p.add_argument("--tag", default=None, help="<device>_<date>_<commit> (default: computed)")
    p.add_argument("--jsonl", default=None, help="append the result as one line to this file instead")
    args, overrides = p.parse_known_args(argv)
    if args.random_tokens:  # random ids have no tokenizer, so no needle markers: the drills cannot be planted
        try:
            cfg = load_config(train.TrainConfig, args.configs + overrides)
        except ConfigError:
            cfg = None  # train.main reports it in one line
        if cfg and (cfg.retrieval_mix > 0 or cfg.copy_steps > 0):
            sys.exit(f"error: --random-tokens has no tokenizer, and the retrieval drills need one (retrieval_mix="
                     f"{cfg.retrieval_mix}, copy_steps={cfg.copy_steps}); pass --retrieval_mix=0 --copy_steps=0")
    interrupted = False
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as data:
        if args.random_tokens:
            random_corpus(data, args.vocab)
            overrides = overrides + [f"--data_dir={data}"]
        try:
            train.main(args.configs + overrides + [f"--out_dir={out}", f"--max_iters={args.steps}",
                                                   f"--eval_interval={10 * args.steps}", "--eval_iters=1",
                                                   "--eval_gap=0", f"--log_interval={args.log_every}",
                                                   "--save_checkpoint=False"])
        except KeyboardInterrupt:  # out of time: what was logged still counts
            interrupted = True
        with open(os.path.join(out, "log.jsonl")) as f:
            lines = [json.loads(line) for line in f]
    intervals = [r for r in lines if "tok_per_s" in r][1:]  # the first holds warm-up and compilation
    if not intervals:
        sys.exit("error: need at least two logged intervals: raise --steps or lower --log-every")
    tok_s = statistics.median(r["tok_per_s"] for r in intervals)
    mfus = [r["mfu"] for r in intervals if r["mfu"] is not None]
    cfg = lines[0]["config"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tag, commit = (args.tag, args.tag.rsplit("_", 1)[-1]) if args.tag else run_tag(device)
    config = os.path.splitext(os.path.basename(args.configs[0]))[0]
    result = {"config": config, "device": device, "torch": torch.__version__, "triton": lines[1]["run"]["triton"],
              "date": datetime.date.today().isoformat(), "commit": commit,
              "command": "python bench/train_throughput.py " + " ".join(argv), "tokens_per_s": tok_s,
              "mfu": statistics.median(mfus) if mfus else None, "steps": args.steps,
              "data": "random token ids" if args.random_tokens else cfg["data_dir"], "interrupted": interrupted,
              "intervals": len(intervals),
              "tokens_per_step": cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum"],
              "model": {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "attn", "compile")}}
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(result) + "\n")
    else:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"train_{config}_{tag}.json"), "w") as f:
            json.dump(result, f, indent=2)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a"
    print(f"{'device':<24} {'tok/s':>12} {'MFU':>8}\n{device:<24} {tok_s:>12,.0f} {mfu:>8}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
