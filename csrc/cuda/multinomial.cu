// CUDA kernels of the multinomial-softmax ops (semantics: csrc/cpu/multinomial_cpu.cpp).
#include <algorithm>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"

namespace splisosm {
namespace cuda {
namespace {

constexpr int kMultinomThreads = 256;
constexpr int kInfoThreads = 256;

// One thread per (gene, spot), blocks never straddle genes, so a block reduction yields one
// partial log-likelihood per block without atomics (and the sum order is fixed). Q > 0 fixes q at
// compile time (loops unroll, probabilities stay in registers); Q == 0 reads q at run time and
// recomputes each probability where it is needed instead of caching an unbounded array.
template <typename T, int Q>
__global__ void __launch_bounds__(kMultinomThreads)
    multinom_terms_kernel(const T* __restrict__ eta, const T* __restrict__ counts, int64_t n,
                          int64_t q_dyn, int64_t blocks_per_gene, T* __restrict__ ll_partial,
                          T* __restrict__ grad, T* __restrict__ W, int* __restrict__ bad) {
  const int64_t q = Q > 0 ? Q : q_dyn;
  const int64_t m = q + 1;
  const int64_t g = blockIdx.x / blocks_per_gene;
  const int64_t s = (blockIdx.x % blocks_per_gene) * blockDim.x + threadIdx.x;
  T ll = 0;
  if (s < n) {
    const int64_t idx = g * n + s;
    const T* e = eta + idx * q;
    const T* y = counts + idx * m;
    // Logits shifted by the largest one (the reference logit 0 included) cannot overflow.
    T mx = 0;
    for (int64_t j = 0; j < q; ++j) mx = max(mx, e[j]);
    T cache[Q > 0 ? Q : 1];
    T z = 0;
    for (int64_t j = 0; j < q; ++j) {
      const T ej = exp(e[j] - mx);
      if constexpr (Q > 0) cache[j] = ej;
      z += ej;
    }
    z += exp(-mx);
    const T log_z = log(z) + mx;
    const T inv_z = T(1) / z;
    const auto prob = [&](int64_t j) -> T {
      if constexpr (Q > 0) {
        return cache[j] * inv_z;
      } else {
        return exp(e[j] - mx) * inv_z;
      }
    };

    T total = 0;
    int flag = kCountsOk;
    for (int64_t k = 0; k < m; ++k) {
      const T yk = y[k];
      if (!isfinite(yk)) {
        flag = kCountsNonFinite;
        continue;
      }
      if (yk < T(0)) flag = max(flag, static_cast<int>(kCountsNegative));
      total += yk;
      // Zero counts contribute nothing, even where log p underflows to -inf.
      if (yk != T(0)) ll += yk * ((k < q ? e[k] : T(0)) - log_z) - lgamma(yk + T(1));
    }
    ll += lgamma(total + T(1));
    if (flag != kCountsOk) atomicMax(bad, flag);

    T* gr = grad + idx * q;
    T* w = W + idx * q * q;
    for (int64_t j = 0; j < q; ++j) {
      const T pj = prob(j);
      gr[j] = y[j] - total * pj;
      for (int64_t k = 0; k < q; ++k) w[j * q + k] = -total * pj * prob(k);
      w[j * q + j] += total * pj;
    }
  }
  const T block_total = block_sum(ll);
  if (threadIdx.x == 0) ll_partial[blockIdx.x] = block_total;
}

template <typename T, int Q>
void multinom_launch(const T* eta, const T* counts, int64_t G, int64_t n, int64_t q, T* ll_partial,
                     T* grad, T* W, int* bad, cudaStream_t stream) {
  const int64_t per_gene = multinom_blocks_per_gene(n);
  multinom_terms_kernel<T, Q><<<static_cast<unsigned>(G * per_gene), kMultinomThreads, 0, stream>>>(
      eta, counts, n, q, per_gene, ll_partial, grad, W, bad);
}

// One block per gene; warps take tasks in turn. A task is one curvature entry (j, k) (or one
// residual column j) with a group of up to kGroup design products x~_f x~_h (or x~_f): the lanes
// stride over the spots, read the entry once per spot for the whole group, and a warp reduction
// finishes each sum. So W is streamed ceil(P1^2 / kGroup) times from L2 instead of P1^2 times,
// no partial sums leave the block, and every output has a fixed summation order.
constexpr int kGroup = 8;

template <typename T>
__global__ void __launch_bounds__(kInfoThreads)
    fixed_effect_info_kernel(const T* __restrict__ X, const T* __restrict__ W,
                             const T* __restrict__ resid, int64_t n, int64_t q, int64_t P,
                             T* __restrict__ info, T* __restrict__ score) {
  const int64_t g = blockIdx.x;
  const int64_t P1 = P + 1;
  const int64_t info_groups = ceil_div(P1 * P1, kGroup);  // per (j, k)
  const int64_t score_groups = ceil_div(P1, kGroup);      // per j
  const int64_t info_tasks = q * q * info_groups;
  const int64_t tasks = info_tasks + q * score_groups;
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const T* Wg = W + g * n * q * q;
  const T* rg = resid + g * n * q;
  // Design entry x~_sf with the intercept as column P.
  const auto design = [&](int64_t s, int64_t f) -> T { return f < P ? X[s * P + f] : T(1); };
  for (int64_t task = warp; task < tasks; task += warps) {
    const bool is_info = task < info_tasks;
    // Info: entry (j, k), products c = f P1 + h for c in [c0, c_end). Score: column j, f in
    // [c0, c_end).
    const int64_t t = is_info ? task : task - info_tasks;
    const int64_t groups = is_info ? info_groups : score_groups;
    const int64_t entry = t / groups;  // j q + k, or j
    const int64_t c0 = (t % groups) * kGroup;
    const int64_t c_end = is_info ? P1 * P1 : P1;
    T acc[kGroup];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) acc[i] = 0;
    for (int64_t s = lane; s < n; s += kWarp) {
      const T w = is_info ? Wg[s * q * q + entry] : rg[s * q + entry];
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int64_t c = c0 + i;
        if (c < c_end)
          acc[i] += is_info ? w * design(s, c / P1) * design(s, c % P1) : w * design(s, c);
      }
    }
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const int64_t c = c0 + i;
      const T total = warp_sum(acc[i]);
      if (lane != 0 || c >= c_end) continue;
      if (is_info) {
        const int64_t j = entry / q, k = entry % q, f = c / P1, h = c % P1;
        info[g * q * P1 * q * P1 + ((j * P1 + f) * q + k) * P1 + h] = total;
      } else {
        score[g * q * P1 + entry * P1 + c] = total;
      }
    }
  }
}

}  // namespace

