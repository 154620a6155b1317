#!/usr/bin/env bash
# The whole GPU check in one device run (see bench/GPU_RUNBOOK.md): build on the GPU machine,
# the CUDA tests, the pipeline benchmarks (joint_gd, then marginal_newton) and the op benchmark,
# in order of importance, each under its own time limit and all within SPLISOSM_GPU_DEADLINE
# seconds (default 560, under the device tool's 10 minutes per command). Logs go to $OUT (the
# device tool's return folder) or bench/out.
#
# Usage (from the repository root, wheels of missing packages in .whl/):
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out="${OUT:-$repo/bench/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
deadline=$(( $(date +%s) + ${SPLISOSM_GPU_DEADLINE:-560} ))

# step NAME LIMIT CMD...: runs CMD with at most LIMIT seconds (less if the deadline is nearer),
# its output also in $out/NAME.log.
step() {
  local name=$1 limit=$2 left
  shift 2
  left=$(( deadline - $(date +%s) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $name: skipped, ${left} s left before the deadline"
    return
  fi
  echo "== $name (limit ${limit} s)"
  local t0
  t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "== $name: rc=$rc after $(( $(date +%s) - t0 )) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
if compgen -G ".whl/*.whl" > /dev/null; then
  # Into the interpreter's environment; where that is read-only, into a folder on the paths that
  # Python and CMake's find_package (Eigen's config under cmeel.prefix) search.
  if ! python3 -m pip install -q --no-index --no-deps .whl/*.whl; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site CMAKE_PREFIX_PATH=/tmp/site/cmeel.prefix
  fi
fi

step build 240 python3 -m pip install --no-build-isolation --no-deps -v -Cbuild-dir=build .
# From /tmp, pytest imports the installed package (with the compiled _C), not python/.
step cuda-tests 150 bash -c "cd /tmp && python3 -m pytest -q -p no:cacheprovider -ra $repo/tests/ops/test_cuda.py"
step pipeline-small 90 python3 bench/bench_cuda.py pipeline --preset small
step pipeline-large-subset 90 python3 bench/bench_cuda.py pipeline --preset large --genes 2000 --no-du-test
step ops 60 python3 bench/bench_cuda.py ops
step pipeline-large 400 python3 bench/bench_cuda.py pipeline --preset large --no-du-test
step pipeline-small-marginal 90 python3 bench/bench_cuda.py pipeline --preset small --method marginal_newton
echo "== done, $(( deadline - $(date +%s) )) s before the deadline"
