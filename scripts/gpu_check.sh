#!/usr/bin/env bash
# One prepared run on a GPU machine (H100 / H200, Python 3.12, torch with CUDA, nvcc, ninja, pytest): build the
# fused kernels of csrc/, run their correctness tests, run the kernel benchmark.  Everything it writes goes
# under $OUT (default ./gpu_check_out), at most 7 files:
#
#   env.txt          nvidia-smi, torch / CUDA versions, nvcc
#   build.log        the JIT build (ninja and compiler output), build_summary.log its one-line summary
#   tests.log        pytest tests/test_kernels_cuda.py (tests.xml: the same as JUnit XML)
#   bench.log        benchmarks/kernels.py's tables, kernels.json its full results
#
#   bash scripts/gpu_check.sh                       # about 6 minutes expected on an H200, 9 at most
#
# Optional wheels in .whl/ (fla-core for the comparison rows; megatron-core and what it lacks there for the
# end-to-end rows and the model tests) are installed into /tmp/site first; see docs/kernels.md.
# Exit status: 0 when the build, the tests and the benchmark all succeeded, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/memtrain_torch_ext}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version; } > "$OUT/env.txt" 2>&1

status=0
step() {  # step NAME LOG SECONDS command...: run with a time limit into LOG (and the terminal), report its status
  local name=$1 log=$2 limit=$3 t0=$SECONDS rc
  shift 3
  echo "== $name (limit $limit s)" | tee "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

summary() { cp "$TORCH_EXTENSIONS_DIR"/*/memtrain_kernels/build.log "$OUT/build_summary.log" 2>/dev/null; }

if ! step build "$OUT/build.log" 180 $PY -c "
import logging; logging.basicConfig(level=logging.INFO)
from pretrain.ops import kernels
print(kernels.load(verbose=True).info())"; then
  summary
  echo "the build failed: see $OUT/build.log; not running the tests and the benchmark"
  exit 1
fi
summary
step tests "$OUT/tests.log" 150 $PY -m pytest tests/test_kernels_cuda.py -q -p no:cacheprovider \
  --junitxml "$OUT/tests.xml"
step bench "$OUT/bench.log" 210 $PY benchmarks/kernels.py --out "$OUT/kernels.json" --budget-s 150
exit $status
