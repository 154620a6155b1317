// CPU kernels of the sparse-precision Laplace ops and of the solves with the kernel precision Q
// itself (schemas in registration.cpp). The kernel enters through Q = K^-1, a sparse CSR matrix,
// factorised by the supernodal Cholesky of block_cholesky.h on the shared caches of
// sparse_factor_cache.h.
//
// Per gene, H = I_q (x) Sigma^-1 + W with Sigma_j = v_j (theta_j K + (1 - theta_j) I) and W
// block-diagonal over spots (q x q blocks).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/block_cholesky.h"
#include "cpu/laplace_common.h"
#include "cpu/sparse_factor_cache.h"

namespace splisosm {
namespace {

using MatX = Eigen::MatrixXd;
using VecX = Eigen::VectorXd;
// One spot's q unknowns across R right-hand sides stored one after another (stride n q).
using SpotSlice = Eigen::Map<const MatX, 0, Eigen::OuterStride<>>;
using SpotSliceOut = Eigen::Map<MatX, 0, Eigen::OuterStride<>>;

// The kernel precision Q as CSR arrays (what the Python wrapper's canonical form guarantees, and
// the CPU kernels read): int64 indices, float64 values, rows running from 0 to nnz.
void check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val) {
  for (auto [t, name] :
       {std::pair{&crow, "crow"}, std::pair{&col, "col"}, std::pair{&val, "val"}}) {
    check_device_type(*t, name, c10::DeviceType::CPU, kLaplaceArg);
    check_rank(*t, 1, name, "(nnz,) / (n + 1,)", kLaplaceArg);
  }
  TORCH_CHECK_VALUE(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong,
                    "splisosm: `crow` and `col` must be int64");
  TORCH_CHECK_VALUE(val.scalar_type() == at::kDouble, "splisosm: `val` must be float64, got ",
                    val.scalar_type());
  TORCH_CHECK_VALUE(crow.numel() >= 2, "splisosm: `crow` must have n + 1 >= 2 entries");
  TORCH_CHECK_VALUE(col.numel() == val.numel(),
                    "splisosm: `col` and `val` must have nnz entries each");
  const auto c = crow.contiguous();
  const int64_t* cr = c.data_ptr<int64_t>();
  const int64_t n = crow.numel() - 1;
  TORCH_CHECK_VALUE(cr[0] == 0 && cr[n] == col.numel(), "splisosm: `crow` must run from 0 to nnz");
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK_VALUE(cr[s + 1] >= cr[s], "splisosm: `crow` must be non-decreasing");
  if (col.numel() > 0)
    TORCH_CHECK_VALUE(col.min().item<int64_t>() >= 0 && col.max().item<int64_t>() < n,
                      "splisosm: `col` indices must lie in [0, n)");
}

// Per gene, the white-noise part of the prior is eliminated spot by spot. With
// a_j = 1 / (v_j theta_j), tau_j = 1 / (v_j (1 - theta_j)) and T = diag(tau):
//   Sigma_j = (a_j Q)^-1 + I / tau_j,  and the joint precision of (u, nu), nu = u + white noise,
//   P = [[a Q + T, -T], [-T, T + W]]  has  log det P = log det(a Q + T) + log det H.
// Eliminating nu leaves A = a Q + T (T + W)^-1 W (pattern of I_q (x) Q with full q x q spot
// blocks), so log det H = sum_s log det(T + W_s) + log det A - sum_j log det(a_j Q + tau_j I).
class SparseGene {
 public:
  SparseGene(std::shared_ptr<CachedPattern> pattern, std::shared_ptr<CachedPattern> pattern1,
             int64_t q)
      : A(std::move(pattern)),
        a(q),
        tau(q),
        shifted_(std::move(pattern1)),
        ld_col_(q),
        M_(q, q),
        B_(q, q) {}

