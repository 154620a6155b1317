// CUDA kernels of the eigenbasis Laplace ops (semantics: csrc/cpu/laplace_eigen_cpu.cpp).
//
// The GEMMs with the shared eigenvectors run in cuBLAS from the binding; the kernels here do the
// per-spot q x q work and the CG vector updates. Reductions over spots write per-chunk partial
// sums that a per-system kernel adds in a fixed order: no atomics on floating point, so a solve
// is reproducible run to run.
#include <algorithm>

#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"

namespace splisosm {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Enough resident threads to fill an H100/H200 (132 SMs x 2048) for the reductions over spots.
constexpr int64_t kTargetThreads = 132 * 2048;
constexpr int64_t kMaxGridY = 65535;

unsigned blocks_for(int64_t work) { return static_cast<unsigned>(ceil_div(work, kThreads)); }

template <typename T>
__global__ void block_jacobi_factor_kernel(const T* __restrict__ Wt, const T* __restrict__ diag,
                                           int64_t n, int64_t G, int64_t q, T* __restrict__ chol,
                                           int* __restrict__ first_bad) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // s G + g
  if (idx >= n * G) return;
  const T* w = Wt + idx * q * q;
  T* a = chol + idx * q * q;
  for (int64_t j = 0; j < q; ++j)
    for (int64_t k = 0; k < q; ++k) a[j * q + k] = w[j * q + k] + (j == k ? diag[idx * q + j] : T(0));
  if (!cholesky_in_place(a, q)) atomicMin(first_bad, static_cast<int>(idx % G));
}

// Threads over systems (x) and spot chunks (y); each thread walks its chunk of spots.
template <typename T>
__global__ void pcg_apply_kernel(PcgShape sh, const T* __restrict__ Wt, const T* __restrict__ dinv,
                                 const T* __restrict__ p, T* __restrict__ hp,
                                 T* __restrict__ pq_partial) {
  const int64_t S = sh.systems(), q = sh.q;
  const int64_t sys = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (sys >= S) return;
  const int64_t g = sys / sh.R;
  const int64_t s0 = blockIdx.y * sh.spots_per_chunk;
  const int64_t s1 = min(sh.n, s0 + sh.spots_per_chunk);
  const T* d = dinv + g * q;
  T acc = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t off = (s * S + sys) * q;
    const T* w = Wt + (s * sh.G + g) * q * q;
    for (int64_t j = 0; j < q; ++j) {
      T y = hp[off + j] + d[j] * p[off + j];
      for (int64_t k = 0; k < q; ++k) y += w[j * q + k] * p[off + k];
      hp[off + j] = y;
      acc += p[off + j] * y;
    }
  }
  pq_partial[blockIdx.y * S + sys] = acc;
}

template <typename T>
__global__ void pcg_alpha_kernel(PcgShape sh, const T* __restrict__ pq_partial,
                                 const T* __restrict__ rz, int* __restrict__ active,
                                 int* __restrict__ broken, T* __restrict__ alpha) {
  const int64_t S = sh.systems();
  const int64_t sys = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (sys >= S) return;
  T a = 0;
  if (active[sys]) {
    T pq = 0;
    for (int64_t c = 0; c < sh.chunks; ++c) pq += pq_partial[c * S + sys];
    if (!(pq > T(0))) {  // NaN too, as on the CPU
      broken[sys] = 1;
      active[sys] = 0;
    } else {
      a = rz[sys] / pq;
    }
  }
  alpha[sys] = a;
}

template <typename T>
__global__ void pcg_update_kernel(PcgShape sh, const T* __restrict__ chol,
                                  const T* __restrict__ alpha, const T* __restrict__ p,
                                  const T* __restrict__ hp, T* __restrict__ x, T* __restrict__ r,
                                  T* __restrict__ z, T* __restrict__ rz_partial,
                                  T* __restrict__ rr_partial) {
  const int64_t S = sh.systems(), q = sh.q;
  const int64_t sys = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (sys >= S) return;
  const int64_t g = sys / sh.R;
  const int64_t s0 = blockIdx.y * sh.spots_per_chunk;
  const int64_t s1 = min(sh.n, s0 + sh.spots_per_chunk);
  const T a = alpha[sys];
  T rz = 0, rr = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t off = (s * S + sys) * q;
    for (int64_t j = 0; j < q; ++j) {
      x[off + j] += a * p[off + j];
      const T rj = r[off + j] - a * hp[off + j];
      r[off + j] = rj;
      z[off + j] = rj;
      rr += rj * rj;
    }
    cholesky_solve_in_place(chol + (s * sh.G + g) * q * q, q, z + off, 1);
    for (int64_t j = 0; j < q; ++j) rz += r[off + j] * z[off + j];
  }
  rz_partial[blockIdx.y * S + sys] = rz;
  rr_partial[blockIdx.y * S + sys] = rr;
}

