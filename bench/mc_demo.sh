#!/usr/bin/env bash
# The MegaContext demonstration, one command: prepare (1,024-token BPE) -> base with the retrieval mix -> gate
# (in-block retrieval >= the size's threshold, or stop) -> gist -> lens (two teachers: counterfactual and attention;
# the one with the better val retrieval is kept) -> the harness on val and test -> mc_report.py's JSON, markdown and
# PNG in $OUT (default bench/results/) as mc_demo_<size>.*. Every stage is resumable: a finished stage (its
# checkpoint at max_iters) is skipped, an interrupted one resumed.
#     bash bench/mc_demo.sh                  # --size cpu: configs/mc_demo.py, ~30 minutes on 2 CPU cores
#     bash bench/mc_demo.sh --size gpu       # configs/mc_demo_gpu.py on one H100/H200, <= 9 minutes (see below)
#     bash bench/mc_demo.sh --size smoke     # the same chain at toy sizes on a synthetic corpus, ~1 minute on a CPU
#     bash bench/mc_demo.sh --device=cpu     # arguments after the size go to every train.py call
# Missing data are prepared from the corpus alone with the committed 1,024-token BPE (tokenizers/pg1k.json: tiktoken,
# no rustbpe; the gpu size's first 120 train books, 13.6M tokens, in ~5 s).
# Environment: RUN_DIR (checkpoints, harness JSON; default out/mc_demo[_gpu|_smoke]), DATA_DIR, OUT (the report),
# CORPUS (the books, default ../shared/data/pg).
set -euo pipefail
cd "$(dirname "$0")/.."
size=cpu
case "${1:-}" in
    --size) size=${2:-}; shift 2 ;;
    --size=*) size=${1#--size=}; shift ;;
esac
t0=$(date +%s)
step() { echo "=== $1 ($(( $(date +%s) - t0 ))s elapsed)"; }
command="bash bench/mc_demo.sh --size $size${*:+ $*}"

# Per size: CFG, DATA, the base's steps, the gate, each stage's arguments and the harness's.
case "$size" in
  cpu)
    RUN=${RUN_DIR:-out/mc_demo} CFG=configs/mc_demo.py DATA=${DATA_DIR:-data/pg1k} base_iters=1600 gist_iters=80 lens_iters=100
    prep=(--tokenizer tokenizers/pg1k.json)
    base_args=()
    gate_args=(--gate 0.95 --trials 50)
    gist_args=(--block_size=4096 --batch_size=1 --lr=1e-3 --min_lr=1e-4 --warmup_iters=15 --eval_interval=40
               --eval_iters=2 --log_interval=10 --gist_w0_max=128 --gist_w1_max=48)
    lens_args=(--batch_size=4 --lr=3e-3 --min_lr=3e-4 --warmup_iters=10 --eval_interval=50 --eval_iters=2
               --log_interval=10)
    lens_blocks=(4096 512)  # counterfactual, attention (the attention teacher needs the whole history in the block)
    harness=(--retrieval-histories 1024,2048,4096)
    select=() ;;
  gpu)  # sized by estimate for one H100/H200 (base ~4 min, gist + lens ~3, harness ~2); not yet run on one
    RUN=${RUN_DIR:-out/mc_demo_gpu} CFG=configs/mc_demo_gpu.py DATA=${DATA_DIR:-data/pg1k_gpu} base_iters=2400 gist_iters=150 lens_iters=150
    prep=(--tokenizer tokenizers/pg1k.json --max-docs 120)
    base_args=()
    gate_args=(--gate 0.98 --trials 100)
    gist_args=(--block_size=16384 --batch_size=2 --lr=1e-3 --min_lr=1e-4 --warmup_iters=20 --eval_interval=75
               --eval_iters=2 --log_interval=25 --gist_w0_max=512 --gist_w1_max=192)
    lens_args=(--batch_size=8 --lr=3e-3 --min_lr=3e-4 --warmup_iters=15 --eval_interval=75 --eval_iters=2
               --log_interval=25)
    lens_blocks=(16384 1024)
    harness=(--histories 1024 --budgets 256 --docs 40 --retrieval-budget 1024
             --retrieval-histories 8192,65536,1048576 --stream 8192)
    select=(--retrieval-histories 8192,65536) ;;
  smoke)  # every step of the chain at toy sizes: checks the plumbing in seconds, measures nothing
    RUN=${RUN_DIR:-out/mc_demo_smoke} CFG=configs/mc_demo.py base_iters=4
    DATA=${DATA_DIR:-$RUN/data} gist_iters=2 lens_iters=2
    prep=(--synthetic --tokenizer tokenizers/pg1k.json --syn-docs 8 --syn-chars 40000)
    base_args=(--n_layer=1 --n_head=2 --n_embd=32 --rope_heads=1 --block_size=256 --batch_size=2 --copy_steps=1
               --short_steps=0 --eval_interval=4 --eval_iters=1 --log_interval=2 --warmup_iters=1 --gist_layers=1)
    gate_args=(--gate 0.0 --trials 2)
    gist_args=(--block_size=1024 --batch_size=1 --eval_interval=2 --eval_iters=1 --log_interval=1
               --gist_w0_max=64 --gist_w1_max=16 --warmup_iters=1)
    lens_args=(--batch_size=1 --eval_interval=2 --eval_iters=1 --log_interval=1 --warmup_iters=1)
    lens_blocks=(1024 256)
    select=(--retrieval-histories 512 --depths 0.3 --trials 2 --stream 16)
    harness=(--histories 256 --docs 2 --windows 1 --methods full,truncation,lens --decode 0
             --retrieval-methods truncation,lens --controls no_needle "${select[@]}") ;;
  *) echo "error: --size must be cpu, gpu or smoke, got '$size'" >&2; exit 2 ;;