  // Factorises gene g; false (with `why`) if a system is not positive definite. With
  // `column_traces`, also tr((a_j Q + tau_j I)^-1) and tr((a_j Q + tau_j I)^-1 Q) per column.
  bool factorize(const double* w, const double* v, const double* theta, const Csr& Q,
                 bool column_traces, std::string& why) {
    const int64_t n = Q.n, q = a.size();
    minv.resize(n * q * q);
    blocks_.resize(n * q * q);
    for (int64_t j = 0; j < q; ++j) {
      a[j] = 1 / (v[j] * theta[j]);
      tau[j] = 1 / (v[j] * (1 - theta[j]));
    }
    // Per spot: (T + W_s)^-1, and T - T (T + W_s)^-1 T written as T (T + W_s)^-1 W_s, which
    // stays accurate when tau is large (theta -> 1).
    logdet = 0;
    // In place on preallocated q x q buffers: this runs for every spot of every factorisation.
    Eigen::Map<MatX> M(M_.data(), q, q), B(B_.data(), q, q);
    for (int64_t s = 0; s < n; ++s) {
      const Eigen::Map<const MatX> Ws(w + s * q * q, q, q);
      M = Ws;
      M.diagonal() += tau;
      Eigen::LLT<Eigen::Ref<MatX>> llt(M);
      if (llt.info() != Eigen::Success) {
        why = "T + W_s is not positive definite at spot " + std::to_string(s) +
              " (is W positive semi-definite?)";
        return false;
      }
      logdet += 2 * M.diagonal().array().log().sum();
      Eigen::Map<MatX> Minv(minv.data() + s * q * q, q, q);
      Minv.setIdentity();
      llt.solveInPlace(Minv);
      B.noalias() = Minv.lazyProduct(Ws);
      B = tau.asDiagonal() * B;
      Eigen::Map<MatX>(blocks_.data() + s * q * q, q, q) = (B + B.transpose()) / 2;
    }
    if (!A->factorize(Q.val, a.data(), blocks_.data())) {
      why = "the eliminated sparse system is not positive definite "
            "(sparse Cholesky failed; is the precision Q positive definite?)";
      return false;
    }
    logdet += A->logdet();
    trace_inv.setConstant(q, NAN);
    trace_inv_q.setConstant(q, NAN);
    // Once per distinct (a_j, tau_j) of the gene.
    for (int64_t j = 0; j < q; ++j) {
      int64_t same = j;
      for (int64_t k = 0; k < j && same == j; ++k)
        if (a[k] == a[j] && tau[k] == tau[j]) same = k;
      if (same < j) {
        ld_col_[j] = ld_col_[same];
        trace_inv[j] = trace_inv[same];
        trace_inv_q[j] = trace_inv_q[same];
      } else if (column_traces || !known_logdets().find(Q.identity, a[j], tau[j], ld_col_[j])) {
        one_blocks_.assign(n, tau[j]);
        if (!shifted_->factorize(Q.val, a.data() + j, one_blocks_.data())) {
          why = "Q / (v theta) + I / (v (1 - theta)) is not positive definite "
                "(is the precision Q positive definite?)";
          return false;
        }
        ld_col_[j] = shifted_->logdet();
        known_logdets().store(Q.identity, a[j], tau[j], ld_col_[j], 1);
        if (column_traces) {
          shifted_->select_inverse();
          trace_inv[j] = shifted_->trace_inverse();
          trace_inv_q[j] = shifted_->trace_with(Q.crow, Q.col, Q.val, 0);
        }
      }
      logdet -= ld_col_[j];
    }
    return true;
  }

  PooledFactor A;             // the eliminated system, factorised
  VecX a, tau;                // prior split of the gene
  std::vector<double> minv;   // (T + W_s)^-1 per spot, (n, q, q)
  double logdet = 0;          // log det H
  VecX trace_inv, trace_inv_q;

