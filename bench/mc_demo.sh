#!/usr/bin/env bash
# The MegaContext demonstration on the CPU (issue 9), one command: prepare (1,024-token BPE) -> base with the retrieval
# mix -> gate (in-block retrieval >= 0.95, or stop) -> gist -> lens (two teachers: counterfactual and attention; the
# one with the better val retrieval is kept) -> the harness on val and test -> bench/results/mc_demo_cpu.{json,md,png}.
# Every stage is resumable: a finished stage (its checkpoint at max_iters) is skipped, an interrupted one resumed.
#     bash bench/mc_demo.sh                 # ~30 minutes on 2 CPU cores
#     bash bench/mc_demo.sh --device=cpu    # extra arguments go to every train.py call
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-out/mc_demo}
DATA=${DATA_DIR:-data/pg1k}
CFG=configs/mc_demo.py
t0=$(date +%s)
step() { echo "=== $1 ($(( $(date +%s) - t0 ))s elapsed)"; }

# run_stage NAME ITERS ARGS...: train.py unless NAME's checkpoint already reached ITERS steps; resume a partial one
run_stage() {
    local name=$1 iters=$2; shift 2
    local ck=$OUT/$name/ckpt.pt init=scratch
    if [ -f "$ck" ]; then
        if python -c "import sys, torch; sys.exit(torch.load('$ck', map_location='cpu', weights_only=False)['step'] < $iters)"; then
            echo "$name: done ($ck)"; return 0
        fi
        init=resume
    fi
    python train.py $CFG --data_dir=$DATA --out_dir=$OUT/$name --max_iters=$iters --init_from=$init "$@"
}

step prepare
[ -f $DATA/meta.json ] || python prepare.py --vocab-size 1024 --out $DATA
step base
run_stage base 1600 "$@"
step gate
python bench/longctx.py --ckpt $OUT/base/ckpt.pt --split val --gate 0.95 --trials 50
step gist
run_stage gist 80 --stage=gist --base_ckpt=$OUT/base/ckpt.pt --block_size=4096 --batch_size=1 --lr=1e-3 \
    --min_lr=1e-4 --warmup_iters=15 --eval_interval=40 --eval_iters=2 --log_interval=10 --gist_w0_max=128 \
    --gist_w1_max=48 "$@"
for teacher in counterfactual attention; do
    step "lens ($teacher)"
    block=4096; [ $teacher = attention ] && block=512  # the attention teacher needs the whole history in the block
    run_stage lens_$teacher 100 --stage=lens --base_ckpt=$OUT/base/ckpt.pt --gist_ckpt=$OUT/gist/ckpt.pt \
        --lens_teacher=$teacher --block_size=$block --batch_size=4 --lr=3e-3 --min_lr=3e-4 --warmup_iters=10 \
        --eval_interval=50 --eval_iters=2 --log_interval=10 "$@"
done
step "harness (val: pick the teacher; test: report)"
for teacher in counterfactual attention; do
    python bench/longctx.py --ckpt $OUT/lens_$teacher/ckpt.pt --split val --retrieval-methods lens \
        --histories '' --controls '' --decode 0 --no-plot --out $OUT/select_$teacher > /dev/null
done
best=$(python - "$OUT" <<'PY'
import json, sys
acc = {t: json.load(open(f"{sys.argv[1]}/select_{t}.json"))["summary"]["retrieval"]["lens"] for t in ("counterfactual", "attention")}
mean = {t: sum(v.values()) / len(v) for t, v in acc.items()}
print(max(mean, key=mean.get))
PY
)
echo "lens teacher kept: $best"
for split in val test; do
    python bench/longctx.py --ckpt $OUT/lens_$best/ckpt.pt --split $split --retrieval-histories 1024,2048,4096 \
        --out $OUT/harness_$split > /dev/null
done
python bench/mc_report.py --out bench/results/mc_demo_cpu --val $OUT/harness_val.json --test $OUT/harness_test.json \
    --select counterfactual=$OUT/select_counterfactual.json attention=$OUT/select_attention.json --kept $best \
    --seconds $(( $(date +%s) - t0 ))
step done
