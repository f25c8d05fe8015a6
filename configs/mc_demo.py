"""The MegaContext demonstration at CPU scale (issue 9): `bash bench/mc_demo.sh` runs every stage from this file.

A tiny position-ready base (4 x 128, 1,024-token BPE) trained on books with the retrieval mix of retrieval.py (copying
first, then drills; 128-token windows first, then 512), then GistNet (gist), LensNet (lens), and the harness at a
budget of 128 entries: retrieval at 8x and 32x the budget, book NLL where full attention fits the 512-token block.
This file holds the base stage and the MegaContext fields every stage shares; mc_demo.sh overrides stage, out_dir,
block_size and step counts per stage.
"""
out_dir = "out/mc_demo/base"
data_dir = "data/pg1k"  # python prepare.py --vocab-size 1024 --out data/pg1k
# base: the tiny GPT, position-ready (PoSE on by default), 2,048 tokens per step
block_size = 512
n_layer = 4
n_head = 4
n_embd = 128
rope_bands = 8  # p-RoPE: in every head the 8 fastest of 16 bands rotate, the 8 slowest have frequency 0. Copying a
# needle is a match of content; with all 16 bands rotating the induction head matched through the slowest bands and
# lost the needle beyond ~2k positions (37/40 at a 1k gap, 0/40 at 4k), and position-free heads beside RoPE ones were
# left unused. With frequency-0 bands: 40/40 from a 0 to a 16M gap (python bench/copy_gap.py --ckpt <base ckpt>).
max_position = 16777216  # 2**24: PoSE gaps up to 16M: relative distances of a 16M-token history are trained
batch_size = 4
max_iters = 2000  # when key -> value lookup forms is chaotic: with the fused cross-entropy's rounding (1e-8) it
# had not formed after 2,000 or 3,000 steps (multi-key 0.00 in-block); a 1e-9 term in the gradient moves the loss at
# step 50 by 0.02. model.py keeps the plain loss on the CPU, so this run is reproducible bit for bit; a curriculum
# robust to that is open
lr = 3e-3
min_lr = 3e-4
warmup_iters = 50
schedule = "wsd"  # a constant rate while copying forms; the decay at the end
decay_frac = 0.2
eval_interval = 400
eval_iters = 4
log_interval = 50
retrieval_mix = 1.0  # every window is book text with needles and questions planted in it
retrieval_tasks = "passkey,multikey,multivalue,multiquery,vartrack"  # the harness's five tasks (retrieval.py)
retrieval_questions = 3  # task instances asked per drill window (five tasks share the drills)
copy_steps = 500  # copied spans first: the induction head forms in ~400 steps
short_block = 128  # 16 x 128-token windows per step for the first 1,000 steps
short_steps = 1000
retrieval_gaps = 0.5  # then half the drills ask across a position gap of up to max_position
# MegaContext (gist, lens): K = 8 (LOD1 = 8 tokens, LOD2 = 64), a budget of 128 entries <= the 512-token block
block_k = 8
w_max = 128
recent_tokens = 32
horizon = 32
gist_heads = 4
lens_width = 64
lens_tail = 16
lens_preview = 2  # LensNet sees each gist's tokens (K**2 = 64 per LOD2 gist): a needle's marker among them
lens_types = True  # instead: every token type of each gist's span, at any depth (tree.types); the 2-level preview of a
# LOD3+ gist shows gists, where the marker is averaged away (LensNet 0/8 at 64k tokens; 8/8 with the types)
lens_horizon = 4096  # LensNet's distance and span features stop at its training block (the counterfactual lens
# stage's 4,096 tokens): at 1M tokens they extrapolated and LensNet stopped zooming (4/30 pass keys; 13/16 capped)
lens_query = "1,4"  # LensNet reads the question: the base's residual streams of the newest 16 tokens after block 1
# (the token and its neighbours) and block 4 (what the base has read, e.g. the variable a zoomed needle names) query
# every entry through the Indexer (issue 17: query-independent scores found no key -> value needle)
lens_markers = 8  # prepare.py's 8 special tokens are markers: previews also mark the ids that follow one (a needle's
# key after <|key|>), exact at any depth where the same word occurs thousands of times in book text
lens_margin = 5  # previews start 5 tokens early and take in the token after the span: both halves of a needle (7
# tokens, its key second) that straddles a block show its key, a neighbour holding none of it does not (8 on both
# sides zoomed the neighbours too: gists beside a needle scored as high as its holders)
