#!/usr/bin/env bash
# The GPU check, in one go (about 5 minutes on an H100): the engine's and device decoding's GPU
# tests, then bench/bench_gpu.py. Run from anywhere; output also goes to $OUT/gpu_check.log.
#
#   bash bench/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh  # the same steps here, small, on the CPU
#
# Wheels in .whl/ (celery, kombu, redis, boto3, isal, ... : what the tests' conftest and `clipmask run`
# import, for a machine without them and without an index) are installed into $GPU_CHECK_SITE
# (default /tmp/site) and put on PYTHONPATH; no .whl/, no install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SITE=${GPU_CHECK_SITE:-/tmp/site}

main() {
  local started=$SECONDS
  echo "== gpu_check $(date -u +%FT%TZ) on $(hostname), device $DEVICE, $(git rev-parse --short HEAD 2>/dev/null || echo no-git)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl \
      || echo "!! wheel install failed"
    export PYTHONPATH="$PYTHONPATH:$SITE"
  fi
  if [ "$DEVICE" != cpu ]; then
    nvidia-smi || echo "!! nvidia-smi failed"
  fi
  "$PY" -c 'import sys, torch, torchvision, transformers, celery, boto3, tasks.cli, tests.conftest
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
    || echo "!! imports failed"

  echo "== pytest -m gpu ($((SECONDS - started)) s)"
  timeout 180 "$PY" -m pytest -q -m gpu tests/test_engine.py tests/test_device_decode.py tests/test_postprocess.py -p no:cacheprovider -rfEsP
  echo "pytest exit $?"

  echo "== bench_gpu.py ($((SECONDS - started)) s)"
  if [ "$DEVICE" = cpu ]; then
    timeout 600 "$PY" bench/bench_gpu.py --device cpu --shape tiny --images 24 --distinct 8 --batch-sizes 4 \
      --seconds 1 --threads 2 --diff-size 1600x1200 --budget 300
  else
    timeout 330 "$PY" bench/bench_gpu.py --device "$DEVICE" --budget "$((280 - (SECONDS - started)))"
  fi
  echo "bench exit $?"
  echo "== done in $((SECONDS - started)) s"
}

main 2>&1 | tee "$OUT/gpu_check.log"
