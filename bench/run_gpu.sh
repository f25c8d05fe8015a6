#!/usr/bin/env bash
# Every GPU measurement in one command, for one H100 (or any CUDA GPU):
#   bash bench/run_gpu.sh          # needs data/pg/tokenizer.json (python prepare.py, here or carried)
# 1. the GPU test tier (real shapes, bf16, autotune), 2. the kernel benchmarks (pytest-benchmark JSON),
# 3. training throughput of configs/small.py and configs/medium.py (tokens/s, MFU), 4. MegaContext decode latency. Results go to bench/results/
# (and to $OUT too when it is set, as on the device machine). Throughput only needs the tokenizer: the corpus is a
# synthetic one tokenized with it, so the vocabulary (and so the cost per token) is the real one.
set -uo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || exit 1
tag="${gpu}_$(date +%F)_$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
mkdir -p bench/results
python -m pytest -m gpu tests/ -q -p no:cacheprovider 2>&1 | tee "bench/results/gpu_tests_${tag}.txt"
python -m pytest bench/ --benchmark-only -q -p no:cacheprovider --benchmark-json "bench/results/kernels_${tag}.json"
mkdir -p data/throughput && cp data/pg/tokenizer.json data/throughput/
python prepare.py --synthetic --out data/throughput --syn-docs 64 --syn-chars 200000 >/dev/null
python bench/train_throughput.py configs/small.py --data_dir=data/throughput --steps=60
python bench/train_throughput.py configs/medium.py --data_dir=data/throughput --steps=30 --grad_accum=4
python bench/decode_latency.py configs/small.py --device cuda --policy lens
python bench/decode_latency.py configs/small.py --device cuda --policy recency
[ -n "${OUT:-}" ] && cp bench/results/*"${tag}"* bench/results/train_*.json bench/results/decode_latency_*.json "$OUT"/ 2>/dev/null
exit 0
