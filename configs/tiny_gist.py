"""Gist stage (JT1) on top of configs/tiny.py's base model: GistNet learns substitutability, base frozen (CPU, minutes).

    python train.py configs/tiny.py --out_dir=out/tiny
    python train.py configs/tiny_gist.py

Shape (n_layer, ...) comes from the base checkpoint; K=8 so a 256-token sequence holds LOD1 and LOD2 gists.
"""
stage = "gist"
out_dir = "out/tiny_gist"
base_ckpt = "out/tiny/ckpt.pt"
data_dir = "data/pg"
block_size = 256
block_k = 8
recent_tokens = 16
w_max = 64
horizon = 32
gist_heads = 4
gist_w0_max = 128
gist_w1_max = 4
batch_size = 8
max_iters = 200
lr = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = 4
log_interval = 10
