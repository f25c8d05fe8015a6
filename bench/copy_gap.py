"""Can the base copy a needle from far back? Retrieval accuracy of a base checkpoint, every token raw, against the
position gap between the needle and its question (the p-RoPE measurement in configs/mc_demo.py and the README).

    python bench/copy_gap.py --ckpt out/mc_demo/base/ckpt.pt                    # pass keys, gaps 0 .. 16M
    python bench/copy_gap.py --ckpt out/mc_demo/base/ckpt.pt --task multikey --trials 40

Each prompt is retrieval.make_prompt's (--history tokens of held-out book text, the needle at depth 0.2, the question
last); the positions after the needle (8 tokens past its end) are shifted by the gap, so the needle sits gap + ~200
positions before the question while attention reads only --history entries. Greedy decoding; correct when every answer
token matches. Prints one line per gap (hits / trials, Wilson 95% interval).
"""
import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import retrieval  # noqa: E402
from longctx import haystack  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402


@torch.no_grad()
def answer(gpt, ids, mu, n_new: int) -> list[int]:
    """Greedy continuation of ids (T,) at positions mu (T,) float64, the new tokens at consecutive positions."""
    x, mu, out = torch.as_tensor(ids)[None], mu[None], []
    for _ in range(n_new):
        logits, _ = gpt(x, mu=mu, last_only=True)
        out.append(int(logits[0, -1].argmax()))
        x, mu = torch.cat([x, torch.tensor([[out[-1]]])], 1), torch.cat([mu, mu[:, -1:] + 1], 1)
    return out


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a base checkpoint written by train.py")
    p.add_argument("--data-dir", default=None, help="prepared data (default: the checkpoint's data_dir)")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--task", default="passkey", choices=retrieval.TASKS)
    p.add_argument("--gaps", default="0,1000,4000,30000,300000,1000000,4000000,16000000")
    p.add_argument("--history", type=int, default=256, help="prompt tokens (all read raw)")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        gaps = [int(g) for g in args.gaps.split(",") if g.strip()]
    except ValueError:
        fail(f"--gaps must be comma-separated integers, got {args.gaps!r}")
    if not gaps or min(gaps) < 0 or args.trials < 1:
        fail("--gaps must be >= 0 and --trials >= 1")
    ckpt = load_checkpoint(args.ckpt)
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.eval()
    if args.history > gpt.config.block_size:
        fail(f"--history {args.history} is above the base's {gpt.config.block_size}-token block")
    data_dir = args.data_dir or ckpt["config"]["data_dir"]
    try:
        needles, hay = retrieval.needles_for(data_dir), haystack(data_dir, args.split, 4 * args.history)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    rng, rows = np.random.default_rng(args.seed), []
    for gap in gaps:
        hits = 0
        for _ in range(args.trials):
            prompt = retrieval.make_prompt(hay, needles, args.task, args.history, 0.2, rng)
            mu = torch.arange(args.history, dtype=torch.float64)
            mu[max(a + n for a, n in prompt["needles"]) + 8:] += gap  # the gap after the deepest needle
            hits += answer(gpt, prompt["ids"], mu, len(prompt["answer"])) == prompt["answer"]
        acc, lo, hi = retrieval.wilson(hits, args.trials)
        rows.append(dict(gap=gap, hits=hits, trials=args.trials, accuracy=acc, ci=[lo, hi]))
        print(f"gap {gap:>11,}: {hits}/{args.trials} = {acc:.2f} [{lo:.2f}, {hi:.2f}]", flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
