"""Ablation: GPT-2-style GELU MLP and untied embeddings instead of SwiGLU + tied. Hypothesis: slightly worse val loss
at equal steps for tiny/small models.

    python train.py configs/tiny.py configs/ablate/gelu_untied.py --out_dir=out/tiny-gelu
Baseline: configs/tiny.py.
"""
mlp = "gelu"
tie_embeddings = False
