#!/usr/bin/env bash
# One prepared run on a GPU machine, most important first (step limits add up to 9 min 15 s), each step's log in
# $OUT so that whatever finished comes back:
#   1. the CUDA tests (golden numbers, fast == reference evaluation, bf16 recall, host syncs, a torchrun evaluate)
#   2. evaluation at Flickr 1K-test size (1,000 images, 5,000 texts, k_test 128) in bf16
#   3. one fine-tuning step, batch 32: straightforward vs fast, each in fp32 and bf16 (which change costs what);
#      fast bf16 again with the ViT off cuDNN attention too (the text encoder never uses it)
#   4. evaluation at full size in tf32; fp32 (and bf16 vs fp32 recall) at 1/5 of the size, where fp32 fits
#   5. operator profiles and host-sync counts of both fast paths (bf16), for whatever is still slow
# Packages that the GPU machine's image lacks (ruamel.yaml, for train_retrieval.py) travel as wheels in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ruamel.yaml
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh      (with the device tool: carry ['.whl'])
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
if compgen -G '.whl/*.whl' > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
  local name=$1 seconds=$2; shift 2
  echo "== $name: $*" | tee "$OUT/$name.txt"
  timeout "$seconds" "$@" >> "$OUT/$name.txt" 2>&1
  echo "== $name exit $?" | tee -a "$OUT/$name.txt"
  tail -4 "$OUT/$name.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, transformers, ruamel.yaml; print('torch', torch.__version__, 'timm', timm.__version__,
'transformers', transformers.__version__, 'ruamel.yaml', ruamel.yaml.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"
step test_cuda 70 python3 -m pytest -q -s tests/test_cuda.py
FULL="--images 1000 --texts 5000 --k_test 128 --reference_fraction 0.005"
FIFTH="--images 200 --texts 1000 --k_test 128"
step eval_bf16 120 python3 benchmarks/bench_eval.py $FULL --precision bf16
step train 100 python3 benchmarks/bench_train.py --batch 32 --steps 5 --warmup 2 --grad_ckpt_layers 4 \
  --variants straightforward:fp32,straightforward:bf16,fast:fp32,fast:bf16
step train_vit_without_cudnn_attention 40 python3 benchmarks/bench_train.py --batch 32 --steps 5 --warmup 2 \
  --grad_ckpt_layers 4 --variants fast:bf16 --no_cudnn_attention
step eval_tf32 70 python3 benchmarks/bench_eval.py $FULL --precision tf32
step eval_fp32 45 python3 benchmarks/bench_eval.py $FIFTH --precision fp32 --reference_fraction 0.02
step eval_bf16_vs_fp32 35 python3 benchmarks/bench_eval.py $FIFTH --precision bf16 --compare_fp32 --skip_reference
step train_profile 40 python3 benchmarks/bench_train.py --batch 32 --steps 2 --warmup 2 --grad_ckpt_layers 4 \
  --variants fast:bf16 --profile
step eval_profile 35 python3 benchmarks/bench_eval.py --images 100 --texts 500 --k_test 128 --precision bf16 \
  --skip_reference --profile