 private:
  PooledFactor shifted_;
  VecX ld_col_;
  MatX M_, B_;  // per-spot scratch
  std::vector<double> blocks_, one_blocks_;
};

std::tuple<at::Tensor, at::Tensor> laplace_sparse_cpu(const at::Tensor& W_in,
                                                      const at::Tensor& rhs_in,
                                                      const at::Tensor& crow_in,
                                                      const at::Tensor& col_in,
                                                      const at::Tensor& val_in,
                                                      const at::Tensor& v_in,
                                                      const at::Tensor& theta_in) {
  check_laplace_W(W_in, c10::DeviceType::CPU);
  check_laplace_rhs(W_in, rhs_in);
  check_csr(crow_in, col_in, val_in);
  check_dim(crow_in, 0, W_in.size(1) + 1, "crow", "n + 1, with n spots as in W", kLaplaceArg);
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}, {&rhs_in, "rhs"}}, v_in, theta_in, true);
  const auto W = to_f64(W_in), rhs = to_f64(rhs_in), v = to_f64(v_in), theta = to_f64(theta_in);
  const auto crow = crow_in.contiguous(), col = col_in.contiguous(), val = val_in.contiguous();
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2), R = rhs.size(1);
  const Csr Q = csr_view(crow, col, val);
  const auto pattern = cached_pattern(Q, q);
  const auto pattern1 = q == 1 ? pattern : cached_pattern(Q, 1);
  auto x = at::empty_like(rhs);
  auto logdet = at::empty({G}, W.options());
  GeneFailures failures(G);
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    SparseGene gene(pattern, pattern1, q);
    std::vector<double> u(n * q * R);
    MatX resid(q, R);
    std::string why;
    for (int64_t g = begin; g < end; ++g) {
      const double* w = W.data_ptr<double>() + g * n * q * q;
      if (!gene.factorize(w, v.data_ptr<double>() + g * q, theta.data_ptr<double>() + g * q, Q,
                          false, why)) {
        failures.set(g, why);
        continue;
      }
      logdet.data_ptr<double>()[g] = gene.logdet;
      if (R == 0) continue;
      // H^-1 g: u = A^-1 T (T + W)^-1 g, then nu = (T + W)^-1 (g + T u) = u + (T + W)^-1 (g - W u).
      // Per spot, its q x R slice of all right-hand sides at once (column r at offset r n q).
      const double* gv = rhs.data_ptr<double>() + g * R * n * q;
      double* xv = x.data_ptr<double>() + g * R * n * q;
      const Eigen::OuterStride<> stride(n * q);
      for (int64_t s = 0; s < n; ++s) {
        const Eigen::Map<const MatX> Minv(gene.minv.data() + s * q * q, q, q);
        const SpotSlice gs(gv + s * q, q, R, stride);
        SpotSliceOut(u.data() + s * q, q, R, stride) =
            gene.tau.asDiagonal() * Minv.lazyProduct(gs);
      }
      gene.A->solve_in_place(u.data(), R);
      for (int64_t s = 0; s < n; ++s) {
        const Eigen::Map<const MatX> Minv(gene.minv.data() + s * q * q, q, q);
        const Eigen::Map<const MatX> Ws(w + s * q * q, q, q);
        const SpotSlice us(u.data() + s * q, q, R, stride), gs(gv + s * q, q, R, stride);
        resid.noalias() = gs - Ws.lazyProduct(us);
        SpotSliceOut(xv + s * q, q, R, stride) = us + Minv.lazyProduct(resid);
      }
    }
  });
  failures.raise_first("laplace_sparse");
  return {x.to(rhs_in.scalar_type()), logdet.to(W_in.scalar_type())};
}

