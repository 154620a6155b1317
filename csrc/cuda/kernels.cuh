// Launchers of splisosm's CUDA kernels.
//
// Plain CUDA C++ on raw pointers: no torch headers, so every kernel compiles (and can be checked)
// with nvcc alone, see tools/check-cuda-compile.sh. The torch binding (cuda_binding.cpp) owns the
// input checks, allocations and streams. All arrays are dense, contiguous and row-major; each
// launcher returns the launch status (cudaGetLastError) for the binding to raise on.
//
// Layout used by the CG launchers: the vectors of all S = G R systems live in one (n, S, q) array
// (spot-major), so the prior mat-vec is one GEMM with the shared eigenvectors; the W blocks and
// preconditioner factors are stored spot-major too, (n, G, q, q), so every pass reads them
// coalesced.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine_rules.h"

namespace splisosm {
namespace cuda {

// Counts flag written by the multinomial kernel: the largest code seen wins.
enum BadCounts : int { kCountsOk = 0, kCountsNegative = 1, kCountsNonFinite = 2 };

// ---------------------------------------------------------------------------------------------
// Multinomial-softmax terms
// ---------------------------------------------------------------------------------------------

// Number of per-gene partial log-likelihood sums (one per thread block of spots).
int64_t multinom_blocks_per_gene(int64_t n);

// eta (G, n, q), counts (G, n, q + 1) -> ll_partial (G, multinom_blocks_per_gene(n)),
// grad (G, n, q), W (G, n, q, q); *bad (zero on entry) receives the worst BadCounts code.
template <typename T>
cudaError_t launch_multinom_terms(const T* eta, const T* counts, int64_t G, int64_t n, int64_t q,
                                  T* ll_partial, T* grad, T* W, int* bad, cudaStream_t stream);

// X (n, P) without intercept, W (G, n, q, q), resid (G, n, q) ->
// info (G, q (P+1), q (P+1)) isoform-major (index j (P+1) + f), score (G, q (P+1)).
template <typename T>
cudaError_t launch_fixed_effect_info(const T* X, const T* W, const T* resid, int64_t G, int64_t n,
                                     int64_t q, int64_t P, T* info, T* score, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Eigenbasis Laplace system: preconditioned CG
// ---------------------------------------------------------------------------------------------

// Sizes of a batch of CG systems; `chunks` splits the spots so that reductions have parallelism
// even for few systems (see pcg_shape).
struct PcgShape {
  int64_t n, G, R, q;
  int64_t spots_per_chunk, chunks;
  __host__ __device__ int64_t systems() const { return G * R; }
};
PcgShape pcg_shape(int64_t n, int64_t G, int64_t R, int64_t q);

// Block-Jacobi preconditioner: per spot and gene the Cholesky factor (lower triangle) of
// W_s + diag(prior_diag_s). Wt (n, G, q, q), prior_diag (n, G, q) -> chol (n, G, q, q);
// *first_bad (G on entry) becomes the lowest gene with a block that is not positive definite.
template <typename T>
cudaError_t launch_block_jacobi_factor(const T* Wt, const T* prior_diag, int64_t n, int64_t G,
                                       int64_t q, T* chol, int* first_bad, cudaStream_t stream);

// Finishes H p: hp (holding V e V^T p on entry) += dinv (x) p + W_s p; pq_partial (chunks, S)
// receives the per-chunk sums of p^T H p. Wt (n, G, q, q), dinv (G, q).
template <typename T>
cudaError_t launch_pcg_apply(const PcgShape& sh, const T* Wt, const T* dinv, const T* p, T* hp,
                             T* pq_partial, cudaStream_t stream);

// alpha = rz / p^T H p for active systems, 0 otherwise; p^T H p <= 0 (or NaN) marks the system
// broken (and inactive). active, broken: (S,).
template <typename T>
cudaError_t launch_pcg_alpha(const PcgShape& sh, const T* pq_partial, const T* rz, int* active,
                             int* broken, T* alpha, cudaStream_t stream);

// x += alpha p, r -= alpha hp, z = P^-1 r; rz_partial / rr_partial (chunks, S) receive the
// per-chunk sums of r^T z and r^T r.
template <typename T>
cudaError_t launch_pcg_update(const PcgShape& sh, const T* chol, const T* alpha, const T* p,
                              const T* hp, T* x, T* r, T* z, T* rz_partial, T* rr_partial,
                              cudaStream_t stream);

// Convergence bookkeeping after launch_pcg_update. first: the initial residual (sets bb, rz,
// active = ||b|| > 0). Otherwise, for active systems: counts the iteration, beta = rz_new / rz,
// deactivates at ||r|| <= tol ||b||. *n_active gets the number of systems still active (reset
// by the launcher).
template <typename T>
cudaError_t launch_pcg_scalars(const PcgShape& sh, bool first, T tol, const T* rz_partial,
                               const T* rr_partial, T* rz, T* bb, T* beta, int* active,
                               int64_t* iters, int* n_active, cudaStream_t stream);

// p = z + beta p (per system).
template <typename T>
cudaError_t launch_pcg_direction(const PcgShape& sh, const T* z, const T* beta, T* p,
                                 cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Eigenbasis Laplace system: log-determinant pieces
// ---------------------------------------------------------------------------------------------

// Per gene and spot, A_s = W_s + diag(dinv_g): A_inv (G, n, q, q) = A_s^-1 and logdet (G, n) =
// log det A_s. W (G, n, q, q), dinv (G, q); *first_bad (G on entry) becomes the lowest gene with
// a block A_s that is not positive definite.
template <typename T>
cudaError_t launch_spot_inverse_logdet(const T* W, const T* dinv, int64_t G, int64_t n, int64_t q,
                                       T* A_inv, T* logdet, int* first_bad, cudaStream_t stream);

// Adds the spot blocks of W (G, n, q, q) to the dense isoform-major H (G, q n, q n):
// H[g, j n + s, k n + s] += W[g, s, j, k].
template <typename T>
cudaError_t launch_add_spot_blocks(const T* W, int64_t G, int64_t n, int64_t q, T* H,
                                   cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Native joint_gd engine (csrc/cuda/fit_engine.cu)
// ---------------------------------------------------------------------------------------------
//
// Matrices over spots and gene columns are (n, G q) row-major, element (s, g q + j), so each
// product with the kernel's eigenvectors is one GEMM for all genes; counts are (n, G, m).

struct EngineDims {
  int64_t G, n, q, P, r, C;  // genes, spots, columns per gene, covariates, rank, components
};

// Prior terms of every gene column (G q,), float64: quadratic form nu^T Sigma^-1 nu, its
// theta-derivative, log det Sigma / v-scaled and its theta-derivative, v and d = v (1 - theta).
struct EngineColumns {
  double *quad, *dquad, *logdet, *dlogdet, *v, *d;
};

// Per-gene early-stopping state (G,), and two counters shared by the fit.
struct EngineGenes {
  int64_t* stopped_at;        // -1 while the gene is active, else the history row it stopped at
  int64_t* counter;           // patience counter
  int64_t* best_epoch;        // history row of the best loss, -1 before any
  double* best_loss;
  bool* converged;
  int* improved;              // whether the latest record improved the best loss
  int* n_stopped;             // genes stopped so far
  int64_t* all_stopped_rows;  // history rows when the last gene stopped (-1 before)
};

// One parameter of all genes: values, Adam moments and best snapshot; `size` entries per gene
// in gene-major layout (the small parameters; nu is spot-major and indexed directly).
template <typename T>
struct EngineParam {
  T *value, *m1, *m2, *best;
  int64_t size;
};

// Spots of one thread of engine_multinom; its log-likelihood partial sums are
// (engine_spot_chunks(n), G).
constexpr int64_t kEngineSpotsPerChunk = 32;
int64_t engine_spot_chunks(int64_t n);

// eta = nu + X beta + bias and the multinomial terms of the active genes: geta (n, G q) = y - N p,
// ll_partial (chunks, G) the log-likelihood without its log-factorial constants.
template <typename T>
cudaError_t launch_engine_multinom(const EngineDims& dims, const T* X, const T* counts,
                                   const T* nu, const T* beta, const T* bias,
                                   const int64_t* stopped_at, T* geta, double* ll_partial,
                                   cudaStream_t stream);

// Prior terms of the active gene columns from zw (r, G q) = V^T nu, which is overwritten by the
// eigenbasis coefficients w of Sigma^-1 nu (less its white part nu / d when r < n); lam_m1 (r,)
// holds the eigenvalues minus one. *low_variance is set when a sigma^2 is below the floor.
template <typename T>
cudaError_t launch_engine_columns(const EngineDims& dims, const engine::Settings& s,
                                  const double* lam_m1, T* zw, const T* nu, const T* sigma,
                                  const T* theta_logit, const int64_t* stopped_at,
                                  const EngineColumns& out, int* low_variance,
                                  cudaStream_t stream);

// Loss, early-stopping record into history row `row` (>= 0) and best snapshot of beta, bias,
// sigma and theta_logit per gene; ll_const (G,) holds the log-factorial constants.
template <typename T>
cudaError_t launch_engine_record(const EngineDims& dims, const engine::Settings& s, int64_t row,
                                 const double* ll_partial, const double* ll_const,
                                 const EngineColumns& col, const EngineParam<T>& beta,
                                 const EngineParam<T>& bias, const EngineParam<T>& sigma,
                                 const EngineParam<T>& theta_logit, const EngineGenes& genes,
                                 double* history, cudaStream_t stream);

// The optimiser step of beta, bias, sigma and theta_logit of the genes still stepped after the
// record of row `row` (< 0: none yet); xg (P + 1, G q) = [X 1]^T geta.
template <typename T>
cudaError_t launch_engine_step(const EngineDims& dims, const engine::Settings& s,
                               const engine::AdamScalars& adam, int64_t row,
                               const EngineColumns& col, const T* xg, const EngineParam<T>& beta,
                               const EngineParam<T>& bias, const EngineParam<T>& sigma,
                               const EngineParam<T>& theta_logit, const EngineGenes& genes,
                               cudaStream_t stream);

// Best snapshot and (do_step) the step of the random effects nu (n, G q); prec (n, G q) = V w,
// or null for a white-noise prior (r = 0); col_d (G q,) the white-noise variances.
template <typename T>
cudaError_t launch_engine_nu(const EngineDims& dims, const engine::Settings& s,
                             const engine::AdamScalars& adam, int64_t row, bool do_step,
                             const EngineParam<T>& nu, const T* geta, const T* prec,
                             const double* col_d, const EngineGenes& genes, cudaStream_t stream);

}  // namespace cuda
}  // namespace splisosm
