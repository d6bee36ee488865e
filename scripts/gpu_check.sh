#!/usr/bin/env bash
# The GPU checks of issue #22, as one bounded run on a lent CUDA machine (PyTorch, Triton and
# transformers installed; no vLLM, no network): the Triton kernels' and the fast cache's tests,
# then the generation-throughput benchmark on random-weight Llama-2-7B and Pythia-2.8B shapes.
#
#   OUT=/some/dir scripts/gpu_check.sh      # logs and results under $OUT
set -uo pipefail
OUT="${OUT:-results/gpu-check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import sys, torch, triton, transformers; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__, "| transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/environment.txt"
timeout "${TEST_TIMEOUT:-170}" "$PY" -m pytest -q -p no:cacheprovider -rs \
  tests/test_triton_kernels.py tests/test_hf_fast_cache.py 2>&1 | tee "$OUT/tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"
for shape in llama-2-7b pythia-2.8b; do
  timeout "${BENCH_TIMEOUT:-150}" "$PY" benchmarks/generation_throughput.py --shapes "$shape" --out "$OUT/$shape" \
    2>&1 | tee "$OUT/throughput-$shape.log"
  echo "benchmark $shape exit: ${PIPESTATUS[0]}" | tee -a "$OUT/throughput-$shape.log"
done
