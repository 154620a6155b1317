// CPU kernels of the multinomial-softmax ops. Computation only; schemas live in registration.cpp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Eigen/Dense>
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/multinomial_cpu.h"

namespace splisosm {
namespace {

// log(k!) for small integer counts: lgamma dominates the cost of the likelihood otherwise.
constexpr int kLogFactTable = 4096;
const std::array<double, kLogFactTable>& log_factorial_table() {
  static const std::array<double, kLogFactTable> table = [] {
    std::array<double, kLogFactTable> t{};
    for (int k = 1; k < kLogFactTable; ++k) t[k] = t[k - 1] + std::log(static_cast<double>(k));
    return t;
  }();
  return table;
}

template <typename T>
inline T log_factorial(T y, const std::array<double, kLogFactTable>& table) {
  if (y < static_cast<T>(kLogFactTable)) {
    const int k = static_cast<int>(y);
    if (static_cast<T>(k) == y) return static_cast<T>(table[k]);
  }
  return std::lgamma(y + T(1));
}

enum BadCounts : int { kCountsOk = 0, kCountsNegative = 1, kCountsNonFinite = 2 };

// Whether a count is finite; records in `bad` the worst problem seen (NaN or infinite counts over
// negative ones).
template <typename T>
inline bool note_count(T y, int& bad) {
  if (!std::isfinite(y)) {
    bad = kCountsNonFinite;
    return false;
  }
  if (y < 0) bad = std::max(bad, static_cast<int>(kCountsNegative));
  return true;
}

// x86-64 builds target the SSE2 baseline; the branch-free loops below also get an AVX2 clone,
// chosen at load time on CPUs that have it (ifunc: GCC or Clang on Linux).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SPLISOSM_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define SPLISOSM_AVX2_CLONE
#endif

// One logit per spot (m = 2): with t = exp(-|e|), log Z = max(e, 0) + log1p(t),
// p = 1 / (1 + t) for e >= 0 and t / (1 + t) otherwise, and p (1 - p) = t / (1 + t)^2. `l` holds
// log1p(t). Written without branches (the choice of p by arithmetic on copysign) so that it
// vectorises; counts are validated in binomial_constants.
template <typename T>
SPLISOSM_AVX2_CLONE void binomial_terms(const T* __restrict e, const T* __restrict y,
                                        const T* __restrict t, const T* __restrict l, int64_t len,
                                        T* __restrict ll, T* __restrict grad, T* __restrict W) {
  for (int64_t i = 0; i < len; ++i) {
    const T ei = e[i], ti = t[i], y0 = y[2 * i], total = y0 + y[2 * i + 1];
    const T inv = T(1) / (T(1) + ti);
    const T positive = T(0.5) + std::copysign(T(0.5), ei);  // 1 for e >= +0, else 0
    ll[i] = y0 * ei - total * ((ei + std::fabs(ei)) * T(0.5) + l[i]);
    grad[i] = y0 - total * inv * (positive + (T(1) - positive) * ti);
    W[i] = total * ti * inv * inv;
  }
}

// Whether both counts of a spot and their total are integers inside the log-factorial table
// (false for NaN, infinities, negative and non-integer counts).
template <typename T>
inline bool in_table(T y0, T y1) {
  return y0 >= 0 && y1 >= 0 && y0 + y1 < T(kLogFactTable) && y0 == std::floor(y0) &&
         y1 == std::floor(y1);
}

// Adds log N! - log y0! - log y1! to `ll` for spots whose counts are in the table; returns
// whether any spot is not. Selects instead of branches, so the lookups vectorise as gathers.
template <typename T>
SPLISOSM_AVX2_CLONE bool binomial_table_constants(const T* __restrict y, int64_t len,
                                                  T* __restrict ll) {
  const double* table = log_factorial_table().data();
  bool outside = false;
  for (int64_t i = 0; i < len; ++i) {
    const T y0 = y[2 * i], y1 = y[2 * i + 1];
    const bool ok = in_table(y0, y1);
    const int k0 = static_cast<int>(ok ? y0 : T(0)), k1 = static_cast<int>(ok ? y1 : T(0));
    const double c = table[k0 + k1] - table[k0] - table[k1];
    ll[i] += ok ? static_cast<T>(c) : T(0);
    outside |= !ok;
  }
  return outside;
}

// The constants of spots outside the table (large or non-integer counts, lgamma), and the
// validation that reports NaN, infinite or negative counts.
template <typename T>
void binomial_constants(const T* y, int64_t len, T* ll, int& bad) {
  if (!binomial_table_constants(y, len, ll)) return;
  const auto& table = log_factorial_table();
  for (int64_t i = 0; i < len; ++i) {
    const T y0 = y[2 * i], y1 = y[2 * i + 1];
    if (in_table(y0, y1)) continue;
    const bool finite0 = note_count(y0, bad), finite1 = note_count(y1, bad);
    if (!(finite0 && finite1)) continue;
    ll[i] += log_factorial(y0 + y1, table) - log_factorial(y0, table) - log_factorial(y1, table);
  }
}

template <typename T>
void binomial_chunk(const T* eta, const T* counts, int64_t begin, int64_t end, T* ll_spot,
                    T* grad, T* W, int& bad) {
  const int64_t len = end - begin;
  const T* e = eta + begin;
  auto t_t = at::from_blob(const_cast<T*>(e), {len}, c10::CppTypeToScalarType<T>::value)
                 .abs()
                 .neg_()
                 .exp_();
  const auto l_t = t_t.log1p();
  // Without curvature output (W null) the branch-free loop still writes one, into scratch.
  std::vector<T> scratch(W ? 0 : len);
  binomial_terms(e, counts + 2 * begin, t_t.template data_ptr<T>(), l_t.template data_ptr<T>(),
                 len, ll_spot + begin, grad + begin, W ? W + begin : scratch.data());
  binomial_constants(counts + 2 * begin, len, ll_spot + begin, bad);
}

// A chunk of spots in three passes around torch's vectorised exp/log (scalar libm calls cost
// ~16 ns per spot and dominated the op): (1) logits shifted by the spot's largest logit, with the
// reference logit 0 appended, so |eta| >> 1 cannot overflow; (2) partition functions; (3)
// log-likelihood, gradient and curvature block. Q > 0 fixes q at compile time so the small loops
// unroll; Q == 0 reads it from `q_dyn`.
template <typename T, int Q>
void multinom_chunk(const T* eta, const T* counts, int64_t begin, int64_t end, int64_t q_dyn,
                    T* ll_spot, T* grad, T* W, int& bad) {
  const auto& table = log_factorial_table();
  const int64_t q = Q > 0 ? Q : q_dyn;
  const int64_t m = q + 1;
  const int64_t len = end - begin;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto prob_t = at::empty({len, m}, options);
  auto z_t = at::empty({len}, options);
  std::vector<T> shift(len);
  T* prob = prob_t.template data_ptr<T>();
  T* z = z_t.template data_ptr<T>();
  for (int64_t i = 0; i < len; ++i) {
    const T* e = eta + (begin + i) * q;
    T mx = 0;
    for (int64_t j = 0; j < q; ++j) mx = std::max(mx, e[j]);
    for (int64_t j = 0; j < q; ++j) prob[i * m + j] = e[j] - mx;
    prob[i * m + q] = -mx;
    shift[i] = mx;
  }
  prob_t.exp_();
  for (int64_t i = 0; i < len; ++i) {
    T sum = 0;
    for (int64_t j = 0; j < m; ++j) sum += prob[i * m + j];
    z[i] = sum;
  }
  auto log_z_t = z_t.log();
  const T* log_zs = log_z_t.template data_ptr<T>();
  for (int64_t i = 0; i < len; ++i) {
    const int64_t idx = begin + i;
    const T* e = eta + idx * q;
    const T* y = counts + idx * m;
    const T log_z = log_zs[i] + shift[i];
    T total = 0;
    T ll = 0;
    for (int64_t k = 0; k < m; ++k) {
      const T yk = y[k];
      if (!note_count(yk, bad)) continue;
      total += yk;
      // Zero counts contribute nothing, even where log p underflows to -inf.
      if (yk != 0) ll += yk * ((k < q ? e[k] : T(0)) - log_z) - log_factorial(yk, table);
    }
    ll_spot[idx] = ll + log_factorial(total, table);
    const T inv_z = T(1) / z[i];
    T p[Q > 0 ? Q : 1];
    T* pp = Q > 0 ? p : prob + i * m;  // dynamic q normalises in place
    for (int64_t j = 0; j < q; ++j) pp[j] = prob[i * m + j] * inv_z;
    T* g = grad + idx * q;
    for (int64_t j = 0; j < q; ++j) g[j] = y[j] - total * pp[j];
    if (!W) continue;  // no curvature wanted
    T* w = W + idx * q * q;
    for (int64_t j = 0; j < q; ++j) {
      for (int64_t k = 0; k < q; ++k) w[j * q + k] = -total * pp[j] * pp[k];
      w[j * q + j] += total * pp[j];
    }
  }
}

template <typename T, int Q>
void multinom_kernel(const T* eta, const T* counts, int64_t spots, int64_t q, T* ll_spot, T* grad,
                     T* W, std::atomic<int>& bad) {
  // Chunks big enough to amortise the two vectorised calls, small enough to stay in L2.
  constexpr int64_t kChunk = 4096;
  at::parallel_for(0, spots, kChunk, [&](int64_t begin, int64_t end) {
    int local_bad = kCountsOk;
    for (int64_t b = begin; b < end; b += kChunk) {
      if constexpr (Q == 1) {
        binomial_chunk<T>(eta, counts, b, std::min(end, b + kChunk), ll_spot, grad, W, local_bad);
      } else {
        multinom_chunk<T, Q>(eta, counts, b, std::min(end, b + kChunk), q, ll_spot, grad, W,
                             local_bad);
      }
    }
    if (local_bad != kCountsOk) {
      int seen = bad.load(std::memory_order_relaxed);
      while (local_bad > seen && !bad.compare_exchange_weak(seen, local_bad)) {
      }
    }
  });
}

template <typename T>
void multinom_dispatch_q(const T* eta, const T* counts, int64_t spots, int64_t q, T* ll, T* grad,
                         T* W, std::atomic<int>& bad) {
  switch (q) {
    case 1: return multinom_kernel<T, 1>(eta, counts, spots, q, ll, grad, W, bad);
    case 2: return multinom_kernel<T, 2>(eta, counts, spots, q, ll, grad, W, bad);
    case 3: return multinom_kernel<T, 3>(eta, counts, spots, q, ll, grad, W, bad);
    case 4: return multinom_kernel<T, 4>(eta, counts, spots, q, ll, grad, W, bad);
    default: return multinom_kernel<T, 0>(eta, counts, spots, q, ll, grad, W, bad);
  }
}

void check_counts_seen(int bad) {
  TORCH_CHECK(bad != kCountsNonFinite, "splisosm: `counts` contains NaN or infinite values");
  TORCH_CHECK(bad != kCountsNegative, "splisosm: `counts` contains negative values");
}

// The op's three outputs; W undefined (and not computed) without `curvature`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> multinom_terms_impl(const at::Tensor& eta_in,
                                                                   const at::Tensor& counts_in,
                                                                   bool curvature) {
  check_multinom_inputs(eta_in, counts_in, c10::DeviceType::CPU);
  const auto eta = eta_in.contiguous();
  const auto counts = counts_in.contiguous();
  const int64_t G = eta.size(0), n = eta.size(1), q = eta.size(2);
  auto ll_spot = at::empty({G, n}, eta.options());
  auto grad = at::empty({G, n, q}, eta.options());
  auto W = curvature ? at::empty({G, n, q, q}, eta.options()) : at::Tensor();
  std::atomic<int> bad{kCountsOk};
  AT_DISPATCH_FLOATING_TYPES(eta.scalar_type(), "multinom_terms_cpu", [&] {
    multinom_dispatch_q<scalar_t>(eta.data_ptr<scalar_t>(), counts.data_ptr<scalar_t>(), G * n, q,
                                  ll_spot.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                  curvature ? W.data_ptr<scalar_t>() : nullptr, bad);
  });
  check_counts_seen(bad.load());
  return {ll_spot.sum(1), grad, W};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> multinom_terms_cpu(const at::Tensor& eta,
                                                                  const at::Tensor& counts) {
  return multinom_terms_impl(eta, counts, /*curvature=*/true);
}

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <typename T>
SPLISOSM_AVX2_CLONE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < n; ++s) sum += a[s] * b[s];
  return sum;
}