// Gradients of log det H (see SparseGene) from d log det P = tr(P^-1 dP) - d log det(a Q + T),
// with the blocks of P^-1 = Cov(u, nu): Cov(u) = A^-1, nu = M u + xi where M_s = (T + W_s)^-1 T
// and Cov(xi) = (T + W)^-1. Per spot, with A_ss the q x q diagonal block of A^-1:
//   d/dW_s     = (H^-1)_ss = (T + W_s)^-1 + M_s A_ss M_s^T,
//   d/dtau_j   = tr_j Cov(u - nu) - tr (a_j Q + tau_j I)^-1,
//                Cov(u - nu)_ss = N_s A_ss N_s^T + (T + W_s)^-1 with N_s = I - M_s = (T + W_s)^-1 W_s
//                (formed directly: no cancellation as tau grows),
//   d/da_j     = tr(A^-1_jj Q) - tr((a_j Q + tau_j I)^-1 Q),
// and the chain rule to (v, theta) through a = 1/(v theta), tau = 1/(v (1 - theta)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> laplace_sparse_logdet_grad_cpu(
    const at::Tensor& W_in, const at::Tensor& crow_in, const at::Tensor& col_in,
    const at::Tensor& val_in, const at::Tensor& v_in, const at::Tensor& theta_in) {
  check_laplace_W(W_in, c10::DeviceType::CPU);
  check_csr(crow_in, col_in, val_in);
  check_dim(crow_in, 0, W_in.size(1) + 1, "crow", "n + 1, with n spots as in W", kLaplaceArg);
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}}, v_in, theta_in, true);
  const auto W = to_f64(W_in), v = to_f64(v_in), theta = to_f64(theta_in);
  const auto crow = crow_in.contiguous(), col = col_in.contiguous(), val = val_in.contiguous();
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2);
  const Csr Q = csr_view(crow, col, val);
  const auto pattern = cached_pattern(Q, q);
  const auto pattern1 = q == 1 ? pattern : cached_pattern(Q, 1);
  auto logdet = at::empty({G}, W.options());
  auto grad_W = at::empty_like(W);
  auto grad_v = at::empty_like(v), grad_theta = at::empty_like(theta);
  GeneFailures failures(G);
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    SparseGene gene(pattern, pattern1, q);
    MatX Ass(q, q), Ms(q, q), Ns(q, q);
    VecX d_a(q), d_tau(q);
    std::string why;
    for (int64_t g = begin; g < end; ++g) {
      const double* w = W.data_ptr<double>() + g * n * q * q;
      const double* vg = v.data_ptr<double>() + g * q;
      const double* tg = theta.data_ptr<double>() + g * q;
      if (!gene.factorize(w, vg, tg, Q, true, why)) {
        failures.set(g, why);
        continue;
      }
      logdet.data_ptr<double>()[g] = gene.logdet;
      gene.A->select_inverse();
      d_tau = -gene.trace_inv;
      for (int64_t s = 0; s < n; ++s) {
        gene.A->inverse_block(s, Ass.data());  // symmetric: row- and column-major agree
        const Eigen::Map<const MatX> Minv(gene.minv.data() + s * q * q, q, q);
        const Eigen::Map<const MatX> Ws(w + s * q * q, q, q);
        Ms = Minv * gene.tau.asDiagonal();
        Ns = Minv * Ws;
        Eigen::Map<MatX>(grad_W.data_ptr<double>() + (g * n + s) * q * q, q, q) =
            Minv + Ms * Ass * Ms.transpose();
        d_tau += (Ns * Ass * Ns.transpose()).diagonal() + Minv.diagonal();
      }
      for (int64_t j = 0; j < q; ++j)
        d_a[j] = gene.A->trace_with(Q.crow, Q.col, Q.val, j) - gene.trace_inv_q[j];
      for (int64_t j = 0; j < q; ++j) {
        const double a = gene.a[j], tau = gene.tau[j];
        grad_v.data_ptr<double>()[g * q + j] = -(a * d_a[j] + tau * d_tau[j]) / vg[j];
        grad_theta.data_ptr<double>()[g * q + j] = -a * d_a[j] / tg[j] + tau * d_tau[j] / (1 - tg[j]);
      }
    }
  });
  failures.raise_first("laplace_sparse_logdet_grad");
  return {logdet.to(W_in.scalar_type()), grad_W.to(W_in.scalar_type()),
          grad_v.to(v_in.scalar_type()), grad_theta.to(theta_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_shifted_solve_cpu(
    const at::Tensor& crow_in, const at::Tensor& col_in, const at::Tensor& val_in,
    const at::Tensor& scale_in, const at::Tensor& shift_in, const at::Tensor& rhs_in,
    bool trace_inverse) {
  check_csr(crow_in, col_in, val_in);
  const int64_t n = crow_in.numel() - 1;
  check_float(rhs_in, "rhs", kLaplaceArg);
  check_device_type(rhs_in, "rhs", c10::DeviceType::CPU, kLaplaceArg);
  check_rank(rhs_in, 3, "rhs", "(G, R, n)", kLaplaceArg);
  check_dim(rhs_in, 2, n, "rhs", "n, as in crow", kLaplaceArg);
  const int64_t G = rhs_in.size(0), R = rhs_in.size(1);
  for (auto [t, name] : {std::pair{&scale_in, "scale"}, std::pair{&shift_in, "shift"}}) {
    check_float(*t, name, kLaplaceArg);
    check_device_type(*t, name, c10::DeviceType::CPU, kLaplaceArg);
    check_rank(*t, 1, name, "(G,)", kLaplaceArg);
    check_dim(*t, 0, G, name, "genes G, as in rhs", kLaplaceArg);
  }
  check_values({finite_condition(scale_in, "scale"), finite_condition(shift_in, "shift"),
                finite_condition(rhs_in, "rhs"),
                {scale_in.gt(0).all().logical_and(shift_in.ge(0).all()),
                 "`scale` must be positive and `shift` non-negative"}});
  const auto crow = crow_in.contiguous(), col = col_in.contiguous(), val = val_in.contiguous();
  const auto scale = to_f64(scale_in), shift = to_f64(shift_in), rhs = to_f64(rhs_in);
  const Csr Q = csr_view(crow, col, val);
  const auto pattern = cached_pattern(Q, 1);
  auto x = at::empty_like(rhs);
  auto logdet = at::empty({G}, rhs.options());
  auto trace = at::empty({trace_inverse ? G : 0}, rhs.options());
  GeneFailures failures(G);
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> diag(n);
    for (int64_t g = begin; g < end; ++g) {
      const double a = scale.data_ptr<double>()[g], tau = shift.data_ptr<double>()[g];
      std::shared_ptr<const BlockCholesky> known;
      if (trace_inverse || !known_factors().find(Q.identity, a, tau, known)) {
        const auto fresh = std::make_shared<BlockCholesky>(pattern->analysis);
        std::fill(diag.begin(), diag.end(), tau);
        if (!fresh->factorize(Q.val, &a, diag.data())) {
          failures.set(g, "scale * Q + shift * I is not positive definite "
                          "(sparse Cholesky failed)");
          continue;
        }
        known_logdets().store(Q.identity, a, tau, fresh->logdet(), 1);
        if (trace_inverse) {
          fresh->select_inverse();
          trace.data_ptr<double>()[g] = fresh->trace_inverse();
        }
        fresh->release_workspace();
        known = fresh;
        known_factors().store(Q.identity, a, tau, known,
                              8.0 * static_cast<double>(pattern->analysis->factor_size()));
      }
      logdet.data_ptr<double>()[g] = known->logdet();
      double* xg = x.data_ptr<double>() + g * R * n;
      std::copy_n(rhs.data_ptr<double>() + g * R * n, R * n, xg);
      if (R > 0) known->solve_in_place(xg, R);
    }
  });
  failures.raise_first("sparse_shifted_solve");
  return {x.to(rhs_in.scalar_type()), logdet.to(rhs_in.scalar_type()),
          trace.to(rhs_in.scalar_type())};
}

