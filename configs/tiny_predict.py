"""Predict stage (MegaPrediction, issue 19) after configs/tiny_gist.py: heads that predict the gists of the next K and
K² tokens from the base's final states learn on book text; base and GistNet frozen (CPU, a minute).

    python train.py configs/tiny_predict.py     # needs out/tiny/ckpt.pt and out/tiny_gist/ckpt.pt
    python sample.py --ckpt out/tiny_predict/ckpt.pt --mc --show-plan out/tiny_predict/ckpt.pt --prompt "It was"

The checkpoint also serves as predict_heads for a lens stage with lens_plan (LensNet reads the predicted next gist).
"""
stage = "predict"
out_dir = "out/tiny_predict"
base_ckpt = "out/tiny/ckpt.pt"
gist_ckpt = "out/tiny_gist/ckpt.pt"
data_dir = "data/pg"
block_size = 256
block_k = 8
recent_tokens = 16
w_max = 64
horizon = 32
gist_heads = 4
gist_predict = "mlp"
batch_size = 8
max_iters = 300
lr = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = 4
log_interval = 20