// Information (P1, P1) and score (P1,) of one gene with q = 1 from its curvature w (n,) and
// residual r (n,); xt (n, P1) and op (n, P1 * P1) are the column-major design and its per-spot
// outer products.
template <typename T>
void binomial_information(const T* w, const T* r, const T* xt, const T* op, int64_t n,
                          int64_t P1, T* info, T* score) {
  for (int64_t f = 0; f < P1; ++f) {
    score[f] = dot(r, xt + f * n, n);
    for (int64_t h = f; h < P1; ++h)
      info[f * P1 + h] = info[h * P1 + f] = dot(w, op + (f * P1 + h) * n, n);
  }
}

std::tuple<at::Tensor, at::Tensor> fixed_effect_info_cpu(const at::Tensor& X_in,
                                                         const at::Tensor& W_in,
                                                         const at::Tensor& r_in) {
  check_fixed_effect_inputs(X_in, W_in, r_in, c10::DeviceType::CPU);
  const int64_t G = W_in.size(0), n = W_in.size(1), q = W_in.size(2), P1 = X_in.size(1) + 1;
  const auto W = W_in.contiguous();
  const auto r = r_in.contiguous();
  const auto X = X_in.contiguous();
  auto info = at::empty({G, q, P1, q, P1}, W.options());
  auto score = at::empty({G, q, P1}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "fixed_effect_info_cpu", [&] {
    using Map = Eigen::Map<const RowMat<scalar_t>>;
    // Design with the intercept appended last, and its per-spot outer products, shared by all genes.
    // Column-major, so each product below is a handful of long contiguous dot products over spots.
    using ColMat = Eigen::Matrix<scalar_t, Eigen::Dynamic, Eigen::Dynamic>;
    ColMat xt(n, P1);
    xt.leftCols(P1 - 1) = Map(X.data_ptr<scalar_t>(), n, P1 - 1);
    xt.col(P1 - 1).setOnes();
    ColMat op(n, P1 * P1);
    for (int64_t s = 0; s < n; ++s)
      for (int64_t f = 0; f < P1; ++f)
        for (int64_t h = 0; h < P1; ++h) op(s, f * P1 + h) = xt(s, f) * xt(s, h);
    if (q == 1) {
      // One logit per spot: each output entry is one dot product over spots with a column of
      // the design or of its outer products (upper triangle only, the information is symmetric).
      at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g)
          binomial_information(W.data_ptr<scalar_t>() + g * n, r.data_ptr<scalar_t>() + g * n,
                               xt.data(), op.data(), n, P1,
                               info.data_ptr<scalar_t>() + g * P1 * P1,
                               score.data_ptr<scalar_t>() + g * P1);
      });
      return;
    }
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const Map wg(W.data_ptr<scalar_t>() + g * n * q * q, n, q * q);
        const Map rg(r.data_ptr<scalar_t>() + g * n * q, n, q);
        // pairs(jk, fh) = sum_s W_s[j,k] x_sf x_sh: one product for all isoform pairs at once.
        const RowMat<scalar_t> pairs = wg.transpose() * op;
        const RowMat<scalar_t> sc = rg.transpose() * xt;  // (q, P1)
        scalar_t* out = info.data_ptr<scalar_t>() + g * q * P1 * q * P1;
        for (int64_t j = 0; j < q; ++j)
          for (int64_t f = 0; f < P1; ++f)
            for (int64_t k = 0; k < q; ++k)
              for (int64_t h = 0; h < P1; ++h)
                out[((j * P1 + f) * q + k) * P1 + h] = pairs(j * q + k, f * P1 + h);
        std::copy(sc.data(), sc.data() + q * P1, score.data_ptr<scalar_t>() + g * q * P1);
      }
    });
  });
  return {info.reshape({G, q * P1, q * P1}), score.reshape({G, q * P1})};
}

}  // namespace