esac
REPORT=${OUT:-bench/results}
mkdir -p "$REPORT"

# run_stage NAME ITERS ARGS...: train.py unless NAME's checkpoint already reached ITERS steps; resume a partial one
run_stage() {
    local name=$1 iters=$2; shift 2
    local ck=$RUN/$name/ckpt.pt init=scratch
    if [ -f "$ck" ]; then
        if python -c "import sys, torch; sys.exit(torch.load('$ck', map_location='cpu', weights_only=False)['step'] < $iters)"; then
            echo "$name: done ($ck)"; return 0
        fi
        init=resume
    fi
    python train.py $CFG --data_dir=$DATA --out_dir=$RUN/$name --max_iters=$iters --init_from=$init "$@"
}

step "prepare ($size)"
if [ ! -f "$DATA/meta.json" ]; then
    python prepare.py "${prep[@]}" ${CORPUS:+--data "$CORPUS"} --out "$DATA"
fi
step base
run_stage base $base_iters "${base_args[@]}" "$@"
step gate
python bench/longctx.py --ckpt $RUN/base/ckpt.pt --split val "${gate_args[@]}" --out $RUN/gate > /dev/null
step gist
run_stage gist $gist_iters --stage=gist --base_ckpt=$RUN/base/ckpt.pt "${gist_args[@]}" "$@"
teachers=(counterfactual attention)
for i in 0 1; do
    teacher=${teachers[$i]}
    step "lens ($teacher)"
    run_stage lens_$teacher $lens_iters --stage=lens --base_ckpt=$RUN/base/ckpt.pt --gist_ckpt=$RUN/gist/ckpt.pt \
        --lens_teacher=$teacher --block_size=${lens_blocks[$i]} "${lens_args[@]}" "$@"
done
step "harness (val: pick the teacher; test: report)"
for teacher in "${teachers[@]}"; do
    python bench/longctx.py --ckpt $RUN/lens_$teacher/ckpt.pt --split val --retrieval-methods lens \
        --histories '' --controls '' --decode 0 --no-plot "${select[@]}" --out $RUN/select_$teacher > /dev/null
done
best=$(python - "$RUN" <<'PY'
import json, sys
acc = {t: json.load(open(f"{sys.argv[1]}/select_{t}.json"))["summary"]["retrieval"]["lens"] for t in ("counterfactual", "attention")}
mean = {t: sum(v.values()) / max(len(v), 1) for t, v in acc.items()}
print(max(mean, key=mean.get))
PY
)
echo "lens teacher kept: $best"
for split in val test; do
    python bench/longctx.py --ckpt $RUN/lens_$best/ckpt.pt --split $split "${harness[@]}" --out $RUN/harness_$split \
        > /dev/null
done
python bench/mc_report.py --out "$REPORT/mc_demo_$size" --size $size --val $RUN/harness_val.json \
    --test $RUN/harness_test.json --gate $RUN/gate.json --base-log $RUN/base/log.jsonl \
    --select counterfactual=$RUN/select_counterfactual.json attention=$RUN/select_attention.json --kept $best \
    --seconds $(( $(date +%s) - t0 )) --command "$command"
step done
