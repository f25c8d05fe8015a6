#!/usr/bin/env bash
# Issue 5's CPU demonstration, one command: base (pass keys planted) -> gist (JT1) -> lens (JT2) -> retrieval and book
# NLL at 8x the base's 256-token context with a 512-entry budget. Writes out/passkey/*/ and
# bench/results/longctx_passkey_cpu.{json,md}. Extra arguments go to every train.py call (e.g. --device=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-out/passkey}
CFG=configs/tiny_passkey.py
t0=$(date +%s)
step() { echo "=== $1 ($(( $(date +%s) - t0 ))s elapsed)"; }

step base
python train.py $CFG --out_dir=$OUT/base "$@"
step gist
python train.py $CFG --stage=gist --base_ckpt=$OUT/base/ckpt.pt --out_dir=$OUT/gist --batch_size=8 \
    --max_iters=200 --lr=1e-3 --min_lr=1e-4 --warmup_iters=20 --eval_interval=100 --log_interval=25 "$@"
step lens
python train.py $CFG --stage=lens --base_ckpt=$OUT/base/ckpt.pt --gist_ckpt=$OUT/gist/ckpt.pt --out_dir=$OUT/lens \
    --block_size=2048 --batch_size=4 --max_iters=100 --lr=1e-3 --min_lr=1e-4 --warmup_iters=10 \
    --eval_interval=50 --eval_iters=2 --log_interval=10 "$@"
step eval
python bench/longctx.py --ckpt $OUT/lens/ckpt.pt --histories 2048 --budgets 512 --docs 8 --horizon 32 \
    --retrieval-histories 192,2048 --retrieval-budget 512 --kinds passkey --depths 0.1,0.5,0.9 --trials 10 \
    --decode 0 --out bench/results/longctx_passkey_cpu
step done
