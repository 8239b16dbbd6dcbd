#!/usr/bin/env bash
# One prepared run on a GPU machine, most important first (time limits add up to 9 min 10 s, under the
# device tool's 10-minute call); each step writes its own log to $OUT, so what finished comes back:
#   1. the CUDA tests (golden numbers, fast == reference, bf16 recall, a torchrun evaluate)
#   2. evaluation at Flickr 1K-test size (1,000 images, 5,000 texts, k_test 128): bf16 (+ fp32 check), tf32
#   3. one fine-tuning step, batch 32: straightforward vs fast, each in fp32 and bf16 (which change costs what)
#   4. operator profiles of the fast paths (bf16), for whatever is still slow
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
  local name=$1 seconds=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "$seconds" "$@" >> "$OUT/$name.txt" 2>&1
  echo "== $name exit $?" | tee -a "$OUT/$name.txt"
  tail -4 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
step test_cuda 120 python3 -m pytest -q -s tests/test_cuda.py
FULL="--images 1000 --texts 5000 --k_test 128 --reference_fraction 0.005"
step eval_bf16 140 python3 benchmarks/bench_eval.py $FULL --precision bf16 --compare_fp32
step eval_tf32 80 python3 benchmarks/bench_eval.py $FULL --precision tf32
step train 110 python3 benchmarks/bench_train.py --batch 32 --steps 5 --warmup 2 --grad_ckpt_layers 4 \
  --variants straightforward:fp32,straightforward:bf16,fast:fp32,fast:bf16
step train_profile 50 python3 benchmarks/bench_train.py --batch 32 --steps 2 --warmup 2 --grad_ckpt_layers 4 \
  --variants fast:bf16 --profile
step eval_profile 50 python3 benchmarks/bench_eval.py --images 100 --texts 500 --k_test 128 --precision bf16 \
  --skip_reference --profile