template <typename T>
__global__ void pcg_scalars_kernel(PcgShape sh, bool first, T tol, const T* __restrict__ rz_partial,
                                   const T* __restrict__ rr_partial, T* __restrict__ rz,
                                   T* __restrict__ bb, T* __restrict__ beta,
                                   int* __restrict__ active, int64_t* __restrict__ iters,
                                   int* __restrict__ n_active) {
  const int64_t S = sh.systems();
  const int64_t sys = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (sys >= S) return;
  T rz_new = 0, rr = 0;
  for (int64_t c = 0; c < sh.chunks; ++c) {
    rz_new += rz_partial[c * S + sys];
    rr += rr_partial[c * S + sys];
  }
  // Same rules as the CPU kernel: every system with b != 0 takes at least one step, b = 0 is
  // solved by x = 0 at once, and a system stops at ||r|| <= tol ||b||. NaN residuals stay
  // active, so they surface as an error (p^T H p is NaN next) instead of a silent x.
  if (first) {
    bb[sys] = rr;
    rz[sys] = rz_new;
    beta[sys] = 0;
    active[sys] = rr > T(0);
  } else if (active[sys]) {
    iters[sys] += 1;
    beta[sys] = rz_new / rz[sys];
    rz[sys] = rz_new;
    active[sys] = !(sqrt(rr) <= tol * sqrt(bb[sys]));
  }
  if (active[sys]) atomicAdd(n_active, 1);
}

template <typename T>
__global__ void pcg_direction_kernel(int64_t total, int64_t S, int64_t q, const T* __restrict__ z,
                                     const T* __restrict__ beta, T* __restrict__ p) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride)
    p[i] = z[i] + beta[(i / q) % S] * p[i];
}

template <typename T>
__global__ void spot_inverse_logdet_kernel(const T* __restrict__ W, const T* __restrict__ dinv,
                                           int64_t G, int64_t n, int64_t q, T* __restrict__ A_inv,
                                           T* __restrict__ logdet, int* __restrict__ first_bad) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // g n + s
  if (idx >= G * n) return;
  const int64_t g = idx / n;
  T* a = A_inv + idx * q * q;
  const T* w = W + idx * q * q;
  for (int64_t j = 0; j < q; ++j)
    for (int64_t k = 0; k < q; ++k) a[j * q + k] = w[j * q + k] + (j == k ? dinv[g * q + j] : T(0));
  if (!cholesky_in_place(a, q)) {
    atomicMin(first_bad, static_cast<int>(g));
    logdet[idx] = 0;
    return;
  }
  T ld = 0;
  for (int64_t j = 0; j < q; ++j) ld += log(a[j * q + j]);
  logdet[idx] = 2 * ld;
  inverse_from_cholesky_in_place(a, q);
}

template <typename T>
__global__ void add_spot_blocks_kernel(const T* __restrict__ W, int64_t G, int64_t n, int64_t q,
                                       T* __restrict__ H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= G * n * q * q) return;
  const int64_t k = idx % q, j = (idx / q) % q, s = (idx / (q * q)) % n, g = idx / (q * q * n);
  const int64_t nq = n * q;
  H[g * nq * nq + (j * n + s) * nq + (k * n + s)] += W[idx];
}

}  // namespace

PcgShape pcg_shape(int64_t n, int64_t G, int64_t R, int64_t q) {
  const int64_t S = std::max<int64_t>(G * R, 1);
  const int64_t want = std::clamp<int64_t>(ceil_div(kTargetThreads, S), 1, std::min(n, kMaxGridY));
  const int64_t per_chunk = std::max<int64_t>(ceil_div(n, want), 1);
  return PcgShape{n, G, R, q, per_chunk, std::max<int64_t>(ceil_div(n, per_chunk), 1)};
}

