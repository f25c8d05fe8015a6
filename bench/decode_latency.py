"""Decode latency per token vs history length: a MegaContext session at a fixed budget against the base model
decoding a plain window of the same number of entries (DESIGN §10, issue 4).

    python bench/decode_latency.py --quick                                  # CPU, configs/tiny.py: a few minutes
    python bench/decode_latency.py configs/small.py --device cuda           # one GPU (H100 figures)

For each history length (ascending; the session grows from one to the next) the session ingests random tokens
(untrained GistNet/LensNet: the cost is the same as trained ones), and from --disk-from tokens on the tree is saved
and the session reopened from disk (memory-mapped), so the long lengths run with the history on disk. Then it
decodes --decode tokens (after --warmup), refocusing every K tokens; every step is timed, refocus, re-prefill after
edits and gist making included. The baseline is the base GPT with a KV cache decoding the same number of tokens over
a window as large as the working context. Overhead = mean MegaContext latency / mean baseline latency - 1.
Memory: the KV cache and working context are fixed by the budget; the tree's RAM tail, its size on disk and the
process peak RSS (CPU) or peak allocated GPU memory are reported per length. Writes bench/results/*.json.
"""
import argparse
import dataclasses
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import kernels  # noqa: E402
from configs import load_config  # noqa: E402
from megacontext import MegaContextConfig, MegaContextModel  # noqa: E402
from model import GPT, sample_next  # noqa: E402
from session import Session  # noqa: E402
from train import TrainConfig  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/tiny.py", help="train.py config giving the model shape")
    p.add_argument("--quick", action="store_true", help="lengths 1k, 16k, 128k, 1M and 48 decoded tokens each")
    p.add_argument("--lengths", default="1024,4096,16384,65536,262144,1048576", help="history lengths, tokens")
    p.add_argument("--budget", type=int, default=2048, help="working-context entries (w_max)")
    p.add_argument("--block", type=int, default=32, help="K")
    p.add_argument("--recent", type=int, default=64, help="protected tail, tokens")
    p.add_argument("--policy", default="lens", choices=["lens", "recency"])
    p.add_argument("--vocab", type=int, default=16384, help="vocabulary size (the prepared BPE's)")
    p.add_argument("--decode", type=int, default=128, help="timed decode steps per length")
    p.add_argument("--warmup", type=int, default=32, help="untimed decode steps before them")
    p.add_argument("--disk-from", type=int, default=65536, help="from this length on, the tree lives on disk")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.decode, args.warmup = "1024,16384,131072,1048576", 48, 16
    args.lengths = sorted(int(x) for x in args.lengths.split(","))
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda -> a torch.device (auto: CUDA when there is one)."""
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def timed(device, fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds), synchronising the device around it."""
    sync(device)
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - t


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB (Linux)."""
    now = 0.0
    try:
        with open("/proc/self/status") as f:
            now = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        pass
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def baseline(gpt, window: int, n: int, warmup: int, start: int, device) -> list[float]:
    """Per-token latencies of the base model decoding n tokens over a KV cache prefilled to window - n - warmup."""
    cache = gpt.make_cache(1, window)
    prefill = torch.randint(0, gpt.config.vocab_size, (1, window - n - warmup), device=device)
    logits, _ = gpt(prefill, mu=torch.arange(start, start + prefill.shape[1], device=device), cache=cache)
    times = []
    for i in range(warmup + n):
        nxt = sample_next(logits[:, -1], 0.0)
        pos = torch.tensor([start + cache.length], device=device)
        (logits, _), dt = timed(device, gpt, nxt[:, None], mu=pos, cache=cache)
        if i >= warmup:
            times.append(dt)
    return times


def disk_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) if path else 0


def main(argv):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    tcfg = load_config(TrainConfig, [args.config])
    torch.manual_seed(0)
    gpt = GPT(tcfg.gpt_config(args.vocab)).to(device).eval()
    if device.type == "cuda":
        gpt = gpt.to(torch.bfloat16)
    mcfg = MegaContextConfig(block_k=args.block, w_max=args.budget, recent_tokens=args.recent, policy=args.policy,
                             lens_width=min(256, gpt.config.n_embd))  # LensNet no wider than the model it serves
    model = MegaContextModel(gpt, mcfg).to(device).eval()
    session, tmp = Session(model), tempfile.TemporaryDirectory()
    tree_dir, rng, rows = None, np.random.default_rng(0), []
    print(kernels.banner(), file=sys.stderr)
    for L in args.lengths:
        t0, have = time.perf_counter(), len(session.tree)
        for i in range(have, L, 65536):
            session.ingest(rng.integers(0, args.vocab, min(65536, L - i)))
        sync(device)
        ingest_s = time.perf_counter() - t0
        if L >= args.disk_from:  # the long histories run memory-mapped from disk
            tree_dir = tree_dir or os.path.join(tmp.name, "tree")
            session.save(tree_dir)
            session = Session.open(model, tree_dir)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times, refocus_s, forwarded, entries = [], 0.0, 0, []
        for i in range(args.warmup + args.decode):
            before, dt_refocus = session.forwarded, 0.0
            if session.pending >= mcfg.refocus_tokens:  # what step() would do first, timed on its own
                _, dt_refocus = timed(device, session.refocus)
            _, dt = timed(device, session.step, 0.0)  # greedy, like the baseline
            if i >= args.warmup:
                times.append(dt + dt_refocus)
                refocus_s += dt_refocus
                entries.append(len(session.wc))
                forwarded += session.forwarded - before
        window = max(2 * (args.decode + args.warmup), round(statistics.mean(entries)))
        base = baseline(gpt, window, args.decode, args.warmup, L, device)
        mc_ms, base_ms = 1e3 * statistics.mean(times), 1e3 * statistics.mean(base)
        tel = session.alloc.summary()
        row = dict(history=len(session.tree), entries=round(statistics.mean(entries), 1), window=window,
                   mc_ms_mean=mc_ms, mc_ms_p50=1e3 * statistics.median(times),
                   mc_ms_p90=1e3 * float(np.percentile(times, 90)), base_ms_mean=base_ms,
                   base_ms_p50=1e3 * statistics.median(base), overhead=mc_ms / base_ms - 1,
                   refocus_ms_per_token=1e3 * refocus_s / args.decode, forwarded_per_token=forwarded / args.decode,
                   swap_rate=tel["swap_rate"],
                   ingest_tok_per_s=(L - have) / ingest_s if L > have else None, on_disk=tree_dir is not None,
                   kv_cache_mb=2 * session.cache.k.numel() * session.cache.k.element_size() / 2**20,
                   tree_ram_mb=sum(lv.ram.nbytes for lv in session.tree.levels) / 2**20,
                   tree_disk_mb=disk_bytes(tree_dir) / 2**20, rss_mb=rss_mb()[0], peak_rss_mb=rss_mb()[1],
                   gpu_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None)
        rows.append(row)
        print(f"history {row['history']:>9,}: mc {mc_ms:7.2f} ms/token (p50 {row['mc_ms_p50']:.2f}) vs base "
              f"{base_ms:6.2f} over {window} entries: overhead {100 * row['overhead']:+6.1f}%", file=sys.stderr)
    tmp.cleanup()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    result = dict(device=name, threads=torch.get_num_threads(), torch=torch.__version__,
                  triton=getattr(kernels._util.triton, "__version__", None), kernels=kernels.backend(),
                  date=datetime.date.today().isoformat(), commit=commit.strip(), dirty=bool(dirty.strip()),
                  command="python bench/decode_latency.py " + " ".join(argv), model=dataclasses.asdict(gpt.config),
                  megacontext=dataclasses.asdict(mcfg), decode=args.decode, warmup=args.warmup, results=rows)
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    config = os.path.splitext(os.path.basename(args.config))[0]
    tag = f"{config}_{args.policy}_{name.replace(' ', '_')}_{result['date']}_{result['commit']}"
    path = os.path.join(REPO, "bench", "results", f"decode_latency_{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{'history':>10} {'entries':>8} {'mc ms':>7} {'p50':>6} {'base ms':>8} {'overhead':>9} {'refocus':>8} "
          f"{'fwd/tok':>8} {'KV MB':>6} {'tree RAM':>9} {'disk MB':>8} {'RSS MB':>7}")
    for r in rows:
        print(f"{r['history']:>10,} {r['entries']:>8} {r['mc_ms_mean']:>7.2f} {r['mc_ms_p50']:>6.2f} "
              f"{r['base_ms_mean']:>8.2f} {100 * r['overhead']:>8.1f}% {r['refocus_ms_per_token']:>8.2f} "
              f"{r['forwarded_per_token']:>8.1f} {r['kv_cache_mb']:>6.1f} {r['tree_ram_mb']:>9.1f} "
              f"{r['tree_disk_mb']:>8.1f} {r['rss_mb']:>7.0f}")
    print(f"wrote {os.path.relpath(path, REPO)}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
