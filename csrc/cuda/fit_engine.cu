// CUDA kernels of the native joint_gd engine (the epoch loop and the GEMMs with the kernel's
// eigenvectors live in fit_engine_binding.cpp; the model and rules: csrc/cpu/fit_engine_cpu.cpp
// and csrc/engine_rules.h).
//
// Per epoch the binding launches: engine_multinom (eta and the multinomial terms), the GEMM
// z = V^T nu, engine_columns (the prior terms of every gene column, and w = Sigma^-1 nu in the
// eigenbasis, in place of z), the GEMMs V w and [X 1]^T (y - N p), engine_record (loss, early
// stopping, best snapshot), engine_step (the small parameters' step) and engine_nu (the random
// effects' snapshot and step).
// Nothing is read back by the host inside an epoch.
#include "cuda/device_utils.cuh"
#include "cuda/kernels.cuh"

namespace splisosm {
namespace cuda {
namespace {

constexpr int kGeneThreads = 128;
constexpr int kElementThreads = 256;
// engine_columns: a block is kColumnLanes gene columns x kRankLanes slices of the spectrum.
constexpr int kColumnLanes = 32;
constexpr int kRankLanes = 8;
// Logarithms of the spectrum terms are taken of products of this many factors (each within
// [1e-6, 1e6]), not of every factor.
constexpr int kLogGroup = 16;

// Whether gene g is stepped in the epoch whose record is history row `row` (< 0: no record):
// still active, or stopped by that very record while other genes of the group go on (the CPU
// engine steps such a gene once more, and nothing once every gene has stopped). Read after the
// record kernel has finished, so n_stopped is final for the epoch.
__device__ __forceinline__ bool steps(const EngineGenes& genes, int64_t G, int64_t g, int64_t row) {
  const int64_t at = genes.stopped_at[g];
  return at < 0 || (at == row && *genes.n_stopped < G);
}

// One thread per (gene, chunk of spots); spot-major arrays, so the threads of a warp read
// neighbouring genes of one spot. eta is formed in the output buffer and overwritten there by
// y - N p, so no per-thread array of unbounded q is needed.
template <typename T>
__global__ void __launch_bounds__(kGeneThreads)
    engine_multinom_kernel(EngineDims dims, const T* __restrict__ X, const T* __restrict__ counts,
                           const T* __restrict__ nu, const T* __restrict__ beta,
                           const T* __restrict__ bias, const int64_t* __restrict__ stopped_at,
                           T* __restrict__ geta, double* __restrict__ ll_partial) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= dims.G || stopped_at[g] >= 0) return;
  const int64_t q = dims.q, m = q + 1, P = dims.P, cols = dims.G * q;
  const int64_t s0 = blockIdx.y * kEngineSpotsPerChunk;
  const int64_t s1 = s0 + kEngineSpotsPerChunk < dims.n ? s0 + kEngineSpotsPerChunk : dims.n;
  double ll = 0;
  for (int64_t s = s0; s < s1; ++s) {
    const T* y = counts + (s * dims.G + g) * m;
    const T* u = nu + s * cols + g * q;
    T* e = geta + s * cols + g * q;
    // Logits shifted by the largest one (the reference logit 0 included) cannot overflow.
    T mx = 0;
    for (int64_t j = 0; j < q; ++j) {
      T v = u[j] + bias[g * q + j];
      for (int64_t f = 0; f < P; ++f) v += X[s * P + f] * beta[(g * P + f) * q + j];
      e[j] = v;
      mx = max(mx, v);
    }
    T z = exp(-mx);
    for (int64_t j = 0; j < q; ++j) z += exp(e[j] - mx);
    const T log_z = log(z) + mx, inv_z = T(1) / z;
    T total = 0, acc = 0;
    for (int64_t k = 0; k < m; ++k) {
      const T yk = y[k];
      total += yk;
      // Zero counts contribute nothing, even where log p underflows to -inf.
      if (yk != T(0)) acc += yk * ((k < q ? e[k] : T(0)) - log_z);
    }
    ll += static_cast<double>(acc);
    for (int64_t j = 0; j < q; ++j) e[j] = y[j] - total * (exp(e[j] - mx) * inv_z);
  }
  ll_partial[blockIdx.y * dims.G + g] = ll;
}

// Block (kColumnLanes, kRankLanes): threadIdx.x picks the gene column, threadIdx.y a slice of
// the spectrum (and of the spots); the slices' sums meet in shared memory in a fixed order.
template <typename T>
__global__ void __launch_bounds__(kColumnLanes* kRankLanes)
    engine_columns_kernel(EngineDims dims, engine::Settings s, const double* __restrict__ lam_m1,
                          T* __restrict__ zw, const T* __restrict__ nu,
                          const T* __restrict__ sigma, const T* __restrict__ theta_logit,
                          const int64_t* __restrict__ stopped_at, EngineColumns out,
                          int* __restrict__ low_variance) {
  constexpr int kSums = 6;
  __shared__ double partial[kSums][kRankLanes][kColumnLanes];
  const int64_t cols = dims.G * dims.q;
  const int64_t c = blockIdx.x * static_cast<int64_t>(kColumnLanes) + threadIdx.x;
  const int64_t g = c / dims.q, j = c % dims.q;
  const bool live = c < cols && stopped_at[g] < 0;
  double v = 1, theta = 0, d = 1;
  double sums[kSums] = {0, 0, 0, 0, 0, 0};  // quad, dquad / v, |z|^2, -sum log a, dlogdet, |nu|^2
  if (live) {
    const int64_t comp = g * dims.C + (dims.C == 1 ? 0 : j);
    const bool low = engine::variance_component(sigma[comp], theta_logit[comp], s.min_variance,
                                                s.max_theta, v, theta, d);
    if (low && threadIdx.y == 0) *low_variance = 1;
    const double inv_v = 1 / v, inv_d = dims.r == dims.n ? 0.0 : 1 / d;
    double prod = 1;
    int in_prod = 0;
    for (int64_t k = threadIdx.y; k < dims.r; k += kRankLanes) {
      const double lm1 = lam_m1[k], inv_a = 1.0 / (theta * lm1 + 1.0);
      const double zk = zw[k * cols + c], zc = zk * inv_a * inv_v;
      sums[0] += zk * zc;
      sums[1] -= zc * zc * lm1;
      sums[2] += zk * zk;
      sums[4] += lm1 * inv_a;
      zw[k * cols + c] = static_cast<T>(zc - zk * inv_d);
      prod *= inv_a;
      if (++in_prod == kLogGroup) {
        sums[3] -= log(prod);
        prod = 1;
        in_prod = 0;
      }
    }
    sums[3] -= log(prod);
    if (dims.r < dims.n)
      for (int64_t sp = threadIdx.y; sp < dims.n; sp += kRankLanes) {
        const double u = nu[sp * cols + c];
        sums[5] += u * u;
      }
  }
  for (int i = 0; i < kSums; ++i) partial[i][threadIdx.y][threadIdx.x] = sums[i];
  __syncthreads();
  if (threadIdx.y != 0 || !live) return;
  for (int i = 0; i < kSums; ++i) {
    double total = 0;
    for (int l = 0; l < kRankLanes; ++l) total += partial[i][l][threadIdx.x];
    sums[i] = total;
  }
  double quad = sums[0], dquad = sums[1] * v, logdet = 0, dlogdet = 0;
  if (dims.r > 0) {
    logdet = sums[3] + static_cast<double>(dims.r) * log(v);
    dlogdet = sums[4];
  }
  if (dims.r < dims.n)
    engine::add_white_part(sums[5] - sums[2], static_cast<double>(dims.n - dims.r), v, theta, d,
                           quad, dquad, logdet, dlogdet);
  out.quad[c] = quad;
  out.dquad[c] = dquad;
  out.logdet[c] = logdet;
  out.dlogdet[c] = dlogdet;
  out.v[c] = v;
  out.d[c] = d;
}

template <typename T>
__device__ void step_element(const engine::Settings& s, const engine::AdamScalars& adam,
                             const EngineParam<T>& p, int64_t i, T grad) {
  if (!s.adam) {
    p.value[i] -= static_cast<T>(s.lr) * grad;
    return;
  }
  engine::adam_update(p.value[i], p.m1[i], p.m2[i], grad, static_cast<T>(adam.step_size),
                      static_cast<T>(adam.bias2_sqrt));
}

// One thread per gene: the loss from the multinomial and column terms, the early-stopping record
// into history row `row` and the best snapshot of the small parameters.
template <typename T>
__global__ void __launch_bounds__(kGeneThreads)
    engine_record_kernel(EngineDims dims, engine::Settings s, int64_t row, int64_t chunks,
                         const double* __restrict__ ll_partial,
                         const double* __restrict__ ll_const, EngineColumns col,
                         EngineParam<T> beta, EngineParam<T> bias, EngineParam<T> sigma,
                         EngineParam<T> theta_logit, EngineGenes genes,
                         double* __restrict__ history) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= dims.G) return;
  const int64_t q = dims.q, C = dims.C;
  if (genes.stopped_at[g] >= 0) {
    // Stopped earlier: the history repeats the gene's last logged loss.
    history[row * dims.G + g] = row > 0 ? history[(row - 1) * dims.G + g] : HUGE_VAL;
    genes.improved[g] = 0;
    return;
  }
  const double log2pi = 1.8378770664093453;  // log(2 pi)
  double ll = ll_const[g], mvn = static_cast<double>(dims.n * q) * log2pi, lp = 0;
  for (int64_t k = 0; k < chunks; ++k) ll += ll_partial[k * dims.G + g];
  for (int64_t j = 0; j < q; ++j) mvn += col.logdet[g * q + j] + col.quad[g * q + j];
  for (int64_t c = 0; c < C; ++c) {
    double val, der;
    engine::log_prior(s.prior, sigma.value[g * C + c], s.min_variance, val, der);
    lp += val;
  }
  const engine::Record rec =
      engine::record_loss(s.stop, -(ll - 0.5 * mvn + lp), genes.best_loss[g], genes.counter[g]);
  history[row * dims.G + g] = rec.logged;
  genes.improved[g] = rec.improved;
  if (rec.improved) {
    genes.best_epoch[g] = row;
    const EngineParam<T>* small[] = {&beta, &bias, &sigma, &theta_logit};
    for (const EngineParam<T>* p : small)
      for (int64_t i = g * p->size; i < (g + 1) * p->size; ++i) p->best[i] = p->value[i];
  }
  if (rec.stopped) {
    genes.stopped_at[g] = row;
    genes.converged[g] = rec.converged;
    if (atomicAdd(genes.n_stopped, 1) + 1 == dims.G) *genes.all_stopped_rows = row + 1;
  }
}

