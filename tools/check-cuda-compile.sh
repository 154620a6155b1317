#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for Hopper (sm_90 SASS + compute_90 PTX) without torch, to catch
# errors and warnings in the kernels on machines with nvcc but no GPU. Objects go to a temporary
# directory that is removed afterwards. Fails on any error, and on any warning (-Werror style:
# nvcc's host-compiler and device warnings are promoted).
#
# Usage: tools/check-cuda-compile.sh          (NVCC=/path/to/nvcc to pick a compiler)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
command -v "$nvcc" >/dev/null || { echo "check-cuda-compile: nvcc not found" >&2; exit 1; }

shopt -s nullglob
sources=("$root"/csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check-cuda-compile: no csrc/cuda/*.cu files" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

status=0
for src in "${sources[@]}"; do
  name="$(basename "$src" .cu)"
  echo "nvcc $name.cu"
  # One file at a time on purpose: the shared build machines have few cores.
  if ! "$nvcc" -std=c++17 -O3 -c "$src" -o "$out/$name.o" \
      -I"$root/csrc" \
      -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
      -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
      -Xptxas -Werror; then
    status=1
  fi
done
if [ "$status" -ne 0 ]; then
  echo "check-cuda-compile: FAILED" >&2
else
  echo "check-cuda-compile: all ${#sources[@]} CUDA sources compile cleanly for sm_90"
fi
exit "$status"
