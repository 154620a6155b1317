#!/usr/bin/env bash
# Build and run every C++ microbenchmark (bench/*_bench.cpp) against the installed torch and Eigen.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_prefix=$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
purelib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cmake -S . -B build-bench -G Ninja -DCMAKE_BUILD_TYPE=Release -DSPLISOSM_BUILD_BENCH=ON \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$purelib/cmeel.prefix" \
  -DPython3_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build build-bench
for exe in build-bench/*_bench; do
  echo "== $(basename "$exe")"
  "$exe"
done