template <typename T>
cudaError_t launch_block_jacobi_factor(const T* Wt, const T* prior_diag, int64_t n, int64_t G,
                                       int64_t q, T* chol, int* first_bad, cudaStream_t stream) {
  if (n * G == 0) return cudaSuccess;
  block_jacobi_factor_kernel<T><<<blocks_for(n * G), kThreads, 0, stream>>>(Wt, prior_diag, n, G,
                                                                           q, chol, first_bad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pcg_apply(const PcgShape& sh, const T* Wt, const T* dinv, const T* p, T* hp,
                             T* pq_partial, cudaStream_t stream) {
  const dim3 grid(blocks_for(sh.systems()), static_cast<unsigned>(sh.chunks));
  pcg_apply_kernel<T><<<grid, kThreads, 0, stream>>>(sh, Wt, dinv, p, hp, pq_partial);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pcg_alpha(const PcgShape& sh, const T* pq_partial, const T* rz, int* active,
                             int* broken, T* alpha, cudaStream_t stream) {
  pcg_alpha_kernel<T><<<blocks_for(sh.systems()), kThreads, 0, stream>>>(sh, pq_partial, rz,
                                                                          active, broken, alpha);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pcg_update(const PcgShape& sh, const T* chol, const T* alpha, const T* p,
                              const T* hp, T* x, T* r, T* z, T* rz_partial, T* rr_partial,
                              cudaStream_t stream) {
  const dim3 grid(blocks_for(sh.systems()), static_cast<unsigned>(sh.chunks));
  pcg_update_kernel<T><<<grid, kThreads, 0, stream>>>(sh, chol, alpha, p, hp, x, r, z, rz_partial,
                                                      rr_partial);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pcg_scalars(const PcgShape& sh, bool first, T tol, const T* rz_partial,
                               const T* rr_partial, T* rz, T* bb, T* beta, int* active,
                               int64_t* iters, int* n_active, cudaStream_t stream) {
  const cudaError_t reset = cudaMemsetAsync(n_active, 0, sizeof(int), stream);
  if (reset != cudaSuccess) return reset;
  pcg_scalars_kernel<T><<<blocks_for(sh.systems()), kThreads, 0, stream>>>(
      sh, first, tol, rz_partial, rr_partial, rz, bb, beta, active, iters, n_active);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pcg_direction(const PcgShape& sh, const T* z, const T* beta, T* p,
                                 cudaStream_t stream) {
  const int64_t total = sh.n * sh.systems() * sh.q;
  if (total == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), 65536));
  pcg_direction_kernel<T><<<blocks, kThreads, 0, stream>>>(total, sh.systems(), sh.q, z, beta, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_spot_inverse_logdet(const T* W, const T* dinv, int64_t G, int64_t n, int64_t q,
                                       T* A_inv, T* logdet, int* first_bad, cudaStream_t stream) {
  if (G * n == 0) return cudaSuccess;
  spot_inverse_logdet_kernel<T><<<blocks_for(G * n), kThreads, 0, stream>>>(W, dinv, G, n, q,
                                                                           A_inv, logdet, first_bad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_add_spot_blocks(const T* W, int64_t G, int64_t n, int64_t q, T* H,
                                   cudaStream_t stream) {
  if (G * n == 0) return cudaSuccess;
  add_spot_blocks_kernel<T><<<blocks_for(G * n * q * q), kThreads, 0, stream>>>(W, G, n, q, H);
  return cudaGetLastError();
}

#define SPLISOSM_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_block_jacobi_factor<T>(const T*, const T*, int64_t, int64_t,        \
                                                     int64_t, T*, int*, cudaStream_t);            \
  template cudaError_t launch_pcg_apply<T>(const PcgShape&, const T*, const T*, const T*, T*, T*, \
                                           cudaStream_t);                                         \
  template cudaError_t launch_pcg_alpha<T>(const PcgShape&, const T*, const T*, int*, int*, T*,   \
                                           cudaStream_t);                                         \
  template cudaError_t launch_pcg_update<T>(const PcgShape&, const T*, const T*, const T*,        \
                                            const T*, T*, T*, T*, T*, T*, cudaStream_t);          \
  template cudaError_t launch_pcg_scalars<T>(const PcgShape&, bool, T, const T*, const T*, T*,    \
                                             T*, T*, int*, int64_t*, int*, cudaStream_t);         \
  template cudaError_t launch_pcg_direction<T>(const PcgShape&, const T*, const T*, T*,           \
                                               cudaStream_t);                                     \
  template cudaError_t launch_spot_inverse_logdet<T>(const T*, const T*, int64_t, int64_t,        \
                                                     int64_t, T*, T*, int*, cudaStream_t);        \
  template cudaError_t launch_add_spot_blocks<T>(const T*, int64_t, int64_t, int64_t, T*,         \
                                                 cudaStream_t);
SPLISOSM_INSTANTIATE(float)
SPLISOSM_INSTANTIATE(double)
#undef SPLISOSM_INSTANTIATE

}  // namespace cuda
}  // namespace splisosm