int64_t multinom_blocks_per_gene(int64_t n) { return ceil_div(n, kMultinomThreads); }

template <typename T>
cudaError_t launch_multinom_terms(const T* eta, const T* counts, int64_t G, int64_t n, int64_t q,
                                  T* ll_partial, T* grad, T* W, int* bad, cudaStream_t stream) {
  if (G == 0 || n == 0) return cudaSuccess;
  switch (q) {
    case 1: multinom_launch<T, 1>(eta, counts, G, n, q, ll_partial, grad, W, bad, stream); break;
    case 2: multinom_launch<T, 2>(eta, counts, G, n, q, ll_partial, grad, W, bad, stream); break;
    case 3: multinom_launch<T, 3>(eta, counts, G, n, q, ll_partial, grad, W, bad, stream); break;
    case 4: multinom_launch<T, 4>(eta, counts, G, n, q, ll_partial, grad, W, bad, stream); break;
    default: multinom_launch<T, 0>(eta, counts, G, n, q, ll_partial, grad, W, bad, stream); break;
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fixed_effect_info(const T* X, const T* W, const T* resid, int64_t G, int64_t n,
                                     int64_t q, int64_t P, T* info, T* score, cudaStream_t stream) {
  if (G == 0) return cudaSuccess;
  fixed_effect_info_kernel<T><<<static_cast<unsigned>(G), kInfoThreads, 0, stream>>>(
      X, W, resid, n, q, P, info, score);
  return cudaGetLastError();
}

#define SPLISOSM_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_multinom_terms<T>(const T*, const T*, int64_t, int64_t, int64_t,   \
                                                T*, T*, T*, int*, cudaStream_t);                 \
  template cudaError_t launch_fixed_effect_info<T>(const T*, const T*, const T*, int64_t,        \
                                                   int64_t, int64_t, int64_t, T*, T*,            \
                                                   cudaStream_t);
SPLISOSM_INSTANTIATE(float)
SPLISOSM_INSTANTIATE(double)
#undef SPLISOSM_INSTANTIATE

}  // namespace cuda
}  // namespace splisosm
