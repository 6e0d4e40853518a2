#!/usr/bin/env bash
# One prepared GPU check: every `gpu`-marked test, then every benchmark, results as JSON in
# benchmarks/results/ and rendered to benchmarks/RESULTS.md with the GPU's name.
# Must finish in under 5 minutes on an H100.
#
#   bash benchmarks/device_check.sh            # on a CUDA machine
#   bash benchmarks/device_check.sh --dry-run  # on CPU: tiny shapes, proves the plumbing
#
# On the lent GPU machine (no diffsynth/modelscope there), wheels carried in .whl/ are
# installed into /tmp/site first; `artaug_kernels` is mapped onto kernels/artaug_kernels/ without pip.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; fi
RESULTS=${ARTAUG_RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! python3 -c "import artaug_kernels" 2>/dev/null; then
  SITE=/tmp/artaug-site
  mkdir -p "$SITE"
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 1
  fi
  ln -sfn "$PWD/kernels/artaug_kernels" "$SITE/artaug_kernels"
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
run() {  # run NAME CMD...: time-boxed step; a failure is recorded, later steps still run
  local name=$1; shift
  local t0=$(date +%s)
  echo "=== $name: $*"
  timeout "${STEP_TIMEOUT:-150}" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || status=1
}

if [ -z "$DRY" ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  # One kernel config per dtype in tests (autotuning belongs to the benchmarks).
  ARTAUG_TEST_GPU=1 ARTAUG_AUTOTUNE=0 run gpu-tests python3 -m pytest -q -m gpu tests -p no:cacheprovider \
    --junitxml="$RESULTS/gpu_tests.xml"
fi
# Sized so the whole check stays under 5 minutes on an H100 (each step is also time-boxed).
GPU_ARGS_bench_attention="--rep-ms 30"
GPU_ARGS_bench_flux_step="--time-budget 110"
# bench_quantized_memory needs torchao and bitsandbytes there too: carry their wheels in .whl/
# (`pip download torchao bitsandbytes --no-deps -d .whl`); without them that step fails, named.
for bench in bench_lora_merge:lora_merge bench_attention:attention bench_flux_step:flux_step bench_regional:regional \
    bench_quantized_memory:quantized_memory; do
  name=${bench%%:*}
  script=benchmarks/$name.py
  [ -f "$script" ] || continue
  extra=""
  if [ -z "$DRY" ]; then extra_var="GPU_ARGS_$name"; extra=${!extra_var:-}; fi
  run "$name" python3 "$script" --out "$RESULTS/${bench##*:}.json" $DRY $extra
done
run render python3 benchmarks/render_results.py --results "$RESULTS" --out "${ARTAUG_RESULTS_MD:-benchmarks/RESULTS.md}"
exit $status
