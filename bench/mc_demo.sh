#!/usr/bin/env bash
# The MegaContext demonstration, one command: prepare (1,024-token BPE) -> base with the retrieval mix (five tasks) ->
# gate (in-block retrieval of pass key and multi-key >= the size's threshold, or stop; every task's in-block accuracy
# reported) -> gist -> lens (three teachers of the query-conditioned LensNet: counterfactual, attention, oracle; the
# one with the best val retrieval is kept) -> the harness on test (every arm for the kept teacher, LensNet alone for
# the other two) -> mc_report.py's JSON, markdown and PNG in $OUT (default bench/results/) as mc_demo_<size>.*. Every
# stage is resumable: a finished stage (its checkpoint at max_iters, its result file) is skipped, an interrupted one
# resumed.
#     bash bench/mc_demo.sh                  # --size cpu: configs/mc_demo.py, ~40 minutes on 2 CPU cores
#     bash bench/mc_demo.sh --size gpu       # configs/mc_demo_gpu.py on one H100/H200, planned for <= 9 minutes
#     bash bench/mc_demo.sh --size smoke     # the same chain at toy sizes on a synthetic corpus, ~2 minutes on a CPU
#     bash bench/mc_demo.sh --size gpu --plan   # each stage's steps, estimated seconds and command; runs nothing
#     bash bench/mc_demo.sh --device=cpu     # arguments after the size (and --plan) go to every train.py call
# The estimates come from bench/mc_demo_times.tsv (seconds per step and per process start, each with how it was got).
# A size with a time budget (gpu: 540 s; BUDGET_S overrides, for any size) gives each harness run its share of what
# is left as longctx.py --time-limit: a run cut short still writes its results, the cells it did not finish marked
# partial, and so does the report.
# Missing data are prepared from the corpus alone with the committed 1,024-token BPE (tokenizers/pg1k.json: tiktoken,
# no rustbpe; the gpu size's first 120 train books, 13.6M tokens, in ~5 s). The GPU machine gets a copy of the working
# tree but not ../shared, so carry the books it reads (19 MB; .corpus/ is git-ignored), made here with
#     mkdir -p .corpus && xz -dc ../shared/data/pg/train.jsonl.xz | head -n 120 | xz -T2 > .corpus/train.jsonl.xz &&
#         cp ../shared/data/pg/{val,test}.jsonl.xz .corpus/
# and run there `OUT=$OUT CORPUS=.corpus bash bench/mc_demo.sh --size gpu` (or carry data/pg1k_gpu, 51 MB, instead).
# Environment: RUN_DIR (checkpoints, harness JSON; default out/mc_demo[_gpu|_smoke]), DATA_DIR, OUT (the report),
# CORPUS (the books, default ../shared/data/pg).
set -euo pipefail
cd "$(dirname "$0")/.."
size=cpu plan=
while [ $# -gt 0 ]; do
    case "$1" in
        --size) size=${2:-}; shift 2 ;;
        --size=*) size=${1#--size=}; shift ;;
        --plan) plan=1; shift ;;
        *) break ;;
    esac
done
t0=$(date +%s) planned=0  # planned: the seconds the plan's stages so far take (--plan's clock)
step() { [ -n "$plan" ] || echo "=== $1 ($(( $(date +%s) - t0 ))s elapsed)"; }
command="bash bench/mc_demo.sh --size $size${*:+ $*}"

