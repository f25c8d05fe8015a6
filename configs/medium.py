"""GPT-2-124M class (12 x 768, 2k context): throughput and MFU reference; scale out with torchrun.

    torchrun --standalone --nproc_per_node=8 train.py configs/medium.py
"""
out_dir = "out/medium"
data_dir = "data/pg"
block_size = 2048
n_layer = 12
n_head = 12
n_embd = 768
batch_size = 16
grad_accum = 32  # 32 x 16 x 2048 = 1 M tokens per step over all ranks; one GPU reproduces it by accumulation
max_iters = 5000
lr = 1.5e-3
min_lr = 1.5e-4
warmup_iters = 250
schedule = "wsd"
eval_interval = 500
eval_iters = 20
log_interval = 20
compile = True
