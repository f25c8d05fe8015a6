#!/usr/bin/env bash
# GPU measurements for one H100/H200, each mode <= 8 minutes of wall time, compiles and autotuning included:
#   bash bench/run_gpu.sh all   # everything below in one call, shorter slices (the one-shot run)
#   bash bench/run_gpu.sh a     # kernels: GPU tier, pyramid sweep, RoPE and gist pooling, ncu of the pyramid forward
#   bash bench/run_gpu.sh b     # training throughput and MFU with compile = True: small, medium, mc_demo_gpu's base
#   bash bench/run_gpu.sh dry   # CPU: every phase's plumbing at toy sizes (tests/test_run_gpu.py, default tier)
#
# The lead's command (device tool `run`; the working tree is copied, $OUT comes back):
#   run(command="bash bench/run_gpu.sh all", timeout_s=540)      # the script ends itself by 470 s
#
# Phases of `all` (planned seconds; each runs under its own `timeout`, gets min(plan, time left minus 12 s for every
# later phase), and is skipped when under 12 s are left; a phase that fails or runs out keeps its partial JSON and the
# next one starts): env and ceilings 25 | Triton cache warm-up (parallel compiles) 45 | GPU tier (-m "gpu and not
# slow", rope, gist pooling, pyramid, model) 45 | pyramid sweep (T 2k..256k, D 128 then 64, vs SDPA; FlexAttention at
# 8k and 64k) 120 | RoPE + gist pooling benchmarks 35 | train small 80, medium 80, mc_demo_gpu base 60 (compile = True,
# random tokens) | ncu of the pyramid forward 20 (when ncu exists) | summary.
# Outputs in $OUT (else bench/results/), at most 8 files: run_<tag>.json (env, nvidia-smi, ceilings, phase log),
# gpu_tests_<tag>.xml, pyramid_<tag>.json, kernels_<tag>.json (pytest-benchmark), train_<tag>.jsonl, ncu_<tag>.txt,
# summary_<tag>.json; the short table (bench/gpu_summary.py) is printed last. Needs only the repository (no
# tokenizer, corpus, network, rustbpe or wandb). Without git: MC_COMMIT=<sha> bash bench/run_gpu.sh all
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-}"
case "$part" in a|b|all|dry) ;; *) echo "usage: bash bench/run_gpu.sh a|b|all|dry" >&2; exit 2 ;; esac
out="${OUT:-bench/results}"
mkdir -p "$out"
device=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  | tr ' ' _)
[ "$part" = dry ] || [ "$device" != cpu ] || { echo "part $part needs a CUDA GPU" >&2; exit 2; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "${MC_COMMIT:-nogit}")
tag="${device}_$(date +%F)_${commit}"
export PYTHONDONTWRITEBYTECODE=1 MC_CEILINGS="$out/run_$tag.json"
phases=$(mktemp)  # name, seconds given, seconds used, exit status: merged into run_<tag>.json by the summary
start=$(date +%s)
deadline=$((start + 470))
status=0

# phase NAME PLANNED LATER_PHASES CMD...: run CMD under min(PLANNED, left - 12 * LATER_PHASES) seconds (SIGINT first:
# pytest and the sweep still write their files), record it, never stop the script
phase() {
  local name=$1 plan=$2 later=$3; shift 3
  local left=$((deadline - $(date +%s) - 12 * later)) t0 rc
  local s=$((plan < left ? plan : left))
  if [ "$s" -lt 12 ]; then printf '%s\t0\t0\tskipped\n' "$name" >> "$phases"; echo "== $name: skipped" >&2; return; fi
  echo "== $name (${s} s)" >&2
  t0=$(date +%s)
  timeout -s INT -k 10 "$s" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$s" $(( $(date +%s) - t0 )) "$rc" >> "$phases"
  [ "$rc" = 0 ] || status=1
}

warm_cases="lod bench,rope bench,gist bench,rope train,rope p-RoPE,rope gpu B4"
tier=(tests/test_rope.py tests/test_gist_pool.py tests/test_lod_attention.py tests/test_model.py)
kern_k="(rope and B4-T4096 and (triton or compiled)) or (gist_pool and B8-T8192-H12-D64-K32 and triton)"
# throughput with compile = True on random ids, one line of train_<tag>.jsonl per config
train=(python bench/train_throughput.py --random-tokens --log-every=5 --compile=True --jsonl "$out/train_$tag.jsonl"
       --tag "$tag")
