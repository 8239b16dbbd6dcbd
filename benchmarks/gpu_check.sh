#!/usr/bin/env bash
# One prepared run on a GPU machine: the CUDA tests, then both benchmarks at Flickr 1K-test size.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh   (logs go to $OUT)
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -s tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/test_cuda.txt"
for p in bf16 tf32; do
  timeout 150 python3 benchmarks/bench_eval.py --images 1000 --texts 5000 --k_test 128 --precision $p \
    --reference_fraction 0.005 2>&1 | tee -a "$OUT/bench_eval.txt"
done
for p in bf16 tf32; do
  timeout 120 python3 benchmarks/bench_train.py --batch 32 --steps 5 --warmup 2 --grad_ckpt_layers 4 --precision $p \
    2>&1 | tee -a "$OUT/bench_train.txt"
done
