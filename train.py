"""Train MegaContext models. One script for every stage; the stage and everything else come from config files.

    python train.py configs/tiny.py                                   # CPU, ~1 minute
    python train.py configs/small.py --max_iters=2000 --lr=1e-3       # one GPU; later --key=value override files
    torchrun --standalone --nproc_per_node=8 train.py configs/medium.py
    torchrun --nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --nproc_per_node=8 \
        train.py configs/medium.py                                    # multi-node: torchrun's own rendezvous

Stages: `base` pretrains the GPT on the book corpus, position-ready (DESIGN §3): each sequence is cut into chunks whose
positions are shifted by random gaps (PoSE), so relative distances up to `max_position` are trained at the cost of
`block_size`. The MegaContext stages start from a base checkpoint (`base_ckpt`); their losses live in stages.py:

    python train.py configs/tiny.py --out_dir=out/base                                     # base
    python train.py configs/tiny_gist.py --base_ckpt=out/base/ckpt.pt --out_dir=out/gist   # gist (JT1)
    python train.py configs/tiny_lens.py --base_ckpt=out/base/ckpt.pt --gist_ckpt=out/gist/ckpt.pt \
        --out_dir=out/lens                                                                 # lens (JT2)
    python train.py configs/tiny_lora.py --base_ckpt=out/base/ckpt.pt --gist_ckpt=out/lens/ckpt.pt \
        --out_dir=out/lora                                                                 # lora (JT3)
    python train.py configs/tiny_predict.py --base_ckpt=out/base/ckpt.pt --gist_ckpt=out/gist/ckpt.pt \
        --out_dir=out/predict                                          # MegaPrediction heads (sample.py --show-plan)

DDP wraps the one MegaContext root (stages.StageModel holds MegaContextModel and computes the stage's loss); each
stage trains only its parameters (stages.TRAINED). MC checkpoints add `mc_config`, `gistnet`, `lensnet`, `lora` and
`predictor`, so sample.py --mc and the next stage read them; `model` holds the GPT with its adapters (model_args has
lora_rank).

`grad_accum` is the number of micro-batches in one optimizer step summed over all ranks, so one GPU reproduces an
8-GPU run's global batch with the same config. Checkpoints (out_dir/ckpt.pt) are written atomically and resume is
exact: the batch of step s depends only on (seed, s), and model, optimizer and RNG state are saved.
"""
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import durable
import kernels
import predict
import prepare
import retrieval
from configs import ConfigError, load_config
import stages
from megacontext import MegaContextConfig, MegaContextModel
from model import GPT, GPTConfig

REPO = os.path.dirname(os.path.abspath(__file__))
STAGES = ("base", "gist", "lens", "lora", "predict", "alt")  # the MegaContext stages' losses live in stages.py
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 spec peaks, for MFU


