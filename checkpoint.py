"""Checkpoints: what train.py writes, and how sample.py and the benchmarks read one back into models.

    ckpt = checkpoint.read("out/tiny/ckpt.pt")       # CheckpointError (one line) when missing or damaged
    gpt = checkpoint.load_gpt(ckpt, device)           # the base GPT (with its LoRA adapters, if any), eval mode
    mc = checkpoint.mc_model(ckpt, args, gpt)         # MegaContextModel: trained GistNet/LensNet when it has them
    checkpoint.check_tokenizer(ckpt, data_dir, enc)   # ValueError unless it is the tokenizer the model learned

A checkpoint is a dict: model (GPT state, adapters included), model_args, config (the resolved TrainConfig), step,
best_val_loss, optimizer, rng; the MegaContext stages add mc_config, gistnet, lensnet, sigma_scale and lora; and
`tokenizer`, the checksum and vocabulary size of the tokenizer it was trained with (checkpoints from before it was
recorded still load, checked by vocabulary size only). save() writes through durable.write_atomic: a full disk or
an interrupted write never leaves half a checkpoint.

Split from train.py and sample.py by concept: both are command-line programs; the benchmarks import this, not them.
"""
import dataclasses
import os

import torch

import durable
import prepare
from megacontext import MegaContextConfig, MegaContextModel
from model import GPT, GPTConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, or not one of ours; the message is one line."""


def read(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as e:  # truncated zip, bad pickle, a folder, ...: all mean the same to the user
        first = (str(e).splitlines() or [""])[0][:120]
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a MegaContext checkpoint")
    return ckpt


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested dict/list: what torch.save writes, give or take its index."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save(ckpt: dict, path: str):
    """Write atomically, after checking the disk has room (durable.DiskFull, one line, before any byte). A write that
    fails anyway (the disk filled meanwhile) raises its OSError and leaves no temp file."""
    def write(f):
        try:
            torch.save(ckpt, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write (ENOSPC) as "unexpected pos"; the
            if isinstance(e.__context__, OSError):  # OSError it swallowed is the context
                raise e.__context__ from None
            raise
    durable.write_atomic(path, write, tensor_bytes(ckpt) + (1 << 16), "the checkpoint")


def load_gpt(ckpt: dict, device="cpu") -> GPT:
    gpt = GPT(GPTConfig(**ckpt["model_args"]))
    try:
        gpt.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not match its model_args "
                              f"({str(e).splitlines()[0][:160]})") from None
    return gpt.to(device).eval()


def tokenizer_record(data_dir: str) -> dict:
    """{"sha256", "vocab_size"} of the tokenizer in data_dir (or a tokenizer.json path), for a checkpoint."""
    path = data_dir if data_dir.endswith(".json") else os.path.join(data_dir, "tokenizer.json")
    t = prepare.read_tokenizer_json(path)
    return {"sha256": prepare.tokenizer_sha256(t), "vocab_size": t["vocab_size"]}


def check_tokenizer(ckpt: dict, data_dir: str, enc):
    """ValueError (one line) unless the tokenizer in data_dir (enc, loaded from there) is the one the checkpoint was
    trained with: the same checksum and vocabulary size when the checkpoint records them, else (an older
    checkpoint) the same vocabulary size as the model. Another tokenizer would decode the model's ids into other
    text, or into ids it does not have."""
    vocab, want = ckpt["model_args"]["vocab_size"], ckpt.get("tokenizer")
    fix = "pass --data-dir with the tokenizer of the data it was trained on"
    if want:
        have = tokenizer_record(data_dir)
        if have != want:
            raise ValueError(f"the tokenizer in {data_dir} (sha256 {have['sha256'][:12]}, {have['vocab_size']:,} ids) "
                             f"is not the one the checkpoint was trained with (sha256 {want['sha256'][:12]}, "
                             f"{want['vocab_size']:,} ids); {fix}")
    elif enc.n_vocab != vocab:
        raise ValueError(f"the tokenizer in {data_dir} has {enc.n_vocab:,} ids but the model {vocab:,}: it is not the "
                         f"one the model was trained with; {fix}")


def least_budget(cfg: MegaContextConfig) -> int:
    """The smallest budget MegaContextConfig.validate accepts: the protected tail, the coarsest tiling of a history
    that reaches LOD2 (2(K-1) + 1 entries) and the refocus headroom."""
    return cfg.recent_tokens + 2 * (cfg.K - 1) + 1 + cfg.refocus_tokens


def mc_model(ckpt: dict, args, gpt: GPT) -> MegaContextModel:
    """The checkpoint's MegaContext config and weights when it has them (training stages), else untrained nets from a
    fixed seed. args.block, .budget, .recent, .policy (and .edit_cost, if given) override the config when not None.
    The budget defaults to the checkpoint's, else to the default capped at the base's block. ValueError (one line) for
    a config that cannot run on this base."""
    fields = {f.name for f in dataclasses.fields(MegaContextConfig)}
    block = gpt.config.block_size
    saved = {"w_max": min(MegaContextConfig.w_max, block)}
    saved |= {k: v for k, v in ckpt.get("mc_config", {}).items() if k in fields}
    given = {"block_k": args.block, "w_max": args.budget, "recent_tokens": args.recent, "policy": args.policy,
             "edit_cost": getattr(args, "edit_cost", None)}
    cfg = MegaContextConfig(**{**saved, **{k: v for k, v in given.items() if v is not None}})
    if least_budget(cfg) > block:  # no budget can work: say both limits at once, and what would fit
        K = max([2] + [k for k in (2**i for i in range(1, 7)) if k <= cfg.K and 6 * k <= block])
        hint = MegaContextConfig(block_k=K, recent_tokens=min(cfg.recent_tokens, block // 4))
        raise ValueError(f"this base model cannot hold a working context at K={cfg.K} with a {cfg.recent_tokens}-token "
                         f"tail: that needs a budget of at least {least_budget(cfg)} entries, and a budget may not "
                         f"exceed the {block}-token block the base was trained on; use a smaller --block and --recent "
                         f"(--block {K} --recent {hint.recent_tokens} needs {least_budget(hint)}), or a base trained "
                         f"on longer blocks")
    if cfg.w_max > block:  # DESIGN §2: PoSE trains positions, not spans
        raise ValueError(f"budget {cfg.w_max} is above the {block}-token block the base model was trained on: it never "
                         f"attended over that many entries; use --budget <= {block}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # untrained nets are identical on every run, so the model identity of a tree holds
        mc = MegaContextModel(gpt, cfg)
    for name in ("gistnet", "lensnet", "predictor"):
        if name in ckpt and hasattr(mc, name):
            getattr(mc, name).load_state_dict(ckpt[name])
    return mc.eval()