template <typename T>
double multinom_count_constant(const T* counts, int64_t n, int64_t q) {
  const auto& table = log_factorial_table();
  const int64_t m = q + 1;
  int bad = kCountsOk;
  double sum = 0;
  for (int64_t s = 0; s < n; ++s) {
    const T* y = counts + s * m;
    T total = 0;
    double c = 0;
    for (int64_t k = 0; k < m; ++k) {
      note_count(y[k], bad);
      total += y[k];
      c -= log_factorial(y[k], table);
    }
    sum += c + log_factorial(total, table);
  }
  check_counts_seen(bad);
  return sum;
}

namespace {

// Spots per pass of multinom_isoform_major_terms: a pass's logits stay in L2, and the two
// vectorised torch calls per pass are amortised over the genes that fill it.
constexpr int64_t kPassSpots = 16384;

// A run of spots of one gene in a pass: its spots [begin, begin + len) sit at `spot` in the
// pass's per-spot buffers, its logits at `cell` in the pass's (m, len) logit blocks.
struct Piece {
  size_t gene;
  int64_t begin, len, spot, cell;
};

template <typename T>
void multinom_pass(const std::vector<MultinomGene<T>>& genes, const std::vector<Piece>& pieces,
                   int64_t spots, int64_t cells, std::vector<T>& buffer) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  buffer.resize(cells + 3 * spots);
  // a: the logits shifted by the spot's largest (0 for the reference isoform included), then
  // their exponentials; z: the partition functions, then their inverses; log_z: their logs
  T* a_all = buffer.data();
  T* z_all = a_all + cells;
  T* log_z_all = z_all + spots;
  T* mx_all = log_z_all + spots;
  for (const Piece& p : pieces) {
    const MultinomGene<T>& gene = genes[p.gene];
    const int64_t q = gene.q, len = p.len;
    T* a = a_all + p.cell;
    T* mx = mx_all + p.spot;
    std::fill(mx, mx + len, T(0));
    for (int64_t k = 0; k < q; ++k) {
      const T* e = gene.eta_t + k * gene.n + p.begin;
      for (int64_t i = 0; i < len; ++i) mx[i] = std::max(mx[i], e[i]);
    }
    for (int64_t k = 0; k < q; ++k) {
      const T* e = gene.eta_t + k * gene.n + p.begin;
      for (int64_t i = 0; i < len; ++i) a[k * len + i] = e[i] - mx[i];
    }
    for (int64_t i = 0; i < len; ++i) a[q * len + i] = -mx[i];
  }
  at::from_blob(a_all, {cells}, dtype).exp_();
  for (const Piece& p : pieces) {
    const int64_t m = genes[p.gene].q + 1, len = p.len;
    const T* a = a_all + p.cell;
    T* z = z_all + p.spot;
    std::fill(z, z + len, T(0));
    for (int64_t k = 0; k < m; ++k)
      for (int64_t i = 0; i < len; ++i) z[i] += a[k * len + i];
  }
  at::Tensor log_z_t = at::from_blob(log_z_all, {spots}, dtype);
  at::log_out(log_z_t, at::from_blob(z_all, {spots}, dtype));
  for (const Piece& p : pieces) {
    const MultinomGene<T>& gene = genes[p.gene];
    const int64_t q = gene.q, n = gene.n, len = p.len;
    const T* a = a_all + p.cell;
    T* z = z_all + p.spot;
    const T* log_z = log_z_all + p.spot;
    const T* mx = mx_all + p.spot;
    const T* N = gene.totals + p.begin;
    // sum_k y_k eta_k - N (log Z + shift), summed in double
    double part = 0;
    for (int64_t k = 0; k < q; ++k) {
      const T* y = gene.counts_t + k * n + p.begin;
      const T* e = gene.eta_t + k * n + p.begin;
#pragma omp simd reduction(+ : part)
      for (int64_t i = 0; i < len; ++i) part += static_cast<double>(y[i]) * e[i];
    }
#pragma omp simd reduction(+ : part)
    for (int64_t i = 0; i < len; ++i)
      part -= static_cast<double>(N[i]) * (static_cast<double>(log_z[i]) + mx[i]);
    *gene.ll += part;
    // the gradient y - N p, p = exp(shifted logit) / Z
    for (int64_t i = 0; i < len; ++i) z[i] = T(1) / z[i];
    for (int64_t k = 0; k < q; ++k) {
      const T* y = gene.counts_t + k * n + p.begin;
      T* g = gene.grad_t + k * n + p.begin;
      for (int64_t i = 0; i < len; ++i) g[i] = y[i] - N[i] * (a[k * len + i] * z[i]);
    }
  }
}

}  // namespace