# Per size: CFG, DATA, the base's steps, the gate, each stage's arguments and the harness's.
case "$size" in
  cpu)
    RUN=${RUN_DIR:-out/mc_demo} CFG=configs/mc_demo.py DATA=${DATA_DIR:-data/pg1k} base_iters=2000 gist_iters=80
    budget=${BUDGET_S:-}
    prep=(--tokenizer tokenizers/pg1k.json)
    base_args=()
    gate_args=(--gate 0.95 --trials 50)
    gist_args=(--block_size=4096 --batch_size=1 --lr=1e-3 --min_lr=1e-4 --warmup_iters=15 --eval_interval=40
               --eval_iters=2 --log_interval=10 --gist_w0_max=128 --gist_w1_max=48)
    lens_args=(--batch_size=4 --lr=3e-3 --min_lr=3e-4 --warmup_iters=10 --eval_interval=50 --eval_iters=2
               --log_interval=10)
    # per teacher: counterfactual, attention (it needs the whole history in the block), oracle
    lens_blocks=(4096 512 4096) lens_iters=(100 100 100) teacher_args=("" "" "")
    tasks=(--tasks passkey,multikey,multivalue,multiquery,vartrack)
    ret=(--retrieval-histories 1024,4096)  # 8x and 32x the budget of 128
    select=("${ret[@]}" --trials 10)
    harness=(--controls no_needle --control-trials 10) ;;
  gpu)  # sized by --plan for 540 s on one H100/H200 (base step measured on an H200, the rest estimated); not yet run
    RUN=${RUN_DIR:-out/mc_demo_gpu} CFG=configs/mc_demo_gpu.py DATA=${DATA_DIR:-data/pg1k_gpu} base_iters=1600
    gist_iters=100 budget=${BUDGET_S:-540}
    prep=(--tokenizer tokenizers/pg1k.json --max-docs 120)
    base_args=()
    gate_args=(--gate 0.98 --trials 100)
    gist_args=(--block_size=16384 --batch_size=2 --lr=1e-3 --min_lr=1e-4 --warmup_iters=20 --eval_interval=75
               --eval_iters=2 --log_interval=25 --gist_w0_max=512 --gist_w1_max=192)
    lens_args=(--batch_size=8 --lr=3e-3 --min_lr=3e-4 --warmup_iters=15 --eval_interval=75 --eval_iters=2
               --log_interval=25)
    # a counterfactual label costs a base forward per candidate (~520 per 16k-token context: ~0.28 s), a context
    # ~10k launched ops with any teacher: 2 and 4 contexts a step (the oracle teacher labels book text
    # counterfactually). The attention teacher's history must fit the base's 1,024-token block and exceed the budget,
    # so it trains LensNet at 512 entries (selection and harness: 1,024)
    lens_blocks=(16384 1024 16384) lens_iters=(60 60 60)
    teacher_args=("--batch_size=2" "--batch_size=4 --w_max=512" "--batch_size=2")
    tasks=(--tasks passkey,multikey,multivalue,multiquery,vartrack)
    ret=(--retrieval-budget 1024 --retrieval-histories 8192,65536,1048576 --trials 10)
    select=(--retrieval-budget 1024 --retrieval-histories 8192,65536 --trials 10)
    harness=(--histories 1024 --budgets 256 --docs 10 --windows 2 --controls no_needle --control-trials 10) ;;
  smoke)  # every step of the chain at toy sizes: checks the plumbing in seconds, measures nothing
    RUN=${RUN_DIR:-out/mc_demo_smoke} CFG=configs/mc_demo.py base_iters=4 budget=${BUDGET_S:-}
    DATA=${DATA_DIR:-$RUN/data} gist_iters=2
    prep=(--synthetic --tokenizer tokenizers/pg1k.json --syn-docs 8 --syn-chars 40000)
    base_args=(--n_layer=1 --n_head=2 --n_embd=64 --rope_heads=1 --block_size=256 --batch_size=2 --copy_steps=1
               --short_steps=0 --eval_interval=4 --eval_iters=1 --log_interval=2 --warmup_iters=1 --gist_layers=1)
    gate_args=(--gate 0.0 --trials 2)
    gist_args=(--block_size=1024 --batch_size=1 --eval_interval=2 --eval_iters=1 --log_interval=1
               --gist_w0_max=64 --gist_w1_max=16 --warmup_iters=1 --lens_query=0,1)  # (the 1-block base's layers)
    lens_args=(--batch_size=1 --eval_interval=2 --eval_iters=1 --log_interval=1 --warmup_iters=1 --lens_query=0,1)
    lens_blocks=(1024 256 1024) lens_iters=(2 2 2) teacher_args=("" "" "")
    tasks=(--tasks passkey,multikey,vartrack)
    ret=(--retrieval-histories 512 --depths 0.3 --trials 2 --stream 16)
    select=("${ret[@]}")
    harness=(--histories 256 --docs 2 --windows 1 --methods full,truncation,lens --decode 0
             --retrieval-methods truncation,lens,oracle --controls no_needle --control-trials 1) ;;
  *) echo "error: --size must be cpu, gpu or smoke, got '$size'" >&2; exit 2 ;;
