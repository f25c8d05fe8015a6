"""Training throughput of a config: tokens/s and MFU over N optimizer steps, first interval (warm-up, compile) excluded.

    python bench/train_throughput.py configs/small.py --steps=60              # one GPU: writes bench/results/*.json
    python bench/train_throughput.py configs/tiny.py --steps=40 --data_dir=data/synthetic   # CPU (MFU n/a)

Runs train.py itself (same code path as training, no checkpoint written) and reads its JSONL log. Extra --key=value
arguments are train.py config overrides.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train  # noqa: E402


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("configs", nargs="+", help="config files and --key=value overrides, as for train.py")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps to time")
    p.add_argument("--log-every", type=int, default=10, help="steps per timed interval")
    args, overrides = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory() as out:
        train.main(args.configs + overrides + [f"--out_dir={out}", f"--max_iters={args.steps}",
                                               f"--eval_interval={10 * args.steps}", "--eval_iters=1", "--eval_gap=0",
                                               f"--log_interval={args.log_every}", "--save_checkpoint=False"])
        with open(os.path.join(out, "log.jsonl")) as f:
            lines = [json.loads(line) for line in f]
    intervals = [r for r in lines if "tok_per_s" in r][1:]  # the first holds warm-up and compilation
    if not intervals:
        sys.exit("error: need at least two logged intervals: raise --steps or lower --log-every")
    tok_s = statistics.median(r["tok_per_s"] for r in intervals)
    mfus = [r["mfu"] for r in intervals if r["mfu"] is not None]
    cfg = lines[0]["config"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    result = {"device": device, "torch": torch.__version__, "triton": lines[1]["run"]["triton"],
              "date": datetime.date.today().isoformat(), "commit": commit.strip(),
              "command": "python bench/train_throughput.py " + " ".join(argv), "tokens_per_s": tok_s,
              "mfu": statistics.median(mfus) if mfus else None, "steps": args.steps,
              "tokens_per_step": cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum"],
              "model": {k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}}
    if torch.cuda.is_available():
        os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
        config = os.path.splitext(os.path.basename(args.configs[0]))[0]
        name = f"train_{config}_{device.replace(' ', '_')}_{result['date']}_{result['commit']}.json"
        with open(os.path.join(REPO, "bench", "results", name), "w") as f:
            json.dump(result, f, indent=2)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a"
    print(f"{'device':<24} {'tok/s':>12} {'MFU':>8}\n{device:<24} {tok_s:>12,.0f} {mfu:>8}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