@dataclass(frozen=True)
class TrainConfig:
    # run
    out_dir: str = "out/run"  # checkpoint, config.json and log.jsonl go here
    stage: str = "base"  # training stage, one of STAGES
    init_from: str = "scratch"  # 'scratch' (refuses to overwrite an existing checkpoint) or 'resume'
    seed: int = 1337  # base seed; rank r uses seed + r
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda'
    dtype: str = "auto"  # 'auto' (bf16 autocast on CUDA, fp32 on CPU) | 'bfloat16' | 'float32'
    compile: bool = False  # torch.compile the model
    # data
    data_dir: str = "data/pg"  # output of prepare.py: tokenizer.json, {train,val}.bin, meta.json
    # retrieval training mix (retrieval.py; issue 9): copying first, then drills, short windows first
    retrieval_mix: float = 0.0  # share of training windows that are retrieval drills (needles, questions, answers)
    retrieval_tasks: str = "passkey,multikey"  # drill tasks (retrieval.TASKS), comma-separated, drawn uniformly
    retrieval_needles: int = 3  # look-alike kv needles per drill window, besides the asked tasks' own needles
    retrieval_questions: int = 2  # task instances (each asked once) per drill window
    retrieval_weight: float = 5.0  # loss weight of the answer tokens (and of copied spans)
    copy_steps: int = 0  # the first steps copy random spans to later places, no PoSE gaps (the induction head forms)
    short_block: int = 0  # the first short_steps steps use windows of this many tokens (same tokens per step); 0 = off
    short_steps: int = 0  # steps at short_block
    retrieval_gaps: float = 0.0  # after short_steps, the share of drills whose questions sit after a PoSE gap (copying
    # across any distance then pays, which moves it to the position-free heads; all drills at once stopped retrieval)
    # model (mirrors GPTConfig)
    block_size: int = 1024  # training sequence length in tokens
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads
    n_embd: int = 384  # model width
    mlp: str = "swiglu"  # 'swiglu' | 'gelu'
    qk_norm: bool = True  # RMSNorm q and k per head
    tie_embeddings: bool = True  # share the token embedding with the output head
    rope_base: float = 10000.0  # rotary base
    rope_heads: int = 0  # heads with (Gaussian) RoPE; the rest are position-free (NoPE: content match at any distance)
    rope_bands: int = 0  # bands that rotate per RoPE head (the fastest); the rest are position-free (p-RoPE); 0 = all
    rope_layers: int = 0  # the first blocks have RoPE heads, the later ones none (position-free); 0 = every block
    attn: str = "sdpa"  # 'sdpa' (RoPE kernel + SDPA) | 'lod' (pyramidal attention kernel, causal, RoPE fused)
    dropout: float = 0.0  # dropout on embeddings
    # position-ready training (PoSE, DESIGN §3)
    pose: bool = True  # shift chunks of each sequence by random position gaps
    pose_prob: float = 0.75  # share of sequences that get gaps; the rest keep consecutive positions
    pose_chunks: int = 3  # chunks per gapped sequence
    max_position: int = 2**20  # largest position a gapped sequence reaches (relative distances trained up to this)
    # optimisation
    batch_size: int = 16  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step, over all ranks together
    max_iters: int = 2000  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # final learning rate
    warmup_iters: int = 100  # linear warmup steps
    schedule: str = "cosine"  # 'cosine' | 'wsd' (warmup-stable-decay, last `decay_frac` of steps decay linearly)
    decay_frac: float = 0.2  # WSD: share of steps in the final decay
    weight_decay: float = 0.1  # AdamW decay on matrices
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables
    # eval, logging, checkpoints
    eval_interval: int = 250  # steps between val evals (and checkpoints)
    eval_iters: int = 20  # val micro-batches per eval, per rank
    eval_gap: int = 10**6  # also score each val window's second half after this position gap (0 = off)
    log_interval: int = 10  # steps between progress lines
    save_checkpoint: bool = True  # write out_dir/ckpt.pt at each eval and at the end
    wandb: str = "off"  # 'off' | 'offline' | 'online' (needs the wandb package; no network here)
    wandb_project: str = "megacontext"  # wandb project name
    # MegaContext stages (mirrors the MegaContextConfig fields they need; DESIGN §2-§5)
    base_ckpt: str = ""  # base-stage checkpoint the MC stages start from (its GPT is frozen, shape from its model_args)
    gist_ckpt: str = ""  # checkpoint whose GistNet (and LensNet, if any) lens/lora start from; '' = base_ckpt's
    block_k: int = 32  # K: tokens per LOD1 gist, LOD1 gists per LOD2 gist
    w_max: int = 512  # working-context budget in entries (lens, lora)
    recent_tokens: int = 64  # protected tail: the newest tokens stay raw
    rope: str = "gaussian"  # gist positions: 'gaussian' | 'rope' (sigma = 0) | 'gaussian_learned'
    horizon: int = 64  # H: tokens after the working context whose NLL is scored (dNLL@H, lens labels, lora task)
    gist_layers: int = 2  # GistNet blocks per level
    gist_heads: int = 4  # GistNet heads (divide n_embd)
    gist_pool: str = "query"  # GistNet pooling: 'mean' | 'query' | 'cls'
    gist_proj: str = "mlp"  # GistNet projection: 'linear' | 'mlp'
    gist_shared: bool = False  # one GistNet for both levels
    gist_w0_max: int = 256  # gist: W0 (raw window, tokens) drawn uniformly from K, 2K, .. up to this per micro-batch
    gist_w1_max: int = 8  # gist: W1 (LOD1 window, blocks) drawn uniformly from 0..this (0 = LOD2 right after LOD0)
    lens_layers: int = 2  # LensNet blocks
    lens_width: int = 256  # LensNet width
    lens_heads: int = 4  # LensNet heads
    lens_queries: int = 4  # LensNet tail queries
    lens_tail: int = 32  # newest entries that seed the tail queries
    lens_preview: int = 1  # levels below each gist LensNet previews (K**lens_preview nodes per entry, max-pooled)
    lens_types: bool = False  # LensNet previews every token type of each gist's span instead (the same at any depth)
    lens_horizon: int = 0  # distances/spans beyond this many tokens look like this many to LensNet (0 = no cap)
    lens_query: str = ""  # LensNet reads the question: the base's states after these blocks (0 = embeddings): "1,4"
    lens_index_heads: int = 4  # LensNet's Indexer heads (lens_query)
    lens_index_dim: int = 32  # Indexer width per head
    lens_markers: int = 0  # top vocabulary ids that are markers (prepare.py: 8): previews mark the ids after one
    lens_margin: int = 0  # previews start this many tokens early, + the token after (a straddling needle shows twice)
    settle_edits: int = 16  # optional edits per step of a question's refocus-until-stable loop
    gist_predict: str = ""  # MegaPrediction heads in the model: '' | 'mlp' (trained by the predict stage)
    predict_heads: str = ""  # their weights, loaded frozen: a predict-stage checkpoint or a bench/megaprediction.py
    # --save-heads file, made for this base and GistNet
    predict_alphas: str = "0.05,0.03"  # predict: the LOD1 and LOD2 heads' loss weights
    lens_plan: bool = False  # LensNet's Indexer also reads the heads' predicted next gist (gist_predict, lens_query)
    lens_teacher: str = "counterfactual"  # lens labels: 'counterfactual' (NLL with each edit) | 'attention' (the base's
    # attention mass, + KL as DSA's indexer) | 'oracle' (imitation of the oracle's zoom path on drills; counterfactual
    # labels on book text, where the oracle has none)
    lens_retrieval: float = 0.67  # lens: share of contexts with a needle beyond the raw window, asked at the end
    lens_label_floor: float = 0.5  # lens: labels are nats / max(std over the context's candidates, this floor)
    lens_replay: int = 24  # lens: earlier labelled contexts learned from again each step, besides the fresh batch
    lens_buffer: int = 512  # lens: the newest labelled contexts kept for replay
    lens_rank_weight: float = 1.0  # lens: weight of the pairwise ranking term next to the regression
    lora_rank: int = 8  # lora: adapter rank (4-16)
    lora_layers: str = "all"  # lora: blocks with adapters, 'all' or comma-separated indices
    lora_alpha: float = 16.0  # lora: adapter scale alpha / rank
    keep_alive: float = 0.1  # lora: weight of the gist (substitutability) loss next to the task NLL
    alt_cycles: int = 3  # alt: at most this many gist -> lens -> lora cycles
    alt_gist_iters: int = 200  # alt: optimizer steps of each gist phase
    alt_lens_iters: int = 200  # alt: optimizer steps of each lens phase
    alt_lora_iters: int = 200  # alt: optimizer steps of each lora phase
    alt_min_delta: float = 0.005  # alt: stop when a cycle lowers the lora phase's val loss (NLL at budget) less

    def validate(self):
        """One-line ConfigError naming the key and its allowed values, for every field, before any work."""
        for key, allowed in RANGES.items():
            value = getattr(self, key)
            if not in_range(value, allowed):
                finite = "" if math.isfinite(value) or range_text(allowed) == "finite" else "a finite number "
                raise ConfigError(f"{key} must be {finite}{range_text(allowed)}, got {value}")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if not self.out_dir.strip():
            raise ConfigError("out_dir must name a folder, got ''")
        choices = dict(stage=STAGES, init_from=("scratch", "resume"), device=("auto", "cpu", "cuda"),
                       dtype=("auto", "bfloat16", "float32"), mlp=("swiglu", "gelu"), attn=("sdpa", "lod"),
                       lens_teacher=("counterfactual", "attention", "oracle"),
                       schedule=("cosine", "wsd"),
                       wandb=("off", "offline", "online"))
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
        tasks = [t for t in self.retrieval_tasks.split(",") if t]
        if not tasks or set(tasks) - set(retrieval.TASKS):
            raise ConfigError(f"retrieval_tasks must be a comma-separated list of {', '.join(retrieval.TASKS)}; "
                              f"got {self.retrieval_tasks!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even size")
        if self.pose and self.max_position < self.block_size:
            raise ConfigError(f"max_position={self.max_position} must be >= block_size={self.block_size}")
        if self.short_steps and not 0 < self.short_block <= self.block_size:
            raise ConfigError(f"short_block={self.short_block} must be in 1..block_size={self.block_size}")
        if self.rope_heads > self.n_head:
            raise ConfigError(f"rope_heads must be in [0, n_head={self.n_head}], got {self.rope_heads}")
        if self.rope_bands > self.n_embd // self.n_head // 2:
            raise ConfigError(f"rope_bands must be in [0, head_dim/2={self.n_embd // self.n_head // 2}], "
                              f"got {self.rope_bands}")
        if self.stage == "base":
            return
        if not self.base_ckpt:
            raise ConfigError(f"stage {self.stage!r} needs base_ckpt=<a base-stage checkpoint>")
        for key in ("base_ckpt", "gist_ckpt", "predict_heads"):
            if self.init_from == "scratch" and getattr(self, key) and not os.path.isfile(getattr(self, key)):
                raise ConfigError(f"{key} not found: {getattr(self, key)}")
        try:
            self.mc_config().validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 < self.horizon < self.block_size:
            raise ConfigError(f"horizon={self.horizon} must be in 1..block_size-1={self.block_size - 1}")
        if self.stage == "predict":
            K = self.block_k
            if not self.gist_predict:
                raise ConfigError("stage 'predict' trains the MegaPrediction heads: set gist_predict='mlp'")
            if self.block_size % K**2 or self.block_size // K < 8:
                raise ConfigError(f"predict: block_size={self.block_size} must be a multiple of K²={K**2} holding >= 8 "
                                  "LOD1 blocks (acceptance draws 7 others)")
            alphas = self.predict_alphas.split(",")
            if len(alphas) != 2 or not all(_nonneg_float(v) for v in alphas):
                raise ConfigError(f"predict_alphas must be two numbers >= 0 (LOD1,LOD2), got {self.predict_alphas!r}")
        if self.stage in ("lens", "lora", "alt") and self.block_size - self.horizon < self.w_max:
            raise ConfigError(f"the history (block_size - horizon = {self.block_size - self.horizon} tokens) fits "
                              f"the budget w_max={self.w_max} raw: nothing to expand or collapse; raise block_size")

    def mc_config(self) -> MegaContextConfig:
        names = {f.name for f in dataclasses.fields(MegaContextConfig)}
        return MegaContextConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        names = {f.name for f in dataclasses.fields(GPTConfig)} - {"lora_rank", "lora_layers", "lora_alpha"}
        return GPTConfig(vocab_size=vocab_size, **{k: v for k, v in dataclasses.asdict(self).items() if k in names})
        # (adapters are added by the lora stage only: build_mc)