esac
REPORT=${OUT:-bench/results}
TIMES=bench/mc_demo_times.tsv
[ -n "$plan" ] || mkdir -p "$REPORT"

# row STAGE: STAGE's line of $TIMES for this size (select_attention, harness_val: the select and harness lines)
row() {
    awk -F'\t' -v size=$size -v stage=$1 '$1 == size && ($2 == stage || index(stage, $2 "_") == 1) {print; exit}' $TIMES
}
# est STAGE STEPS: the plan's seconds for STAGE: its process start + STEPS x its seconds per step
est() { row $1 | awk -F'\t' -v n=$2 '{printf "%.0f", $4 + n * $3} END {if (!NR) printf "0"}'; }

# run STAGE STEPS CMD...: run CMD (`quiet CMD`: its stdout dropped); with --plan print STAGE's steps ('-': a
# process whose work is fixed by its arguments: one unit), estimated seconds, how the estimate was got and CMD
# instead, and advance the plan's clock
run() {
    local stage=$1 steps=$2 s a how cut=; shift 2
    if [ -z "$plan" ]; then step $stage; "$@"; return; fi
    s=$(est $stage ${steps/-/1})
    for a in "$@"; do  # a harness run stops at its --time-limit (after its process start)
        if [ "$cut" = next ]; then cut=$(( ${a%.*} + $(row $stage | cut -f4) )); fi
        [ "$a" != --time-limit ] || cut=next
    done
    how=$(row $stage | cut -f5)
    if [ -n "$cut" ] && [ $cut -lt $s ]; then how="(cut by its time limit; all of it: ~$s s) $how" s=$cut; fi
    planned=$(( planned + s ))
    [ "$1" = quiet ] && shift
    printf '%-21s %10s %5d s  %s\n   ' $stage "${steps/#[0-9]*/$steps steps}" $s "$how"
    for a in "$@"; do [[ -n $a && $a != *[[:space:]\<\>]* ]] && printf ' %s' "$a" || printf " '%s'" "$a"; done
    echo
}
quiet() { "$@" > /dev/null; }

# run_stage NAME ITERS ARGS...: train.py unless NAME's checkpoint already reached ITERS steps; resume a partial one
run_stage() {
    local name=$1 iters=$2; shift 2
    local ck=$RUN/$name/ckpt.pt init=scratch
    if [ -z "$plan" ] && [ -f "$ck" ]; then
        if python -c "import sys, torch
sys.exit(torch.load('$ck', map_location='cpu', weights_only=False)['step'] < $iters)"; then
            echo "$name: done ($ck)"; return 0
        fi
        init=resume
    fi
    run $name $iters python train.py $CFG --data_dir=$DATA --out_dir=$RUN/$name --max_iters=$iters \
        --init_from=$init "$@"
}

# time_limit STAGE: limit=(--time-limit S) for the harness run STAGE: an equal share, among the $runs_left harness
# runs not yet started, of what is left of the budget once the report's own seconds are set aside, less its process
# start (a run that finishes early leaves its share to the next ones); nothing without a budget
time_limit() {
    limit=()
    [ -n "$budget" ] || return 0
    local now left
    now=$(( $(date +%s) - t0 ))
    [ -z "$plan" ] || now=$planned
    left=$(( (budget - now - $(est report 1)) / runs_left - $(row $1 | cut -f4) ))
    limit=(--time-limit $(( left > 0 ? left : 0 )))
    runs_left=$(( runs_left - 1 ))
}