at::Tensor sparse_inverse_diagonal_cpu(const at::Tensor& crow_in, const at::Tensor& col_in,
                                       const at::Tensor& val_in) {
  check_csr(crow_in, col_in, val_in);
  const auto crow = crow_in.contiguous(), col = col_in.contiguous(), val = val_in.contiguous();
  const int64_t n = crow.numel() - 1;
  const Csr Q = csr_view(crow, col, val);
  PooledFactor M(cached_pattern(Q, 1));
  const double one = 1.0;
  const std::vector<double> zeros(n, 0.0);
  TORCH_CHECK(M->factorize(Q.val, &one, zeros.data()),
              "splisosm::sparse_inverse_diagonal: the matrix is not positive definite "
              "(sparse Cholesky failed)");
  M->select_inverse();
  auto out = at::empty({n}, val.options());
  for (int64_t s = 0; s < n; ++s) M->inverse_block(s, out.data_ptr<double>() + s);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(splisosm, CPU, m) {
  m.impl("laplace_sparse", &laplace_sparse_cpu);
  m.impl("laplace_sparse_logdet_grad", &laplace_sparse_logdet_grad_cpu);
  m.impl("sparse_shifted_solve", &sparse_shifted_solve_cpu);
  m.impl("sparse_inverse_diagonal", &sparse_inverse_diagonal_cpu);
}

}  // namespace splisosm
