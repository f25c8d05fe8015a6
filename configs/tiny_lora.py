"""LoRA stage (JT3) after configs/tiny_lens.py: rank-8 adapters on every block's qkv, task NLL under allocator-built
working contexts plus a weak gist keep-alive term (CPU, minutes).

    python train.py configs/tiny_lora.py     # needs out/tiny/ckpt.pt and out/tiny_lens/ckpt.pt (GistNet + LensNet)
    python sample.py --ckpt out/tiny_lora/ckpt.pt --mc ...   # the adapters are part of the GPT (model_args.lora_rank)
"""
stage = "lora"
out_dir = "out/tiny_lora"
base_ckpt = "out/tiny/ckpt.pt"
gist_ckpt = "out/tiny_lens/ckpt.pt"
data_dir = "data/pg"
block_size = 256
block_k = 8
recent_tokens = 16
w_max = 64
horizon = 32
gist_heads = 4
gist_w0_max = 128
gist_w1_max = 4
lens_width = 64
lens_heads = 4
lens_tail = 16
lora_rank = 8
keep_alive = 0.1
batch_size = 4
max_iters = 200
lr = 1e-3
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
eval_iters = 4
log_interval = 10