# allowed values of every numeric field: "[a, b]" closed, "(a, b)" open, inf unbounded (STYLE: checked up front)
RANGES = dict(
    seed="[0, 1e7)", retrieval_mix="[0, 1]", retrieval_needles="[1, inf)", retrieval_questions="[1, inf)",
    retrieval_weight="(0, inf)", copy_steps="[0, inf)", short_block="[0, inf)", short_steps="[0, inf)",
    retrieval_gaps="[0, 1]", block_size="[1, inf)", n_layer="[1, inf)", n_head="[1, inf)", n_embd="[1, inf)",
    rope_base="(1, inf)", rope_heads="[0, inf)", rope_bands="[0, inf)", rope_layers="[0, inf)", dropout="[0, 1)",
    pose_prob="[0, 1]", pose_chunks="[1, inf)",
    max_position="[1, inf)", batch_size="[1, inf)", grad_accum="[1, inf)", max_iters="[1, inf)", lr="(0, inf)",
    min_lr="[0, inf)", warmup_iters="[0, inf)", decay_frac="[0, 1]", weight_decay="[0, inf)", beta1="[0, 1)",
    beta2="[0, 1)", grad_clip="[0, inf)", eval_interval="[1, inf)", eval_iters="[1, inf)", eval_gap="[0, inf)",
    log_interval="[1, inf)", block_k="[2, 64]", w_max="[1, inf)", recent_tokens="[0, inf)", horizon="[1, inf)",
    gist_layers="[1, inf)", gist_heads="[1, inf)", gist_w0_max="[1, inf)", gist_w1_max="[0, inf)",
    lens_layers="[1, inf)", lens_width="[1, inf)", lens_heads="[1, inf)", lens_queries="[1, inf)",
    lens_tail="[1, inf)", lens_preview="[1, 3]", lens_horizon="[0, inf)", lens_retrieval="[0, 1]",
    lens_index_heads="[1, inf)", lens_index_dim="[1, inf)", lens_markers="[0, inf)", lens_margin="[0, inf)",
    settle_edits="[0, inf)",
    lens_label_floor="(0, inf)", lens_replay="[0, inf)", lens_buffer="[1, inf)", lens_rank_weight="[0, inf)",
    lora_rank="[1, 64]", lora_alpha="(0, inf)", keep_alive="[0, inf)", alt_cycles="[1, inf)", alt_gist_iters="[1, inf)",
    alt_lens_iters="[1, inf)", alt_lora_iters="[1, inf)", alt_min_delta="(-inf, inf)")  # (< 0: never stop early)


def _nonneg_float(text: str) -> bool:
    try:
        return 0 <= float(text) < math.inf
    except ValueError:
        return False


def in_range(value, allowed: str) -> bool:
    lo, hi = (float(v) for v in allowed[1:-1].split(", "))
    return (lo <= value if allowed[0] == "[" else lo < value) and (value <= hi if allowed[-1] == "]" else value < hi)


def range_text(allowed: str) -> str:
    """'[1, inf)' -> '>= 1'; '(0, inf)' -> '> 0'; bounded ranges stay as written."""
    lo, hi = allowed[1:-1].split(", ")
    if lo == "-inf":
        return "finite" if hi == "inf" else f"{'<=' if allowed[-1] == ']' else '<'} {hi}"
    return f"{'>=' if allowed[0] == '[' else '>'} {lo}" if hi == "inf" else f"in {allowed}"


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def fail(msg: str):
    """One line on stderr, non-zero exit: the contract for every bad input. Under torchrun rank 0 prints it: the other
    ranks, which see the same config and files, wait, and torchrun stops them once rank 0 has failed; only an error
    that is theirs alone is printed after the wait, by them."""
    rank = int(os.environ.get("RANK", 0))
    if rank:
        time.sleep(10)
    print(f"error: {msg}" + (f" (rank {rank})" if rank else ""), file=sys.stderr, flush=True)
    sys.exit(1)


