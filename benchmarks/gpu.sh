#!/usr/bin/env bash
# The device check (issue 19), at most 8 minutes on one H100-class GPU:
#   1. the test suite without its multi-process tests, every model and tensor on the device (HF_SWITCH_TEST_DEVICE);
#   2. the layer, model, generation and memory benchmark suites in bf16: E = 8, 32, 128, dropless and capacity 1.25,
#      hf_switch against transformers' Switch, its experts implementations and the dense FFN / T5.
# usage: benchmarks/gpu.sh [DEVICE] [OUT]
#   DEVICE: cuda (default), or cpu for a quick run that shows the script works where no GPU is lent.
#   OUT: where versions.txt, tests.txt, benchmarks.txt and gpu_results.json go (default $OUT, else /tmp/gpu-check).
# The lent GPU machine has no network and its own torch: wheels of what it lacks (transformers, peft, datasets,
# evaluate versions this repo needs) travel in .whl/ and are installed into /tmp/site (docs/benchmarks.md).
set -uo pipefail
device="${1:-cuda}"
out="${2:-${OUT:-/tmp/gpu-check}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
quick=()
if [ "$device" = cpu ]; then quick=(--quick --rounds 1 --threads 2); fi

python3 - <<'PY' | tee "$out/versions.txt"
import platform, torch, transformers
name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {name}")
PY
HF_SWITCH_TEST_DEVICE="$device" timeout 240 python3 -m pytest -q -m "not slow" -p no:cacheprovider tests \
  > "$out/tests.txt" 2>&1
echo "tests: exit $? ($(tail -n 1 "$out/tests.txt"))"
timeout 210 python3 benchmarks/run.py "${quick[@]}" --device "$device" --dtype bfloat16 \
  --suites layer model generation memory --json "$out/gpu_results.json" 2>&1 | tee "$out/benchmarks.txt"
echo "benchmarks: exit ${PIPESTATUS[0]}"
