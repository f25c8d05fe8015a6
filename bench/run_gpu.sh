#!/usr/bin/env bash
# GPU measurements in parts that each fit 8 minutes of one H100/H200, compiles included (one part per device call):
#   bash bench/run_gpu.sh a     # kernel GPU tier (-m "gpu and not slow") + kernel benchmarks; the device's copy
#                               # bandwidth and bf16 GEMM rate are measured in the same run, every figure is also a
#                               # fraction of them (bench/conftest.py)
#   bash bench/run_gpu.sh b     # training throughput and MFU, configs/small.py and configs/medium.py on random ids
#   bash bench/run_gpu.sh dry   # CPU smoke of the same steps (plans, a tiny training run, the table); the CI runs it
# Needs only the repository: no tokenizer, corpus, network or rustbpe; FlexAttention or torch.compile missing skips.
# JSON goes to $OUT when set, else bench/results/; the short table (bench/gpu_summary.py) is printed last. Without
# a git checkout, pass the commit: MC_COMMIT=$(git rev-parse --short HEAD) bash bench/run_gpu.sh a
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-}"
case "$part" in a|b|dry) ;; *) echo "usage: bash bench/run_gpu.sh a|b|dry" >&2; exit 2 ;; esac
out="${OUT:-bench/results}"
mkdir -p "$out"
device=$(python -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tr ' ' _)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo "${MC_COMMIT:-nogit}")
tag="${device}_$(date +%F)_${commit}"
export PYTHONDONTWRITEBYTECODE=1
status=0
stop() { local s=$1; shift; timeout -s INT -k 5 "$s" "$@"; }  # SIGINT: pytest still writes its JSON and XML
# the headline kernel benchmarks (seconds each): RoPE and gist pooling fwd/bwd/full; the T = 65,536 pyramid fwd and
# fwd+bwd against dense SDPA and FlexAttention
declare -A bench_k=([rope]="rope and B4-T4096 and (triton or compiled)"
                    [gist]="gist_pool and B8-T8192-H12-D64-K32 and triton"
                    [lod]="lod_attention and T65536-H16-D128 and (triton or sdpa or flex) and (fwd or full)")
declare -A bench_s=([rope]=45 [gist]=20 [lod]=130)
case "$part" in
  a)
    [ "$device" != cpu ] || { echo "part a needs a CUDA GPU" >&2; exit 2; }
    # fill Triton's cache with every kept config in parallel: the steps below then compile nothing
    stop 80 python bench/compile_sm90.py --warm "$(nproc)" || status=$?
    stop 180 python -m pytest -m "gpu and not slow" tests/test_rope.py tests/test_gist_pool.py \
      tests/test_lod_attention.py tests/test_model.py -q -p no:cacheprovider --junitxml "$out/gpu_tests_$tag.xml" \
      || status=$?
    for family in "${!bench_k[@]}"; do  # one JSON per family: a timeout loses one family, not all
      MC_BENCH_ROUNDS=10 stop "${bench_s[$family]}" python -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
        -k "${bench_k[$family]}" --benchmark-json "$out/kernels_${family}_$tag.json" || status=$?
    done
    ;;
  b)
    [ "$device" != cpu ] || { echo "part b needs a CUDA GPU" >&2; exit 2; }
    stop 200 python bench/train_throughput.py configs/small.py --random-tokens --steps=40 --out "$out" \
      --tag "$tag" || status=$?
    stop 240 python bench/train_throughput.py configs/medium.py --random-tokens --steps=20 --grad_accum=4 \
      --out "$out" --tag "$tag" || status=$?
    ;;
  dry)
    python bench/compile_sm90.py --list --subset ci > /dev/null
    all_k="(${bench_k[rope]}) or (${bench_k[gist]}) or (${bench_k[lod]})"  # the selections pick what they should
    n=$(python -m pytest bench/ --collect-only -q -p no:cacheprovider -k "$all_k" | grep -c "::")
    [ "$n" = 15 ] || { echo "the benchmark selections pick $n benchmarks, expected 15" >&2; exit 1; }
    python bench/train_throughput.py configs/tiny.py --random-tokens --vocab=512 --steps=4 --log-every=2 \
      --out "$out" --tag "$tag" --device=cpu --compile=False --n_layer=1 --n_head=2 --n_embd=32 --block_size=32 \
      --batch_size=2 --grad_accum=1 > /dev/null
    ;;
esac
python bench/gpu_summary.py "$out" --tag "$tag"
exit "$status"
