"""MegaPrediction on the CPU demo's model (issue 19): train the gist-prediction heads (predict.py) in their own stage,
base and GistNet frozen, and measure them on held-out book text.

    python bench/megaprediction.py --ckpt out/mc_demo/lens_oracle/ckpt.pt --train-windows 1024 --steps 600 \
        --threads 2 --save-heads out/megaprediction_heads.pt      # bench/results/megaprediction_cpu, 1.5 min, 2 cores

Windows of --window tokens (a multiple of K², inside one book) come from the train split (the heads' training data)
and the val split (the figures). The base's final states are computed once (no_grad: the base is frozen, so the
token NLL is unchanged, dnll_tok = 0 by construction; the joint-with-LoRA variant, where it is not, is not built
yet); targets are the frozen GistNet's LOD1 and LOD2 gists of the next block (predict.pairs). The heads train with
L = alpha1 (1 - cos) at LOD1 + alpha2 (1 - cos) at LOD2 (Adam, --batch random pairs per step), the cosines taken
around each level's mean training gist (--center 1; the prediction is then that mean plus the predicted direction at
the mean residual length; also reported at the least-squares length, which shrinks it toward the mean). Reported per
level: mean cos(g_pred, g_true) of the trained heads, of the untrained ones (the tied head's own input), and of two
baselines (the last complete block's gist; the mean training gist); speculative acceptance (the true next block the
nearest to the prediction among itself and 7 other blocks of the same window; chance 1/8).
Writes <out>.json (summary = {"cos": {"lod1", "lod2"}, "baseline_cos": {"lod1", "lod2"} (the better baseline),
"acceptance", "dnll_tok"}) and <out>.md.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [REPO, HERE]

import longctx  # noqa: E402
import predict  # noqa: E402
import prepare  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from train import fail, load_checkpoint  # noqa: E402


def windows(data_dir, split, n: int, T: int, rng) -> torch.Tensor:
    """n windows (n, T) of token ids, each inside one document (no <|bos|>), at random offsets."""
    tokens, offsets = prepare.load_split(data_dir, split)
    docs = [(a, b) for a, b in zip(offsets[:-1], offsets[1:]) if b - a > T + 1]
    out = []
    for _ in range(n):
        a, b = docs[rng.integers(len(docs))]
        s = int(rng.integers(a + 1, b - T))  # + 1: past the document's <|bos|>
        out.append(np.asarray(tokens[s:s + T], dtype=np.int64))
    return torch.from_numpy(np.stack(out))


@torch.no_grad()
def features(mc, ids, K: int, batch: int = 8):
    """(final states (n, T, d), [LOD1 gists (n, T/K, d), LOD2 gists (n, T/K², d)]) of windows ids (n, T)."""
    hs, g1, g2 = [], [], []
    for i in range(0, len(ids), batch):
        x = ids[i:i + batch]
        hs.append(predict.final_states(mc.gpt, x).float())
        a, b = predict.block_gists(mc.make_gists, mc.embed_tokens(x), K)
        g1.append(a.float())
        g2.append(b.float())
    return torch.cat(hs), [torch.cat(g1), torch.cat(g2)]


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint with trained GistNet weights")
    p.add_argument("--data-dir", default="data/pg1k")
    p.add_argument("--window", type=int, default=512, help="tokens per window (a multiple of K²)")
    p.add_argument("--train-windows", type=int, default=256)
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--steps", type=int, default=400, help="Adam steps on the heads")
    p.add_argument("--batch", type=int, default=4096, help="pairs per step, drawn at random (0: every pair each step)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--alphas", default="0.05,0.03", help="alpha1,alpha2: the levels' loss weights")
    p.add_argument("--center", type=int, default=1, help="1: the loss's cosine is taken around the mean training "
                   "gist of each level (predict.loss), 0: around 0")
    p.add_argument("--save-heads", default="", help="write the trained heads here (sample.py --mc --show-plan)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "megaprediction_cpu"))
    a = p.parse_args(argv)
    git = lambda *c: subprocess.run(["git", *c], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa
    commit, dirty = git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain"))
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    ckpt = load_checkpoint(a.ckpt)
    if "gistnet" not in ckpt:
        fail(f"{a.ckpt} has no trained GistNet: the heads' targets would be an untrained net's")
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    gpt.load_state_dict(ckpt["model"])
    gpt.eval()
    mc = longctx.session_model(ckpt, gpt, "lens", ckpt["mc_config"]["w_max"], ckpt["mc_config"]["block_k"],
                               ckpt["mc_config"]["recent_tokens"])
    K, T = mc.cfg.K, a.window
    if T % K**2 or T // K**2 < 8:
        fail(f"--window {T} must be a multiple of K² = {K**2} holding >= 8 LOD2 blocks (acceptance draws 7 others)")
    if a.batch < 0:
        fail(f"--batch {a.batch}: pairs per step must be >= 1, or 0 for every pair each step")
    alphas = [float(v) for v in a.alphas.split(",")]
    t0 = time.perf_counter()
    h_tr, g_tr = features(mc, windows(a.data_dir, "train", a.train_windows, T, rng), K)
    h_va, g_va = features(mc, windows(a.data_dir, "val", a.val_windows, T, rng), K)
    feat_s = time.perf_counter() - t0
    tr = [predict.pairs(h_tr, g_tr[l], K, l + 1) for l in range(2)]
    va = [predict.pairs(h_va, g_va[l], K, l + 1) for l in range(2)]
    centers = [tr[l][1].mean(0) for l in range(2)] if a.center else None
    heads = predict.GistPredictor(gpt.config.n_embd)
    opt = torch.optim.Adam(heads.parameters(), lr=a.lr)
    t0, log = time.perf_counter(), []
    for step in range(a.steps + 1):
        with torch.no_grad():
            if step % 100 == 0 or step == a.steps:
                out = [heads(va[l][0])[:, l] for l in range(2)]
                log.append(dict(step=step, val_loss=float(predict.loss(out, [v[1] for v in va], alphas, centers)),
                                **{f"cos_lod{l + 1}": float(predict.cos(out[l], va[l][1]).mean()) for l in range(2)}))
                print(json.dumps(log[-1]), file=sys.stderr, flush=True)
        if step == a.steps:
            break
        rows = [torch.randint(len(v[0]), (a.batch,)) if a.batch else slice(None) for v in tr]
        loss = predict.loss([heads(v[0][r])[:, l] for l, (v, r) in enumerate(zip(tr, rows))],
                            [v[1][r] for v, r in zip(tr, rows)], alphas, centers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0

    gen = torch.Generator().manual_seed(a.seed)
    levels, rho, rho_fit = {}, None, None
    with torch.no_grad():
        if centers:  # the distance from the centre along the predicted direction (predict.as_gist): the training
            # gists' mean one, and the least-squares one on the training pairs (the truth's mean projection on the
            # direction: it shrinks toward the mean gist as far as the direction is uncertain)
            resid = [tr[l][1] - centers[l] for l in range(2)]
            unit = [F.normalize(heads(tr[l][0])[:, l] - centers[l], dim=-1) for l in range(2)]
            rho = [r.norm(dim=-1).mean() for r in resid]
            rho_fit = [(u * r).sum(-1).mean() for u, r in zip(unit, resid)]
        untrained = predict.GistPredictor(gpt.config.n_embd)
        for l in range(2):
            h, target, prev, win, j = va[l]
            out = heads(h)[:, l]
            pred = predict.as_gist(out, centers[l], rho[l]) if centers else out
            fit = predict.as_gist(out, centers[l], rho_fit[l]) if centers else out
            mean = tr[l][1].mean(0, keepdim=True)
            levels[f"lod{l + 1}"] = dict(
                pairs=len(h), cos=float(predict.cos(pred, target).mean()),
                cos_fit=float(predict.cos(fit, target).mean()),
                length=float(rho[l]) if rho else None, length_fit=float(rho_fit[l]) if rho_fit else None,
                cos_untrained=float(predict.cos(untrained(h)[:, l], target).mean()),
                cos_last_block=float(predict.cos(prev, target).mean()),
                cos_mean_gist=float(predict.cos(mean.expand_as(target), target).mean()),
                acceptance=predict.acceptance(pred, g_va[l], win, j, 7, gen),
                acceptance_fit=predict.acceptance(fit, g_va[l], win, j, 7, gen),
                acceptance_last_block=predict.acceptance(prev, g_va[l], win, j, 7, gen))
    if a.save_heads:  # the heads, the centres and lengths that turn their output into a gist, and what they fit
        if centers:  # (also in the heads' buffers: GistPredictor.gist, and a checkpoint that holds them)
            heads.center.copy_(torch.stack(centers))
            heads.rho.copy_(torch.stack(rho))
        os.makedirs(os.path.dirname(os.path.abspath(a.save_heads)), exist_ok=True)
        torch.save(dict(heads=heads.state_dict(), centers=centers, rho=rho, n_embd=gpt.config.n_embd, K=K,
                        identity=mc.identity()), a.save_heads)
    base = {k: max(v["cos_last_block"], v["cos_mean_gist"]) for k, v in levels.items()}
    result = dict(summary=dict(cos={k: v["cos"] for k, v in levels.items()}, baseline_cos=base,
                               acceptance=levels["lod1"]["acceptance"], dnll_tok=0.0),
                  levels=levels, log=log, alphas=alphas, center=bool(a.center), window=T, K=K,
                  train_windows=a.train_windows, val_windows=a.val_windows, steps=a.steps, batch=a.batch, lr=a.lr,
                  features_s=feat_s,
                  train_s=train_s,
                  dnll_tok_note="own stage, base frozen: the token NLL is unchanged by construction",
                  device=f"cpu ({platform.machine()}, {os.cpu_count()} cores, shared)", threads=a.threads,
                  torch=torch.__version__,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=commit, dirty=dirty, command="python bench/megaprediction.py " + " ".join(argv),
                  checkpoint=a.ckpt)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(f"{a.out}.json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# MegaPrediction heads (CPU, {result['date']}, {commit})", "", f"`{result['command']}` — torch "
             f"{result['torch']}; heads trained {a.steps} Adam steps of {a.batch or 'all'} pairs on {a.train_windows} "
             f"train windows of {T} tokens (base and GistNet frozen), measured on {a.val_windows} val windows; alphas "
             f"{alphas}, loss centred on the mean gist: {bool(a.center)}.", "",
             "| level | pairs | cos trained | cos untrained (tied head's input) | cos last block | cos mean gist | "
             "acceptance (chance 0.125) | acceptance of the last block | cos, acceptance at the fitted length |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, v in levels.items():
        lines.append(f"| {k} | {v['pairs']} | {v['cos']:.3f} | {v['cos_untrained']:.3f} | {v['cos_last_block']:.3f}"
                     f" | {v['cos_mean_gist']:.3f} | {v['acceptance']:.3f} | {v['acceptance_last_block']:.3f} | "
                     f"{v['cos_fit']:.3f}, {v['acceptance_fit']:.3f} |")
    lines += ["", "dnll_tok = 0: " + result["dnll_tok_note"] + ".", "", "The prediction is the centre plus the "
              "heads' direction at the training gists' mean distance from it (the summary's figures); the last "
              "column puts it at the least-squares distance on the training pairs instead, which shrinks it toward "
              "the mean gist as far as the direction is uncertain (a better point estimate, a worse ranking)."]
    with open(f"{a.out}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