template <typename T>
void multinom_isoform_major_terms(const std::vector<MultinomGene<T>>& genes) {
  thread_local std::vector<T> buffer;  // kept: a fit calls this every epoch
  std::vector<Piece> pieces;
  int64_t spots = 0, cells = 0;
  for (size_t g = 0; g < genes.size(); ++g) {
    *genes[g].ll = 0;
    for (int64_t begin = 0; begin < genes[g].n; begin += kPassSpots) {
      const int64_t len = std::min(kPassSpots, genes[g].n - begin);
      if (spots + len > kPassSpots && !pieces.empty()) {
        multinom_pass(genes, pieces, spots, cells, buffer);
        pieces.clear();
        spots = cells = 0;
      }
      pieces.push_back({g, begin, len, spots, cells});
      spots += len;
      cells += (genes[g].q + 1) * len;
    }
  }
  if (!pieces.empty()) multinom_pass(genes, pieces, spots, cells, buffer);
}

template double multinom_count_constant<float>(const float*, int64_t, int64_t);
template double multinom_count_constant<double>(const double*, int64_t, int64_t);
template void multinom_isoform_major_terms<float>(const std::vector<MultinomGene<float>>&);
template void multinom_isoform_major_terms<double>(const std::vector<MultinomGene<double>>&);

TORCH_LIBRARY_IMPL(splisosm, CPU, m) {
  m.impl("multinom_terms", &multinom_terms_cpu);
  m.impl("fixed_effect_info", &fixed_effect_info_cpu);
}

}  // namespace splisosm
