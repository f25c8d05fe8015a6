"""GistNet at a level no training reached (issue 11): dNLL@H at LOD1..LOD3 for each way of making LOD3 gists.

    D=data/pg1k; B=out/gd/base/ckpt.pt
    python train.py configs/tiny.py --data_dir=$D --block_size=512 --max_iters=600 --out_dir=out/gd/base
    python train.py configs/tiny_gist.py --data_dir=$D --base_ckpt=$B --out_dir=out/gd/split
    python train.py configs/tiny_gist.py --data_dir=$D --base_ckpt=$B --gist_shared=True --out_dir=out/gd/shared
    python bench/gist_depth.py --split out/gd/split/ckpt.pt --shared out/gd/shared/ckpt.pt --data-dir $D

The gist stage trains LOD1 and LOD2 (the pyramidal kernel's two gist levels), so LOD3 (K**3 tokens) is the first level
no training reached. Arms: `reuse` (one GistNet per trained level, LOD3 made by the LOD2 weights: the engine's rule),
`reuse-lod1` (LOD3 by the LOD1 weights), `shared` (one GistNet trained on both levels: gist_shared), `mean` (mean
pooling, the GistNet-free baseline). Metric: stages.deep_dnll on held-out windows of T = 2H - 1 + --cursor tokens
from documents of the split, one cursor c per window: NLL of the H tokens after c when [0, c) is the coarsest tiling
by nodes up to the level followed by W0 = H raw tokens, minus the NLL with all c tokens raw. Reported: mean dNLL per
arm and level, and per-window paired differences to `reuse` with 95 % bootstrap intervals. Writes <out>.json/.md.
"""
import argparse
import copy
import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import prepare  # noqa: E402
from checkpoint import mc_model  # noqa: E402
from long_history import write_results  # noqa: E402
from longctx import bootstrap  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from stages import deep_dnll  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402

LEVELS = (1, 2, 3)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", required=True, help="gist-stage checkpoint with one GistNet per level")
    p.add_argument("--shared", default=None, help="gist-stage checkpoint with gist_shared=True (same base)")
    p.add_argument("--data-dir", required=True, help="prepared data (the checkpoints' tokenizer)")
    p.add_argument("--split-name", default="val", choices=["val", "test"])
    p.add_argument("--cursor", type=int, default=1024, help="history tokens before the scored ones (c)")
    p.add_argument("--horizon", type=int, default=64, help="H: scored tokens, and raw tokens before them (W0)")
    p.add_argument("--windows", type=int, default=64, help="held-out windows")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "gist_depth_cpu"))
    return p.parse_args(argv)


def load_mc(path):
    ckpt = load_checkpoint(path)
    if "gistnet" not in ckpt:
        fail(f"{path} has no trained GistNet (a gist-stage checkpoint is needed)")
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    return mc_model(ckpt, types.SimpleNamespace(block=None, budget=None, recent=None, policy=None), gpt.eval())


def windows(data_dir, split, T, n):
    """n windows of T + 1 tokens, evenly spread over the documents of the split that hold one."""
    tokens, offsets = prepare.load_split(data_dir, split)
    starts = [s for a, b in zip(offsets[:-1], offsets[1:]) for s in range(int(a), int(b) - T - 1, T + 1)]
    if len(starts) < n:
        fail(f"only {len(starts)} windows of {T + 1} tokens in {data_dir}/{split}; lower --windows or --cursor")
    pick = np.linspace(0, len(starts) - 1, n).round().astype(int)
    return [torch.from_numpy(tokens[starts[i]:starts[i] + T + 1].astype(np.int64)) for i in pick]


@torch.no_grad()
def main(argv):
    args = parse_args(argv)
    split = load_mc(args.split)
    K, H = split.cfg.K, args.horizon
    if args.cursor - H < K**3:
        fail(f"--cursor {args.cursor} leaves {args.cursor - H} tokens before the raw window: LOD3 needs {K**3}")
    lod1 = copy.deepcopy(split)
    lod1.gistnet.levels.append(lod1.gistnet.levels[0])  # a third weight set: LOD3 by the LOD1 weights
    arms = {"reuse": (split, "gist"), "reuse-lod1": (lod1, "gist"), "mean": (split, "mean")}
    if args.shared:
        arms["shared"] = (load_mc(args.shared), "gist")
    cfg = types.SimpleNamespace(horizon=H)
    wins = windows(args.data_dir, args.split_name, args.cursor + H - 1, args.windows)
    per = {arm: {lvl: [] for lvl in LEVELS} for arm in arms}  # per-window dNLL (mean over the H tokens)
    for w in wins:
        x, y = w[None, :-1], w[None, 1:]
        for arm, (mc, pool) in arms.items():
            out = deep_dnll(mc, x, y, cfg, LEVELS, pool)
            for lvl in LEVELS:
                s, n = out[f"dnll_lod{lvl}_{pool}"]
                per[arm][lvl].append(s / n)
    result = dict(command="python bench/gist_depth.py " + " ".join(argv), K=K, horizon=H, cursor=args.cursor,
                  windows=len(wins), gist_levels_trained=split.cfg.gist_levels, arms={}, diff_to_reuse={})
    for arm in arms:
        result["arms"][arm] = {lvl: dict(mean=float(np.mean(v)), ci=bootstrap(v)[1:]) for lvl, v in per[arm].items()}
        if arm != "reuse":
            result["diff_to_reuse"][arm] = {
                lvl: dict(mean=float(np.mean(d)), ci=bootstrap(d)[1:])
                for lvl in LEVELS for d in [np.array(per[arm][lvl]) - np.array(per["reuse"][lvl])]}
    lines = [f"# GistNet beyond the trained levels (K = {K}, H = {H}, cursor {args.cursor}, {len(wins)} windows)", "",
             f"`{result['command']}`", "", "dNLL@H vs all tokens raw (nats/token), mean [95 % bootstrap CI]:", "",
             "| arm | " + " | ".join(f"LOD{lvl}" for lvl in LEVELS) + " |", "|---|" + "---|" * len(LEVELS)]
    fmt = lambda r: f"{r['mean']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"  # noqa: E731
    for arm, row in result["arms"].items():
        lines.append(f"| {arm} | " + " | ".join(fmt(row[lvl]) for lvl in LEVELS) + " |")
    lines += ["", "Paired difference to `reuse` (arm - reuse; < 0: the arm's gists cost less):", "",
              "| arm | " + " | ".join(f"LOD{lvl}" for lvl in LEVELS) + " |", "|---|" + "---|" * len(LEVELS)]
    for arm, row in result["diff_to_reuse"].items():
        lines.append(f"| {arm} | " + " | ".join(fmt(row[lvl]) for lvl in LEVELS) + " |")
    write_results(args.out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
