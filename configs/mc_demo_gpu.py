"""The MegaContext demonstration at GPU scale (issue 12): `bash bench/mc_demo.sh --size gpu` on one H100/H200.

The CPU demonstration's recipe (configs/mc_demo.py: retrieval mix, copy warm-up, short windows first, half the
drills across a position gap, p-RoPE with the slow half of each head's bands at frequency 0, LensNet type previews) on
a 10 x 512 base (31.5M non-embedding parameters, 1,024-token BPE on a slice of the books) with a 1,024-token block, so
that the working context of 1,024 entries is inside the trained span; K = 8. Step counts are sized for a <= 9 minute
run by `bash bench/mc_demo.sh --size gpu --plan` (base ~3 min: 1,600 steps of 32,768 tokens, the CPU demo's schedule;
the step measured on an H200, the other stages estimated): the first device run calibrates them. mc_demo.sh sets the
per-stage overrides (stage, out_dir, block_size, steps).
"""
out_dir = "out/mc_demo_gpu/base"
data_dir = "data/pg1k_gpu"  # python prepare.py --vocab-size 1024 --out data/pg1k_gpu --max-docs 120 (here; carried)
block_size = 1024
n_layer = 10
n_head = 8
n_embd = 512
rope_bands = 16  # p-RoPE as on the CPU: the 16 fastest of 32 bands rotate (head dim 64), the rest are position-free
max_position = 16777216  # 2**24: PoSE gaps up to 16M
batch_size = 32
max_iters = 1600
lr = 1.5e-3
min_lr = 1.5e-4
warmup_iters = 100
schedule = "wsd"
decay_frac = 0.2
eval_interval = 600
eval_iters = 4
log_interval = 100
retrieval_mix = 1.0
copy_steps = 600
short_block = 256
short_steps = 1000
retrieval_gaps = 0.5
# MegaContext: K = 8, a working context of 1,024 entries = the base's block
block_k = 8
w_max = 1024
recent_tokens = 64
horizon = 32
gist_heads = 8
lens_width = 128
lens_tail = 16
lens_preview = 2
lens_types = True  # as on the CPU: previews of every token type of a gist's span, at any depth
lens_horizon = 16384  # as on the CPU: LensNet's features stop at its training block (the lens stage's 16,384 tokens)
