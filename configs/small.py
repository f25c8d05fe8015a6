"""~30M-parameter GPT, 2k context, for one H100 in about 10 minutes (0.5 B tokens at ~1 M tok/s is the goal).

    python train.py configs/small.py
"""
out_dir = "out/small"
data_dir = "data/pg"
block_size = 2048
n_layer = 8
n_head = 8
n_embd = 512
batch_size = 32
grad_accum = 2
max_iters = 4000
lr = 2e-3
min_lr = 2e-4
warmup_iters = 200
schedule = "wsd"
eval_interval = 500
eval_iters = 20
log_interval = 50
compile = True
