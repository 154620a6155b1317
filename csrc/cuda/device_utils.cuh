// Device helpers shared by the kernels: reductions and the q x q dense algebra done by one thread.
//
// q (isoforms - 1) is small but not bounded, so the per-thread algebra works in place on
// row-major q x q arrays in global memory instead of fixed-size register arrays; each thread owns
// its own block and the blocks are reread from L1.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace splisosm {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// The order of additions is fixed, so results are reproducible run to run.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[1024 / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = 0;
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : T(0);
    total = warp_sum(total);
  }
  return total;
}

// In-place Cholesky factor of the q x q SPD matrix `a` (lower triangle, row-major; the strict
// upper triangle is left untouched). False if a pivot is not positive (or NaN).
template <typename T>
__device__ bool cholesky_in_place(T* a, int64_t q) {
  for (int64_t j = 0; j < q; ++j) {
    T pivot = a[j * q + j];
    for (int64_t k = 0; k < j; ++k) pivot -= a[j * q + k] * a[j * q + k];
    if (!(pivot > T(0))) return false;
    pivot = sqrt(pivot);
    a[j * q + j] = pivot;
    for (int64_t i = j + 1; i < q; ++i) {
      T s = a[i * q + j];
      for (int64_t k = 0; k < j; ++k) s -= a[i * q + k] * a[j * q + k];
      a[i * q + j] = s / pivot;
    }
  }
  return true;
}

// Solves L L^T x = b in place for the factor from cholesky_in_place; x[i * stride] holds b_i.
template <typename T>
__device__ void cholesky_solve_in_place(const T* L, int64_t q, T* x, int64_t stride) {
  for (int64_t i = 0; i < q; ++i) {
    T s = x[i * stride];
    for (int64_t k = 0; k < i; ++k) s -= L[i * q + k] * x[k * stride];
    x[i * stride] = s / L[i * q + i];
  }
  for (int64_t i = q - 1; i >= 0; --i) {
    T s = x[i * stride];
    for (int64_t k = i + 1; k < q; ++k) s -= L[k * q + i] * x[k * stride];
    x[i * stride] = s / L[i * q + i];
  }
}

// Overwrites the factor L from cholesky_in_place with (L L^T)^-1 (full, symmetric). First L^-1 in
// place, column by column (each entry reads only finished entries of its column and untouched
// ones of later columns); then row i of L^-T L^-1 needs columns >= i of L^-1 only, so it can go
// into the free upper triangle and the diagonal, and the lower triangle is mirrored last.
template <typename T>
__device__ void inverse_from_cholesky_in_place(T* a, int64_t q) {
  for (int64_t j = 0; j < q; ++j) {
    a[j * q + j] = T(1) / a[j * q + j];
    for (int64_t i = j + 1; i < q; ++i) {
      T s = 0;
      for (int64_t k = j; k < i; ++k) s += a[i * q + k] * a[k * q + j];
      a[i * q + j] = -s / a[i * q + i];
    }
  }
  for (int64_t i = 0; i < q; ++i) {
    for (int64_t j = i + 1; j < q; ++j) {
      T s = 0;
      for (int64_t k = j; k < q; ++k) s += a[k * q + i] * a[k * q + j];
      a[i * q + j] = s;
    }
    T s = 0;
    for (int64_t k = i; k < q; ++k) s += a[k * q + i] * a[k * q + i];
    a[i * q + i] = s;
  }
  for (int64_t i = 0; i < q; ++i)
    for (int64_t j = i + 1; j < q; ++j) a[j * q + i] = a[i * q + j];
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace splisosm