def train_memory(cfg: TrainConfig, model_args: dict, dtype: str) -> tuple[int, int]:
    """A lower bound on the bytes of one training step: (weights + grads + AdamW state in fp32, the activations that
    one micro-batch keeps for backward). Activations count ~8 values per width unit per layer (norm, q/k/v, attention
    and MLP outputs) plus 2 per MLP hidden unit, and the logits with their fp32 softmax; the true peak is higher."""
    V, C, L = model_args["vocab_size"], model_args["n_embd"], model_args["n_layer"]
    B, T, swiglu = cfg.batch_size, cfg.block_size, model_args["mlp"] == "swiglu"
    hidden = int(8 * C / 3 / 64 + 0.999) * 64 if swiglu else 4 * C  # as model.MLP
    params = V * C * (1 if model_args["tie_embeddings"] else 2) + L * (4 * C * C + (3 if swiglu else 2) * C * hidden)
    act = 2 if dtype == "bfloat16" else 4  # bytes per activation
    return 16 * params, B * T * (L * (8 * C + 2 * hidden) * act + V * (act + 4))


def check_memory(cfg: TrainConfig, model_args: dict, dtype: str, device: torch.device):
    """Refuse, in one line and before allocating, a model and batch whose lower-bound footprint exceeds the memory
    there is: free GPU memory, or the RAM available to this machine's ranks."""
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        free, where = free // ranks, "of RAM available" + (f" per rank ({ranks} ranks)" if ranks > 1 else "")
    state, act = train_memory(cfg, model_args, dtype)
    gib = 2**30
    if state > free:  # no batch fits: lowering it (the fix below) would only waste the user's next try
        fail(f"a {model_args['n_layer']} x {model_args['n_embd']} model's weights and AdamW state alone need "
             f"{state / gib:.1f} GiB, more than the {free / gib:.1f} GiB {where}; use a smaller model (n_layer, "
             f"n_embd)")
    if state + act > free:
        fail(f"batch_size={cfg.batch_size} x block_size={cfg.block_size} on a {model_args['n_layer']} x "
             f"{model_args['n_embd']} model needs at least {(state + act) / gib:.1f} GiB ({state / gib:.1f} weights "
             f"and AdamW state, {act / gib:.1f} activations of one micro-batch), more than the {free / gib:.1f} GiB "
             f"{where}; lower batch_size (grad_accum keeps the tokens per step) or block_size")


def run_header(cfg) -> dict:
    """What makes a run reproducible: code version, library versions, hardware (STYLE 'Run evidence')."""
    def sh(*cmd):
        try:
            return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    head = {"git": sh("git", "rev-parse", "HEAD"), "git_status": sh("git", "status", "--porcelain"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(kernels._util.triton, "__version__", None), "numpy": np.__version__,
            "kernels": kernels.banner(), "nvidia_smi": sh("nvidia-smi") if torch.cuda.is_available() else "",
            "argv": sys.argv}
    return head


# ----------------------------------------------------------------------------------------------------------------
# data


def resolve_data_dir(path: str) -> str:
    """The prepared data dir (relative to the cwd, else to the repo). With the default data/pg missing, prepare.py's
    no-corpus fallback data/synthetic is used, loudly."""
    for candidate in (path, os.path.join(REPO, path)):
        if os.path.isdir(candidate):
            return candidate
    synthetic = os.path.join(REPO, "data", "synthetic")
    if path == TrainConfig.data_dir and os.path.isdir(synthetic):
        print0(f"!!!\n!!! WARNING: {path} not found: training on the SYNTHETIC corpus in {synthetic}\n!!!")
        return synthetic
    return path  # load_data reports it


def load_data(data_dir: str):
    """(train tokens, val tokens, meta) written by prepare.py: uint16 memmaps; one-line errors when missing/corrupt.
    The tokenizer is loaded (checksum-verified) too: sample.py reads the one this run's checkpoint points to (a
    random-id corpus of bench/train_throughput.py has none)."""
    try:
        meta = prepare.load_meta(data_dir)
        splits = [prepare.load_split(data_dir, split)[0] for split in ("train", "val")]
        n_vocab = meta["vocab_size"] if meta.get("random_ids") else prepare.load_tokenizer(data_dir).n_vocab
    except FileNotFoundError as e:
        fail(f"cannot read the prepared data in {data_dir!r} ({os.path.basename(e.filename or '?')} not found); "
             "run `python prepare.py` (or --synthetic) first")
    except (OSError, ValueError) as e:  # prepare's messages name the file and the fix
        fail(f"cannot read the prepared data in {data_dir!r}: {e}")
    if n_vocab != meta["vocab_size"]:
        fail(f"{data_dir}/tokenizer.json has {n_vocab} tokens but its meta.json says {meta['vocab_size']}; "
             "rerun prepare.py")
    return splits[0], splits[1], meta


def drill_tasks(cfg: TrainConfig) -> list[str]:
    return [t for t in cfg.retrieval_tasks.split(",") if t]


def pose_positions(B: int, T: int, gen: torch.Generator, cfg: TrainConfig, forced=None) -> torch.Tensor:
    """(B, T) int64 positions: consecutive, or cut into `pose_chunks` chunks separated by log-uniform gaps.

    Gaps are log-uniform in [1, (max_position - T) / (chunks - 1)], so every scale of relative distance up to
    max_position is trained equally often while attention costs stay those of T entries. forced[b], when not None,
    is a cut row b always gets (retrieval_gaps: a drill whose questions sit after a gap).
    """
    pos = torch.arange(T).repeat(B, 1)
    n_gaps = cfg.pose_chunks - 1
    if not cfg.pose or n_gaps < 1 or cfg.max_position <= T:
        return pos
    budget = (cfg.max_position - T) / n_gaps
    for b in range(B):
        cut = forced[b] if forced is not None else None
        if torch.rand((), generator=gen).item() >= cfg.pose_prob and cut is None:
            continue
        cuts = torch.randperm(T - 1, generator=gen)[:n_gaps] + 1  # chunk starts, in (0, T)
        if cut is not None:
            cuts[0] = cut
        gaps = torch.exp(torch.rand(n_gaps, generator=gen, dtype=torch.float64) * math.log(budget)).long()
        shift = torch.zeros(T, dtype=torch.long)
        shift[cuts] = gaps
        pos[b] += shift.cumsum(0)
    return pos


def window(cfg: TrainConfig, step: int | None) -> tuple[int, int]:
    """(sequence length, micro-batch size) at `step` (None: evaluation): in the base stage, short_block windows for
    the first short_steps steps, with the batch scaled so that every step trains on the same number of tokens."""
    if cfg.stage == "base" and step is not None and step < cfg.short_steps:
        return cfg.short_block, max(1, cfg.batch_size * cfg.block_size // cfg.short_block)
    return cfg.block_size, cfg.batch_size


def get_batch(tokens, cfg: TrainConfig, gen: torch.Generator, device, gaps: bool, step: int | None = None):
    """(x, y, mu, w): B random windows of T + 1 tokens (window(cfg, step)) with PoSE positions when `gaps`. With the
    retrieval mix (retrieval.py) a share of them become drills, or, in the first copy_steps steps, copied-span windows;
    w (B, T) holds the per-target loss weights then (0 where y is -1), else None."""
    T, B = window(cfg, step)
    if len(tokens) <= T + 1:
        fail(f"split has {len(tokens)} tokens, fewer than a window + 1 = {T + 1}")
    ix = torch.randint(len(tokens) - T - 1, (B,), generator=gen).tolist()
    xy = np.stack([tokens[i:i + T + 1].astype(np.int64) for i in ix])
    w, forced = None, [None] * B
    copying = cfg.stage == "base" and step is not None and step < cfg.copy_steps
    far = cfg.stage == "base" and step is not None and step >= cfg.short_steps  # drills may straddle a gap
    if (cfg.retrieval_mix > 0 or copying) and cfg.stage in ("base", "gist"):  # the stages that train on the text
        rng = np.random.default_rng(int(torch.randint(2**62, (), generator=gen)))
        w = np.ones_like(xy, dtype=np.float32)
        for b in range(B):
            if copying:
                w[b] = retrieval.copy_spans(xy[b], rng, cfg.retrieval_weight)
            elif rng.random() < cfg.retrieval_mix:
                w[b], q_start = retrieval.plant_drills(xy[b], rng, retrieval.needles_for(cfg.data_dir),
                                                       drill_tasks(cfg), cfg.retrieval_questions,
                                                       cfg.retrieval_needles, cfg.retrieval_weight)
                if far and rng.random() < cfg.retrieval_gaps:
                    forced[b] = q_start
        w = torch.from_numpy(w[:, 1:])
    xy = torch.from_numpy(xy)
    x, y = xy[:, :-1], xy[:, 1:].clone()
    if w is not None:
        y[w == 0] = -1
    mu = pose_positions(B, T, gen, cfg, forced) if gaps else torch.arange(T).repeat(B, 1)
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in (x, y, mu, w))


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The batch of (step, global micro-step) depends on nothing else: the data position is the step, and rank r's
    micro-step m is global micro-step r * accum + m, so any world size sees the same global batch."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + micro)


# ----------------------------------------------------------------------------------------------------------------
# optimisation, checkpoints


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_iters * (1 - cfg.decay_frac))
        frac = max(0.0, (step - decay_start) / max(1, cfg.max_iters - decay_start))
        return cfg.lr + frac * (cfg.min_lr - cfg.lr)
    frac = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def load_checkpoint(path: str) -> dict:
    try:
        return checkpoint.read(path)
    except checkpoint.CheckpointError as e:
        fail(str(e))