demo=(--vocab=1024 --retrieval_mix=0 --copy_steps=0 --short_steps=0)  # the demo's base recipe minus its drills
ncu_cmd="exec ncu --nvtx --nvtx-include prof/ --kernel-name regex:lod_attn_fwd --section SpeedOfLight \
  --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis python bench/pyramid_sweep.py --ncu \
  > $out/ncu_$tag.txt 2>&1"
ncu_phase() {  # exec: the time slice's signal reaches ncu itself
  if command -v ncu > /dev/null; then phase ncu "$1" 0 sh -c "$ncu_cmd"
  else echo "ncu not installed: skipped" > "$out/ncu_$tag.txt"; printf 'ncu\t0\t0\tabsent\n' >> "$phases"; fi
}

case "$part" in
  all|a)
    long=$([ "$part" = a ] && echo 2 || echo 1)  # part a: each phase twice as long
    phase env 25 8 python bench/gpu_env.py "$out/run_$tag.json"
    phase warm $((45 * long)) 7 python bench/compile_sm90.py --warm "$(nproc)" --only "$warm_cases"
    phase gpu_tier $((45 * long)) 6 python -m pytest -m "gpu and not slow" "${tier[@]}" -q -p no:cacheprovider \
      --junitxml "$out/gpu_tests_$tag.xml"
    phase pyramid $((120 * long)) 5 python bench/pyramid_sweep.py --out "$out/pyramid_$tag.json" \
      --budget $((100 * long))
    phase kernels $((35 * long)) 4 env MC_BENCH_ROUNDS=10 python -m pytest bench/ --benchmark-only -q \
      -p no:cacheprovider -k "$kern_k" --benchmark-json "$out/kernels_$tag.json"
    if [ "$part" = all ]; then
      phase train_small 80 3 "${train[@]}" configs/small.py --steps=25
      phase train_medium 80 2 "${train[@]}" configs/medium.py --steps=15 --grad_accum=4
      phase train_demo 60 1 "${train[@]}" configs/mc_demo_gpu.py --steps=25 "${demo[@]}"
    fi
    ncu_phase $((20 * long))
    ;;
  b)
    phase env 25 4 python bench/gpu_env.py "$out/run_$tag.json"
    phase train_small 130 3 "${train[@]}" configs/small.py --steps=40
    phase train_medium 130 2 "${train[@]}" configs/medium.py --steps=20 --grad_accum=4
    phase train_demo 100 1 "${train[@]}" configs/mc_demo_gpu.py --steps=40 "${demo[@]}"
    phase compile_test 60 0 python -m pytest -m gpu tests/test_compile.py -q -p no:cacheprovider
    ;;
  dry)  # the same steps on the CPU at toy sizes: plans, stand-in timers, the torch reference, a tiny training run
    phase env 60 5 python bench/gpu_env.py "$out/run_$tag.json"
    phase warm 60 4 python bench/compile_sm90.py --list --only "$warm_cases"
    phase pyramid 120 3 env MC_KERNELS=torch python bench/pyramid_sweep.py --dry --out "$out/pyramid_$tag.json"
    phase kernels 200 2 env MC_BENCH_STANDIN=1 TRITON_INTERPRET=1 python -m pytest bench/ --benchmark-only -q \
      -p no:cacheprovider -k "standin and triton and (rope or gist)" --benchmark-json "$out/kernels_$tag.json"
    phase train_tiny 200 1 "${train[@]}" configs/tiny.py --steps=4 --vocab=512 --log-every=2 --device=cpu \
      --compile=False --n_layer=1 --n_head=2 --n_embd=32 --block_size=32 --batch_size=2 --grad_accum=1
    ncu_phase 30
    ;;
esac
python bench/gpu_summary.py "$out" --tag "$tag" --phases "$phases" --seconds $(( $(date +%s) - start ))
rm -f "$phases"
exit "$status"
