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
      if (!std::isfinite(yk)) {
        bad = kCountsNonFinite;
        continue;
      }
      if (yk < 0) bad = std::max(bad, static_cast<int>(kCountsNegative));
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
    T* w = W + idx * q * q;
    for (int64_t j = 0; j < q; ++j) {
      g[j] = y[j] - total * pp[j];
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
      multinom_chunk<T, Q>(eta, counts, b, std::min(end, b + kChunk), q, ll_spot, grad, W,
                           local_bad);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> multinom_terms_cpu(const at::Tensor& eta_in,
                                                                  const at::Tensor& counts_in) {
  check_multinom_inputs(eta_in, counts_in, c10::DeviceType::CPU);
  const auto eta = eta_in.contiguous();
  const auto counts = counts_in.contiguous();
  const int64_t G = eta.size(0), n = eta.size(1), q = eta.size(2);
  auto ll_spot = at::empty({G, n}, eta.options());
  auto grad = at::empty({G, n, q}, eta.options());
  auto W = at::empty({G, n, q, q}, eta.options());
  std::atomic<int> bad{kCountsOk};
  AT_DISPATCH_FLOATING_TYPES(eta.scalar_type(), "multinom_terms_cpu", [&] {
    multinom_dispatch_q<scalar_t>(eta.data_ptr<scalar_t>(), counts.data_ptr<scalar_t>(), G * n, q,
                              ll_spot.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                              W.data_ptr<scalar_t>(), bad);
  });
  TORCH_CHECK(bad.load() != kCountsNonFinite, "splisosm: `counts` contains NaN or infinite values");
  TORCH_CHECK(bad.load() != kCountsNegative, "splisosm: `counts` contains negative values");
  return {ll_spot.sum(1), grad, W};
}

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

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
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      if (q == 1) {
        // One logit per spot: W and resid of a gene range are plain (genes x spots) matrices and
        // the outputs are (genes x P1^2) and (genes x P1), so the range is two GEMMs rather than
        // many products with a single row.
        using OutMap = Eigen::Map<RowMat<scalar_t>>;
        const Map wr(W.data_ptr<scalar_t>() + begin * n, end - begin, n);
        const Map rr(r.data_ptr<scalar_t>() + begin * n, end - begin, n);
        OutMap(info.data_ptr<scalar_t>() + begin * P1 * P1, end - begin, P1 * P1).noalias() = wr * op;
        OutMap(score.data_ptr<scalar_t>() + begin * P1, end - begin, P1).noalias() = rr * xt;
        return;
      }
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

TORCH_LIBRARY_IMPL(splisosm, CPU, m) {
  m.impl("multinom_terms", &multinom_terms_cpu);
  m.impl("fixed_effect_info", &fixed_effect_info_cpu);
}

}  // namespace splisosm