def resume_log(path: str, step: int, cfg: TrainConfig):
    """The run log cut back to what the checkpoint at `step` covers, so that it reads as one run: its one header and
    the records up to `step` (a killed run's later records, torn lines and the headers older versions wrote on every
    resume are dropped), rewritten atomically, then a `resumed` record (config changes, code and library versions).
    Returns the log open for appending."""
    kept, seen, header = [], set(), None
    if os.path.exists(path):
        with open(path, "rb") as f:  # bytes: a line of garbage (a torn write, a damaged disk) is skipped, not fatal
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:  # (UnicodeDecodeError is one)
                    continue  # torn by the kill
                if not isinstance(r, dict) or r.get("step", -1) > step or ("resumed" in r and r["step"] >= step):
                    continue
                kind = next((k for k in ("config", "run") if k in r), None)
                if kind in seen:
                    continue  # a second header
                if kind:
                    seen.add(kind)
                    header = r["config"] if kind == "config" else header
                kept.append(json.dumps(r) + "\n")
    now = dataclasses.asdict(cfg)
    if header is None:  # no log survived: start it here
        kept[:0] = [json.dumps({"config": now}) + "\n", json.dumps({"run": run_header(cfg)}) + "\n"]
        header = now
    changed = {k: [header.get(k), v] for k, v in now.items() if header.get(k) != v}
    kept.append(json.dumps({"step": step, "resumed": {"changed": changed, **run_header(cfg)}}) + "\n")
    data = "".join(kept).encode()
    write_or_fail(path, lambda f: f.write(data), len(data), "nothing was changed; free space, then resume")
    return open(path, "a")


def write_or_fail(path: str, write, nbytes: int, kept: str):
    """durable.write_atomic, or one line naming the file, the reason (a full disk) and what is still intact."""
    try:
        durable.write_atomic(path, write, nbytes, os.path.basename(path))
    except OSError as e:
        fail(f"cannot write {path} ({durable.reason(e)}); {kept}")


def start_log(path: str, cfg: TrainConfig):
    """A new run's log: config and run headers, written atomically. A log already there (no checkpoint beside it:
    a run killed before its first one, or one without checkpoints) is moved to log.jsonl.prev, so the new log reads
    as one run, with one header and its own steps. Returns the log open for appending."""
    if os.path.exists(path):
        os.replace(path, path + ".prev")
        print0(f"note: {path} was from an earlier run with no checkpoint to resume; moved to {path}.prev")
    data = (json.dumps({"config": dataclasses.asdict(cfg)}) + "\n" + json.dumps({"run": run_header(cfg)}) +
            "\n").encode()
    write_or_fail(path, lambda f: f.write(data), len(data), "nothing was written")
    return open(path, "a")


def check_same_shape(ckpt: dict, model_args: dict, path: str):
    saved = ckpt["model_args"]
    diff = [f"{k}={saved.get(k)!r} vs {v!r}" for k, v in model_args.items() if saved.get(k) != v]
    if diff:
        fail(f"checkpoint {path} is from a different model shape: {', '.join(diff)}")


# ----------------------------------------------------------------------------------------------------------------
# stages


def stage_loss(model, batch, cfg: TrainConfig, gen: torch.Generator):
    """(loss, stats) of one micro-batch; `gen` (the batch's generator) draws the stage's randomness (W0, budgets)."""
    x, y, mu, w = batch
    if cfg.stage != "base":
        return model(x, y, gen, cfg.stage)
    return model(x, y, mu=mu, weights=w)[1], {}  # the fused head + loss; y = -1 has weight 0