// One thread per gene: the optimiser step of beta, bias, sigma and theta_logit.
template <typename T>
__global__ void __launch_bounds__(kGeneThreads)
    engine_step_kernel(EngineDims dims, engine::Settings s, engine::AdamScalars adam, int64_t row,
                       EngineColumns col, const T* __restrict__ xg, EngineParam<T> beta,
                       EngineParam<T> bias, EngineParam<T> sigma, EngineParam<T> theta_logit,
                       EngineGenes genes) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= dims.G || !steps(genes, dims.G, g, row)) return;
  const int64_t q = dims.q, cols = dims.G * q, C = dims.C;
  // Fixed effects: d loss / d beta_fj = -sum_s X_sf (y - N p)_sj, the bias likewise with X = 1.
  for (int64_t j = 0; j < q; ++j) {
    for (int64_t f = 0; f < dims.P; ++f)
      step_element(s, adam, beta, (g * dims.P + f) * q + j, -xg[f * cols + g * q + j]);
    step_element(s, adam, bias, g * q + j, -xg[dims.P * cols + g * q + j]);
  }
  // Sigma_j is proportional to v_j: d l / d v_j = -(n - quad_j) / (2 v_j).
  for (int64_t c = 0; c < C; ++c) {
    double dl_dv = 0, dl_dtheta = 0;
    for (int64_t j = C == 1 ? 0 : c; j < (C == 1 ? q : c + 1); ++j) {
      dl_dv += -0.5 * (static_cast<double>(dims.n) - col.quad[g * q + j]) / col.v[g * q + j];
      dl_dtheta += -0.5 * (col.dlogdet[g * q + j] + col.dquad[g * q + j]);
    }
    double val, dprior, g_sigma, g_theta;
    engine::log_prior(s.prior, sigma.value[g * C + c], s.min_variance, val, dprior);
    engine::variance_grads(sigma.value[g * C + c], theta_logit.value[g * C + c], s.min_variance,
                           s.max_theta, dl_dv, dl_dtheta, dprior, g_sigma, g_theta);
    if (s.train_sigma) step_element(s, adam, sigma, g * C + c, static_cast<T>(g_sigma));
    if (s.train_theta) step_element(s, adam, theta_logit, g * C + c, static_cast<T>(g_theta));
  }
}

