"""Pass-key retrieval at CPU scale (issue 5's demonstration): a tiny position-ready base trained on book text with
planted pass keys, then the gist and lens stages, then retrieval at 8x the base's context (2,048 tokens) with a
budget of a quarter of that history (512 entries). The whole chain: 19 minutes on 2 cores (README has the figures):

    bash bench/passkey_demo.sh

This file is the base stage and the MegaContext fields every stage shares; the script overrides stage, out_dir,
block_size and the step counts per stage.
"""
out_dir = "out/passkey/base"
data_dir = "data/pg"
passkey_rate = 0.5  # half the sequences carry a needle and, ending at block_size - horizon, its question
# base: the tiny GPT of configs/tiny.py, position-ready (PoSE on by default)
block_size = 256
n_layer = 4
n_head = 4
n_embd = 128
batch_size = 8
max_iters = 500
lr = 3e-3
min_lr = 3e-4
warmup_iters = 30
eval_interval = 250
eval_iters = 4
log_interval = 50
# MegaContext (gist, lens): K=8, so LOD1 covers 8 tokens and LOD2 64
block_k = 8
recent_tokens = 32
w_max = 512
horizon = 32
gist_heads = 4
gist_w0_max = 128
gist_w1_max = 4
lens_width = 64
lens_tail = 16
lens_candidates = 32