def build_mc(cfg: TrainConfig, ckpt: dict | None, device):
    """(StageModel, model_args) for an MC stage: the base GPT (+ adapters for lora) from base_ckpt, or everything
    from `ckpt` on resume; GistNet/LensNet from gist_ckpt (or base_ckpt). One-line errors before any compute."""
    base = load_checkpoint(cfg.base_ckpt) if ckpt is None else ckpt
    model_args = dict(base["model_args"])
    if cfg.stage == "lora" and ckpt is None:
        model_args.update(lora_rank=cfg.lora_rank, lora_layers=cfg.lora_layers, lora_alpha=cfg.lora_alpha)
    if cfg.w_max > model_args["block_size"]:  # DESIGN §2: PoSE trains positions, not spans
        fail(f"w_max={cfg.w_max} is above the {model_args['block_size']}-token block the base model was trained on: it "
             f"never attended over that many entries; use w_max <= {model_args['block_size']}")
    if cfg.stage == "lens" and cfg.lens_teacher == "attention" and cfg.block_size > model_args["block_size"]:
        fail(f"lens_teacher='attention' reads the base's attention under full context: block_size={cfg.block_size} "
             f"must be <= the base's {model_args['block_size']}")
    gpt = GPT(GPTConfig(**model_args))
    missing, unexpected = gpt.load_state_dict(base["model"], strict=False)
    if unexpected or any(".lora_" not in k for k in missing):
        fail(f"{cfg.base_ckpt} does not match its model_args (missing {missing[:3]}, unexpected {unexpected[:3]})")
    try:
        mc = MegaContextModel(gpt, cfg.mc_config())
    except ValueError as e:
        fail(str(e))
    source = base if ckpt is not None else load_checkpoint(cfg.gist_ckpt) if cfg.gist_ckpt else base
    if cfg.stage == "predict" and cfg.block_size > model_args["block_size"]:
        fail(f"predict reads the base's states over whole windows: block_size={cfg.block_size} must be <= the base's "
             f"{model_args['block_size']}")
    if cfg.stage in ("lens", "lora", "predict") and "gistnet" not in source:
        fail(f"stage {cfg.stage!r} needs a trained GistNet: set gist_ckpt=<a gist-stage checkpoint> "
             f"({cfg.gist_ckpt or cfg.base_ckpt} has none)")
    for name in ("gistnet", "lensnet", "sigma_scale", "predictor"):
        if name in source and hasattr(mc, name):
            try:
                if name == "sigma_scale":
                    mc.sigma_scale.data.copy_(source[name])
                else:
                    getattr(mc, name).load_state_dict(source[name])
            except RuntimeError as e:
                fail(f"the {name} in the checkpoint does not fit this config ({str(e).splitlines()[0][:160]})")
    if cfg.predict_heads and ckpt is None:
        if not cfg.gist_predict:
            fail(f"predict_heads={cfg.predict_heads} needs gist_predict='mlp' (the heads it loads)")
        try:
            mc.predictor.load_state_dict(predict.load_heads(cfg.predict_heads, mc, "predict_heads").state_dict())
        except ValueError as e:
            fail(str(e))
    elif cfg.lens_plan and "predictor" not in source:
        fail("lens_plan reads the MegaPrediction heads' plan: set predict_heads=<a predict-stage checkpoint or a "
             "bench/megaprediction.py --save-heads file for this base and GistNet>")
    if cfg.stage == "lora" and "lensnet" not in source:
        print0("!!! note: no trained LensNet in the checkpoint: lora's allocator refocuses with untrained scores")
    trained = stages.set_trainable(mc, cfg.stage)
    print0(f"{cfg.stage}: training {sum(p.numel() for p in mc.parameters() if p.requires_grad):,} parameters "
           f"({len(trained)} tensors under {sorted({n.split('.')[0] for n in trained})}); the rest frozen")
    model = stages.StageModel(mc, cfg, teacher_fits=cfg.block_size <= model_args["block_size"]).to(device)
    model.lens_trained = cfg.stage == "lens" or "lensnet" in source  # an untrained LensNet is not saved
    return model, model_args


def mc_checkpoint_extras(model) -> dict:
    """What sample.py --mc and the next stage read: the MC config, GistNet, LensNet (once trained), the adapters
    (also inside `model`, so sample.py builds the adapted GPT from model_args alone)."""
    mc = model.mc
    lora = {k: v for k, v in mc.gpt.state_dict().items() if ".lora_" in k}
    lens = {"lensnet": mc.lensnet.state_dict()} if model.lens_trained else {}
    heads = {"predictor": mc.predictor.state_dict(), "predictor_identity": mc.identity()} if mc.cfg.gist_predict else {}
    return {"mc_config": dataclasses.asdict(mc.cfg), "gistnet": mc.gistnet.state_dict(),
            "sigma_scale": mc.sigma_scale.detach().clone(), **lens, **heads, **({"lora": lora} if lora else {})}