// One thread per (spot, gene column): the best snapshot and the step of the random effects,
// whose gradient is Sigma^-1 nu - (y - N p) (prior product V w plus the white part nu / d).
template <typename T>
__global__ void __launch_bounds__(kElementThreads)
    engine_nu_kernel(EngineDims dims, engine::Settings s, engine::AdamScalars adam, int64_t row,
                     bool do_step, EngineParam<T> nu, const T* __restrict__ geta,
                     const T* __restrict__ prec, const double* __restrict__ col_d,
                     EngineGenes genes) {
  const int64_t cols = dims.G * dims.q;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= dims.n * cols) return;
  const int64_t c = i % cols, g = c / dims.q;
  if (row >= 0 && genes.improved[g]) nu.best[i] = nu.value[i];
  if (!do_step || !steps(genes, dims.G, g, row)) return;
  T pr = prec ? prec[i] : T(0);
  if (dims.r < dims.n) pr += nu.value[i] / static_cast<T>(col_d[c]);
  step_element(s, adam, nu, i, pr - geta[i]);
}

unsigned blocks_for(int64_t work, int threads) {
  return static_cast<unsigned>(ceil_div(work, threads));
}

}  // namespace

int64_t engine_spot_chunks(int64_t n) { return ceil_div(n, kEngineSpotsPerChunk); }