if [ -n "$plan" ]; then
    echo "plan: bash bench/mc_demo.sh --size $size (estimates from $TIMES; ${budget:+a budget of $budget s, }the" \
         "harness runs' --time-limit as they would be if every stage took its estimate)"
fi
if [ -n "$plan" ] || [ ! -f "$DATA/meta.json" ]; then
    run prepare - python prepare.py "${prep[@]}" ${CORPUS:+--data "$CORPUS"} --out "$DATA"
fi
run_stage base $base_iters "${base_args[@]}" "$@"
run gate - quiet python bench/longctx.py --ckpt $RUN/base/ckpt.pt --split val "${gate_args[@]}" "${tasks[@]}" \
    --gate-tasks passkey,multikey --out $RUN/gate
run_stage gist $gist_iters --stage=gist --base_ckpt=$RUN/base/ckpt.pt "${gist_args[@]}" "$@"
teachers=(counterfactual attention oracle)
for i in 0 1 2; do
    teacher=${teachers[$i]}
    run_stage lens_$teacher ${lens_iters[$i]} --stage=lens --base_ckpt=$RUN/base/ckpt.pt --gist_ckpt=$RUN/gist/ckpt.pt \
        --lens_teacher=$teacher --block_size=${lens_blocks[$i]} "${lens_args[@]}" ${teacher_args[$i]} "$@"
done
# harness NAME STAGE ARGS...: bench/longctx.py into $RUN/NAME.json (time-limited as STAGE) unless it is there
harness() {
    local name=$1 stage=$2; shift 2
    time_limit $stage
    if [ -z "$plan" ] && [ -f "$RUN/$name.json" ]; then echo "$name: done"; return 0; fi
    run $name - quiet python bench/longctx.py "$@" "${limit[@]}" --out $RUN/$name
}
runs_left=6  # three selections, the kept teacher's test harness, the other two teachers' test runs
lens_only=(--retrieval-methods lens --histories '' --controls '' --decode 0 --no-plot --in-block-trials 0 "${tasks[@]}")
for teacher in "${teachers[@]}"; do
    harness select_$teacher select --ckpt $RUN/lens_$teacher/ckpt.pt --split val "${lens_only[@]}" "${select[@]}"
done
best=oracle  # (--plan: a stand-in for the teacher the selection keeps)
[ -n "$plan" ] || best=$(python - "$RUN" "${teachers[@]}" <<'PY'
import json, sys
run, teachers = sys.argv[1], sys.argv[2:]
acc = {t: json.load(open(f"{run}/select_{t}.json"))["summary"]["tasks"] for t in teachers}
mean = {t: sum(c for v in a.values() for c in v.get("lens", {}).values())
        / max(1, sum(len(v.get("lens", {})) for v in a.values())) for t, a in acc.items()}
print(max(mean, key=mean.get))
PY
)
[ -n "$plan" ] || echo "lens teacher kept: $best"
harness harness_test harness --ckpt $RUN/lens_$best/ckpt.pt --split test --in-block-trials 30 "${tasks[@]}" \
    "${ret[@]}" "${harness[@]}"
others=()
for teacher in "${teachers[@]}"; do
    [ "$teacher" = "$best" ] && continue
    harness test_$teacher select --ckpt $RUN/lens_$teacher/ckpt.pt --split test "${lens_only[@]}" "${ret[@]}"
    others+=("$teacher=$RUN/test_$teacher.json")
done
run report - python bench/mc_report.py --out "$REPORT/mc_demo_$size" --size $size --test $RUN/harness_test.json \
    --gate $RUN/gate.json --base-log $RUN/base/log.jsonl --kept $best \
    --select $(for t in "${teachers[@]}"; do printf '%s=%s ' "$t" "$RUN/select_$t.json"; done) \
    --test-teachers "$best=$RUN/harness_test.json" "${others[@]}" \
    --seconds $(( $(date +%s) - t0 )) --command "$command"
if [ -n "$plan" ]; then
    echo "total ~$planned s${budget:+ (budget $budget s)}"
fi
step done