def evaluate_mc(model, tokens, cfg: TrainConfig, device, ctx, rank: int, ddp: bool) -> dict:
    """The stage's eval on eval_iters fixed val batches per rank (stages.evaluate), pooled over ranks."""
    raw = model.module if ddp else model
    batches = []
    for i in range(cfg.eval_iters):
        gen = batch_generator(cfg.seed + 99991, 0, rank * cfg.eval_iters + i)
        x, y, _, _ = get_batch(tokens, cfg, gen, device, gaps=False)
        batches.append((x, y, gen))
    with ctx:
        acc = stages.evaluate(raw, cfg.stage, batches)
    if ddp:  # ranks may have counted different metrics: reduce (sum, count) over the union of their names
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, sorted(acc))
        keys = sorted(set().union(*names))
        t = torch.tensor([acc.get(k, (0.0, 0)) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        acc = dict(zip(keys, t.tolist()))
    return {k: s / n for k, (s, n) in acc.items() if n}


@torch.no_grad()
def evaluate(model, tokens, cfg: TrainConfig, device, ctx, rank: int, ddp: bool) -> dict:
    """Val loss over eval_iters fixed batches per rank, averaged over ranks, with consecutive positions; and, when
    `eval_gap` > 0, the loss of each window's second half without and with a position gap of `eval_gap` before it
    (DESIGN §3: a position-ready model scores both within noise)."""
    model.eval()
    sums = torch.zeros(3, device=device)  # all tokens, second half, second half after the gap
    half = cfg.block_size // 2
    plain = dataclasses.replace(cfg, retrieval_mix=0.0)  # the loss figures read book text only
    for i in range(cfg.eval_iters):
        x, y, mu, _ = get_batch(tokens, plain, batch_generator(cfg.seed + 99991, 0, rank * cfg.eval_iters + i), device,
                                gaps=False)
        with ctx:
            nll = model(x, y, mu=mu, reduction="none")[1].float()  # (B, T)
            sums[0] += nll.mean()
            sums[1] += nll[:, half:].mean()
            if cfg.eval_gap > 0:
                mu_gap = mu + torch.where(mu >= half, cfg.eval_gap, 0)
                sums[2] += model(x, y, mu=mu_gap, reduction="none")[1].float()[:, half:].mean()
    sums /= cfg.eval_iters
    if ddp:
        dist.all_reduce(sums, op=dist.ReduceOp.AVG)
    out = {"val_loss": sums[0].item(), "val_loss_tail": sums[1].item()}
    if cfg.eval_gap > 0:
        out["val_loss_tail_gap"] = sums[2].item()
    if cfg.retrieval_mix > 0:
        out["val_retrieval"] = drill_accuracy(model, tokens, cfg, device, ctx, rank, ddp)
    model.train()
    return out


@torch.no_grad()
def drill_accuracy(model, tokens, cfg: TrainConfig, device, ctx, rank: int, ddp: bool) -> float:
    """Share of the questions in eval_iters val drill batches (full windows, PoSE gaps) whose whole answer the model
    predicts greedily, teacher-forced; pooled over ranks. An answer is a run of targets weighted retrieval_weight."""
    drills, hits = dataclasses.replace(cfg, retrieval_mix=1.0), torch.zeros(2, device=device)
    for i in range(cfg.eval_iters):
        gen = batch_generator(cfg.seed + 77773, 0, rank * cfg.eval_iters + i)
        x, y, mu, w = get_batch(tokens, drills, gen, device, gaps=cfg.pose)
        with ctx:
            wrong = (model(x, mu=mu)[0].argmax(-1) != y).cpu().numpy()
        answer = (w == cfg.retrieval_weight).cpu().numpy()
        for b in range(len(x)):
            edges = np.flatnonzero(np.diff(np.concatenate([[0], answer[b], [0]]).astype(np.int8)))
            for s, e in zip(edges[::2], edges[1::2]):
                hits += torch.tensor([float(not wrong[b, s:e].any()), 1.0], device=device)
    if ddp:
        dist.all_reduce(hits)
    return (hits[0] / hits[1].clamp(min=1)).item()


def run_alt(cfg: TrainConfig, argv) -> float:
    """alt: gist -> lens -> lora cycles. Each phase is a full stage run in out_dir/cycle<c>_<stage> that starts from
    the previous phase's checkpoint (GPT with adapters, GistNet, LensNet) and checkpoints at its end; a finished phase
    is skipped and an interrupted one resumed, so a killed alt run continues where it stopped. Stops early when a
    cycle lowers the lora phase's val loss (horizon NLL under allocator-built working contexts) by < alt_min_delta."""
    prev, last_val, val = cfg.base_ckpt, None, float("inf")
    for cycle in range(cfg.alt_cycles):
        for stage in ("gist", "lens", "lora"):
            out, iters = os.path.join(cfg.out_dir, f"cycle{cycle}_{stage}"), getattr(cfg, f"alt_{stage}_iters")
            path = os.path.join(out, "ckpt.pt")
            ckpt = load_checkpoint(path) if os.path.exists(path) else None
            if ckpt is not None and ckpt["step"] >= iters:
                val = ckpt["best_val_loss"]
            else:
                val = main(argv + [f"--stage={stage}", f"--out_dir={out}", f"--base_ckpt={prev}", f"--gist_ckpt={prev}",
                                   f"--max_iters={iters}", f"--init_from={'resume' if ckpt else 'scratch'}",
                                   "--save_checkpoint=True"], nested=True)
            print0(f"alt: cycle {cycle} {stage} done, val loss {val:.4f} ({path})")
            if int(os.environ.get("RANK", 0)) == 0:
                with open(os.path.join(cfg.out_dir, "alt.jsonl"), "a") as f:
                    f.write(json.dumps({"cycle": cycle, "stage": stage, "val_loss": val, "ckpt": path}) + "\n")
            prev = path
        if last_val is not None and last_val - val < cfg.alt_min_delta:
            print0(f"alt: val loss at budget plateaued ({last_val:.4f} -> {val:.4f}); stopping after cycle {cycle}")
            break
        last_val = val
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return val


def main(argv, nested: bool = False):
    try:
        cfg = load_config(TrainConfig, argv)
    except ConfigError as e:
        fail(str(e))
    if cfg.stage == "alt":
        os.makedirs(cfg.out_dir, exist_ok=True)
        return run_alt(cfg, argv)

    # compute: DDP when launched by torchrun (RANK in the environment)
    ddp = "RANK" in os.environ
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("device='cuda' but no CUDA device is available")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if ddp and not dist.is_initialized():  # (alt runs its phases in one process group)
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = rank == 0
    if cfg.grad_accum % world:  # every rank runs the same number of micro-batches: round up, and say so
        cfg = dataclasses.replace(cfg, grad_accum=-(-cfg.grad_accum // world) * world)
        print0(f"note: grad_accum rounded up to {cfg.grad_accum}, a multiple of the {world} ranks: "
               f"{cfg.grad_accum} x {cfg.batch_size} sequences x {cfg.block_size} tokens = "
               f"{cfg.grad_accum * cfg.batch_size * cfg.block_size:,} tokens per step")
    accum = cfg.grad_accum // world
    torch.manual_seed(cfg.seed + rank)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if use_cuda and torch.cuda.is_bf16_supported() else "float32"
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # data and model
    data_dir = resolve_data_dir(cfg.data_dir)
    train_tokens, val_tokens, meta = load_data(data_dir)
    cfg = dataclasses.replace(cfg, data_dir=data_dir)  # the config logged and saved names the data actually read
    if cfg.retrieval_mix > 0 or cfg.copy_steps > 0:  # a drill fits a window, the tokenizer has the markers: say so now
        try:
            for T in {window(cfg, None)[0], window(cfg, 0)[0]}:
                for task in drill_tasks(cfg):  # each task alone fits a window (several are dropped to fit)
                    retrieval.plant_drills(np.zeros(T + 1, dtype=np.int64), np.random.default_rng(0),
                                           retrieval.needles_for(data_dir), [task], 1, 0, cfg.retrieval_weight)
        except (ValueError, KeyError) as e:
            fail(f"retrieval drills: {e}")
    vocab_size = meta["vocab_size"]
    tokenizer = None if meta.get("random_ids") else checkpoint.tokenizer_record(data_dir)  # checkpoints name it
    if meta.get("synthetic"):
        print0(f"!!! note: {data_dir} holds a SYNTHETIC corpus (planted facts in pseudo-English), not books")
    model_args = dataclasses.asdict(cfg.gpt_config(vocab_size))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        if cfg.stage == "base":
            check_same_shape(ckpt, model_args, ckpt_path)
    elif os.path.exists(ckpt_path) and cfg.save_checkpoint:
        fail(f"{ckpt_path} exists; pass --init_from=resume to continue it or choose another --out_dir")
    if cfg.stage == "base":
        check_memory(cfg, model_args, dtype, device)
        model = GPT(GPTConfig(**model_args)).to(device)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        gpt = model
    else:
        model, model_args = build_mc(cfg, ckpt, device)
        gpt = model.mc.gpt
    # GPT's AdamW grouping over the parameters that require grads (a stage's frozen ones are skipped)
    optimizer = GPT.configure_optimizers(model, cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), device.type)
    step, best_val = 0, float("inf")
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best_val = ckpt["step"], ckpt["best_val_loss"]
        rng = ckpt["rng"][rank] if len(ckpt["rng"]) == world else ckpt["rng"][0]
        torch.set_rng_state(rng["cpu"])
        if use_cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if use_cuda else None)

    # run evidence: config first, then code/versions/hardware; JSONL always, wandb when asked
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    wandb_run = None
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            fail(f"cannot create out_dir {cfg.out_dir} ({durable.reason(e)})")
        config_json = json.dumps(dataclasses.asdict(cfg), indent=2).encode()
        write_or_fail(os.path.join(cfg.out_dir, "config.json"), lambda f: f.write(config_json), len(config_json),
                      "nothing else was written")
        log_file = start_log(log_path, cfg) if ckpt is None else resume_log(log_path, ckpt["step"], cfg)
        if cfg.wandb != "off":
            import wandb  # imported only when asked for: no network here, offline by default
            wandb_run = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), mode=cfg.wandb,
                                   dir=cfg.out_dir)
    print0(kernels.banner())
    print0(f"{cfg.stage}: {gpt.num_params() / 1e6:.2f}M params (non-embedding), world={world}, accum={accum}, "
           f"tokens/step={cfg.batch_size * cfg.block_size * cfg.grad_accum:,}, device={device}, dtype={dtype}")

    def log(record):
        if master:
            try:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            except OSError as e:  # a full disk: the checkpoint is whole (a torn log line is dropped on resume)
                fail(f"cannot write {log_path} ({durable.reason(e)}); {ckpt_state()}")
            if wandb_run is not None:
                wandb_run.log(record, step=record["step"])

    saved_step = ckpt["step"] if ckpt is not None else None

    def ckpt_state() -> str:
        return (f"the checkpoint of step {saved_step} is intact: free space, then --init_from=resume"
                if saved_step is not None else "no checkpoint was written yet")

    gpu_name = torch.cuda.get_device_name(device) if use_cuda else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in gpu_name), None)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
    t_start, t_last, step_last = time.time(), time.time(), step
    resumed_at = step if ckpt is not None else -1  # that step's eval and checkpoint were done by the earlier run
    while True:
        last = step >= cfg.max_iters
        if (step % cfg.eval_interval == 0 or last) and step != resumed_at:
            ev = (evaluate if cfg.stage == "base" else evaluate_mc)(model, val_tokens, cfg, device, ctx, rank, ddp)
            best_val = min(best_val, ev["val_loss"])
            gap = ""
            if cfg.eval_gap > 0 and cfg.stage == "base":
                gap = (f" | 2nd half {ev['val_loss_tail']:.4f}, "
                       f"after a {cfg.eval_gap:.0e} gap {ev['val_loss_tail_gap']:.4f}")
            if "val_retrieval" in ev:
                gap += f" | drill retrieval {ev['val_retrieval']:.3f}"
            if cfg.stage != "base":
                gap = " | " + " ".join(f"{k} {v:.4f}" for k, v in ev.items() if k != "val_loss")
            print0(f"step {step}: val loss {ev['val_loss']:.4f}{gap}")
            log({"step": step, **ev, "time": time.time() - t_start})
            rngs = [{"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if use_cuda else None}]
            if ddp:
                gathered = [None] * world
                dist.all_gather_object(gathered, rngs[0])
                rngs = gathered
            if master and cfg.save_checkpoint and step > 0:
                extras = mc_checkpoint_extras(raw_model) if cfg.stage != "base" else {}
                extras |= {"tokenizer": tokenizer} if tokenizer else {}
                try:
                    checkpoint.save({"model": gpt.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                     "best_val_loss": best_val, "config": dataclasses.asdict(cfg),
                                     "model_args": model_args, "rng": rngs, "data_position": step, **extras},
                                    ckpt_path)
                except OSError as e:  # a full disk: the temp file is gone, the last checkpoint untouched
                    fail(f"cannot write the checkpoint {ckpt_path} ({durable.reason(e)}); {ckpt_state()}")
                saved_step = step
        if last:
            break

        # one optimizer step: accum micro-batches, grads synced on the last one only
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, stats_sum = torch.zeros((), device=device), {}
        for micro in range(accum):
            gen = batch_generator(cfg.seed, step, rank * accum + micro)
            gaps = cfg.pose and cfg.stage == "base" and step >= cfg.copy_steps  # gaps slow the induction head's birth
            batch = get_batch(train_tokens, cfg, gen, device, gaps=gaps, step=step)
            if ddp:
                model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                loss, stats = stage_loss(model, batch, cfg, gen)
                loss = loss / accum
            loss.backward()
            loss_sum += loss.detach()
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) / accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            if ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            if use_cuda:
                torch.cuda.synchronize(device)
            dt = time.time() - t_last
            tok_s = tokens_per_step * (step - step_last) / dt
            mfu = gpt.estimate_mfu(tok_s / world, peak) if peak and cfg.stage == "base" else None
            eta = (cfg.max_iters - step) * dt / (step - step_last)
            print0(f"step {step}/{cfg.max_iters} | loss {loss_sum.item():.4f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | "
                   f"mfu {f'{100 * mfu:.1f}%' if mfu else 'n/a'} | eta {eta / 60:.1f}m")
            log({"step": step, "loss": loss_sum.item(), "lr": lr, "tok_per_s": tok_s, "mfu": mfu,
                 "time": time.time() - t_start, **stats_sum, **stages.TIMER.pop()})
            t_last, step_last = time.time(), step

    if master:
        log_file.close()
        if wandb_run is not None:
            wandb_run.finish()
    if ddp and not nested:
        dist.barrier()  # no rank tears the group down while another is still in a collective
        dist.destroy_process_group()
    return best_val


if __name__ == "__main__":
    main(sys.argv[1:])