template <typename T>
cudaError_t launch_engine_multinom(const EngineDims& dims, const T* X, const T* counts,
                                   const T* nu, const T* beta, const T* bias,
                                   const int64_t* stopped_at, T* geta, double* ll_partial,
                                   cudaStream_t stream) {
  if (dims.G == 0 || dims.n == 0) return cudaSuccess;
  const dim3 grid(blocks_for(dims.G, kGeneThreads),
                  static_cast<unsigned>(engine_spot_chunks(dims.n)));
  engine_multinom_kernel<T><<<grid, kGeneThreads, 0, stream>>>(dims, X, counts, nu, beta, bias,
                                                               stopped_at, geta, ll_partial);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_engine_columns(const EngineDims& dims, const engine::Settings& s,
                                  const double* lam_m1, T* zw, const T* nu, const T* sigma,
                                  const T* theta_logit, const int64_t* stopped_at,
                                  const EngineColumns& out, int* low_variance,
                                  cudaStream_t stream) {
  if (dims.G == 0) return cudaSuccess;
  const dim3 block(kColumnLanes, kRankLanes);
  engine_columns_kernel<T><<<blocks_for(dims.G * dims.q, kColumnLanes), block, 0, stream>>>(
      dims, s, lam_m1, zw, nu, sigma, theta_logit, stopped_at, out, low_variance);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_engine_record(const EngineDims& dims, const engine::Settings& s, int64_t row,
                                 const double* ll_partial, const double* ll_const,
                                 const EngineColumns& col, const EngineParam<T>& beta,
                                 const EngineParam<T>& bias, const EngineParam<T>& sigma,
                                 const EngineParam<T>& theta_logit, const EngineGenes& genes,
                                 double* history, cudaStream_t stream) {
  if (dims.G == 0) return cudaSuccess;
  engine_record_kernel<T><<<blocks_for(dims.G, kGeneThreads), kGeneThreads, 0, stream>>>(
      dims, s, row, engine_spot_chunks(dims.n), ll_partial, ll_const, col, beta, bias, sigma,
      theta_logit, genes, history);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_engine_step(const EngineDims& dims, const engine::Settings& s,
                               const engine::AdamScalars& adam, int64_t row,
                               const EngineColumns& col, const T* xg, const EngineParam<T>& beta,
                               const EngineParam<T>& bias, const EngineParam<T>& sigma,
                               const EngineParam<T>& theta_logit, const EngineGenes& genes,
                               cudaStream_t stream) {
  if (dims.G == 0) return cudaSuccess;
  engine_step_kernel<T><<<blocks_for(dims.G, kGeneThreads), kGeneThreads, 0, stream>>>(
      dims, s, adam, row, col, xg, beta, bias, sigma, theta_logit, genes);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_engine_nu(const EngineDims& dims, const engine::Settings& s,
                             const engine::AdamScalars& adam, int64_t row, bool do_step,
                             const EngineParam<T>& nu, const T* geta, const T* prec,
                             const double* col_d, const EngineGenes& genes, cudaStream_t stream) {
  const int64_t work = dims.n * dims.G * dims.q;
  if (work == 0) return cudaSuccess;
  engine_nu_kernel<T><<<blocks_for(work, kElementThreads), kElementThreads, 0, stream>>>(
      dims, s, adam, row, do_step, nu, geta, prec, col_d, genes);
  return cudaGetLastError();
}

#define SPLISOSM_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_engine_multinom<T>(const EngineDims&, const T*, const T*, const T*, \
                                                 const T*, const T*, const int64_t*, T*, double*, \
                                                 cudaStream_t);                                   \
  template cudaError_t launch_engine_columns<T>(const EngineDims&, const engine::Settings&,       \
                                                const double*, T*, const T*, const T*, const T*,  \
                                                const int64_t*, const EngineColumns&, int*,       \
                                                cudaStream_t);                                    \
  template cudaError_t launch_engine_record<T>(                                                   \
      const EngineDims&, const engine::Settings&, int64_t, const double*, const double*,          \
      const EngineColumns&, const EngineParam<T>&, const EngineParam<T>&, const EngineParam<T>&,  \
      const EngineParam<T>&, const EngineGenes&, double*, cudaStream_t);                          \
  template cudaError_t launch_engine_step<T>(                                                     \
      const EngineDims&, const engine::Settings&, const engine::AdamScalars&, int64_t,            \
      const EngineColumns&, const T*, const EngineParam<T>&, const EngineParam<T>&,               \
      const EngineParam<T>&, const EngineParam<T>&, const EngineGenes&, cudaStream_t);            \
  template cudaError_t launch_engine_nu<T>(const EngineDims&, const engine::Settings&,            \
                                           const engine::AdamScalars&, int64_t, bool,             \
                                           const EngineParam<T>&, const T*, const T*,             \
                                           const double*, const EngineGenes&, cudaStream_t);
SPLISOSM_INSTANTIATE(float)
SPLISOSM_INSTANTIATE(double)
#undef SPLISOSM_INSTANTIATE

}  // namespace cuda
}  // namespace splisosm
