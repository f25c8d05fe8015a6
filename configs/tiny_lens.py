"""Lens stage (JT2) after configs/tiny_gist.py: LensNet learns counterfactual expand/collapse gains (CPU, minutes).

    python train.py configs/tiny_lens.py     # needs out/tiny/ckpt.pt and out/tiny_gist/ckpt.pt
"""
stage = "lens"
out_dir = "out/tiny_lens"
base_ckpt = "out/tiny/ckpt.pt"
gist_ckpt = "out/tiny_gist/ckpt.pt"
data_dir = "data/pg"
block_size = 256
block_k = 8
recent_tokens = 16
w_max = 64
horizon = 32
gist_heads = 4
lens_width = 64
lens_heads = 4
lens_tail = 16
batch_size = 4
max_iters = 200
lr = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = 4
log_interval = 10
