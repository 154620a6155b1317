// CPU kernels of the Laplace-system ops (schemas in registration.cpp, maths in NUMERICS.md).
//
// Per gene, H = I_q (x) Sigma^-1 + W with Sigma_j = v_j (theta_j K + (1 - theta_j) I) and W
// block-diagonal over spots (q x q blocks). Everything is computed in float64 whatever the input
// dtype. Numerical failures are collected per gene and reported for the first failing gene, so
// the message does not depend on thread scheduling.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "block_cholesky.h"
#include "checks.h"
#include "laplace_prior.h"

namespace splisosm {
namespace {

using MatX = Eigen::MatrixXd;
using VecX = Eigen::VectorXd;
using RowMatX = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
// One spot's q unknowns across R right-hand sides stored one after another (stride n q).
using SpotSlice = Eigen::Map<const MatX, 0, Eigen::OuterStride<>>;
using SpotSliceOut = Eigen::Map<MatX, 0, Eigen::OuterStride<>>;

at::Tensor to_f64(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

// First failing gene (lowest index) and why; genes are processed in parallel.
class GeneFailures {
 public:
  explicit GeneFailures(int64_t genes) : reason_(genes) {}
  void set(int64_t g, std::string why) { reason_[g] = std::move(why); }
  void raise_first(const char* op) const {
    for (size_t g = 0; g < reason_.size(); ++g)
      TORCH_CHECK(reason_[g].empty(), "splisosm::", op, ": gene ", g, ": ", reason_[g]);
  }

 private:
  std::vector<std::string> reason_;  // each gene is written by one thread only
};

// ------------------------------------------------------------------------------------------
// Eigenbasis form: preconditioned CG
// ------------------------------------------------------------------------------------------

// Vectors of all CG systems live in (n, G, R, q) tensors, so that the prior mat-vec is one GEMM
// with the shared eigenvectors for every gene, right-hand side and column at once. The vector
// updates are fused per gene (one system per gene and right-hand side) to keep the number of
// parallel regions per iteration small.
class EigCG {
 public:
  EigCG(const at::Tensor& W, const at::Tensor& V, const EigPrior& prior, int64_t R)
      : W_(W), V_(V), Vt_(V.t().contiguous()), e_(prior.e.contiguous()),
        dinv_(prior.dinv.contiguous()), G_(W.size(0)), n_(W.size(1)), q_(W.size(2)), R_(R),
        r_(V.size(1)) {}

  // Inverse blocks of the block-Jacobi preconditioner W_s + diag(Sigma^-1)_s, (G, n, q, q).
  at::Tensor jacobi_inverse(GeneFailures& failures) const {
    const int64_t G = G_, n = n_, q = q_;
    // diag(Sigma_j^-1)_s = dinv_j + sum_k V_sk^2 e_jk for all genes in one product: (n, G q).
    const auto diag =
        at::mm(V_ * V_, e_.view({G * q, -1}).t()).add_(dinv_.view({1, G * q})).contiguous();
    auto inv = at::empty_like(W_);
    const double* w = W_.data_ptr<double>();
    const double* dg = diag.data_ptr<double>();
    double* out = inv.data_ptr<double>();
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      MatX P(q, q);
      for (int64_t g = begin; g < end; ++g) {
        for (int64_t s = 0; s < n; ++s) {
          P = Eigen::Map<const MatX>(w + (g * n + s) * q * q, q, q);
          for (int64_t j = 0; j < q; ++j) P(j, j) += dg[s * G * q + g * q + j];
          Eigen::LLT<MatX> llt(P);
          if (llt.info() != Eigen::Success) {
            failures.set(g, "preconditioner block W_s + diag(Sigma^-1)_s is not positive "
                            "definite at spot " + std::to_string(s) +
                            " (is W positive semi-definite?)");
            break;
          }
          Eigen::Map<MatX>(out + (g * n + s) * q * q, q, q) = llt.solve(MatX::Identity(q, q));
        }
      }
    });
    return inv;
  }

  // y = H p: GEMMs with V for the prior, then the per-spot diagonal and W blocks.
  void apply(const at::Tensor& p, at::Tensor& y, at::Tensor& z) const {
    const int64_t G = G_, R = R_, q = q_, n = n_, r = r_, cols = G * R * q;
    at::mm_out(z, Vt_, p.view({n, cols}));
    double* zp = z.data_ptr<double>();
    const double* e = e_.data_ptr<double>();
    at::parallel_for(0, r, 16, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t rr = 0; rr < R; ++rr)
            for (int64_t j = 0; j < q; ++j)
              zp[k * cols + (g * R + rr) * q + j] *= e[(g * q + j) * r + k];
    });
    auto y_mat = y.view({n, cols});
    at::mm_out(y_mat, V_, z);
    const double* w = W_.data_ptr<double>();
    const double* dinv = dinv_.data_ptr<double>();
    const double* pp = p.data_ptr<double>();
    double* yp = y.data_ptr<double>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t rr = 0; rr < R; ++rr)
            block_mul_add(w + (g * n + s) * q * q, pp + ((s * G + g) * R + rr) * q,
                          dinv + g * q, yp + ((s * G + g) * R + rr) * q);
    });
  }

  // y += (B + diag(dd)) x for one q x q block B; dd may be null.
  void block_mul_add(const double* B, const double* x, const double* dd, double* y) const {
    for (int64_t j = 0; j < q_; ++j) {
      double acc = dd ? dd[j] * x[j] : 0.0;
      for (int64_t k = 0; k < q_; ++k) acc += B[j * q_ + k] * x[k];
      y[j] += acc;
    }
  }

 private:
  at::Tensor W_, V_, Vt_, e_, dinv_;
  int64_t G_, n_, q_, R_, r_;
};

std::tuple<at::Tensor, at::Tensor> laplace_solve_eig_cpu(const at::Tensor& W_in,
                                                         const at::Tensor& rhs_in,
                                                         const at::Tensor& evals_in,
                                                         const at::Tensor& evecs_in,
                                                         const at::Tensor& v_in,
                                                         const at::Tensor& theta_in, double tol,
                                                         int64_t max_iter) {
  check_laplace_W(W_in, c10::DeviceType::CPU);
  check_laplace_rhs(W_in, rhs_in);
  check_eig(W_in, evals_in, evecs_in);
  check_variance(W_in, v_in, theta_in, false);
  check_cg_controls(tol, max_iter);
  const auto W = to_f64(W_in), V = to_f64(evecs_in), v = to_f64(v_in), theta = to_f64(theta_in);
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2), R = rhs_in.size(1);
  auto iters = at::zeros({G}, W.options().dtype(at::kLong));
  if (G == 0 || R == 0) return {at::zeros_like(rhs_in), iters};
  const auto prior = eig_prior(to_f64(evals_in), n, v, theta);
  const EigCG H(W, V, prior, R);
  GeneFailures failures(G);
  const auto Pinv = H.jacobi_inverse(failures);
  failures.raise_first("laplace_solve_eig");

  // State of the G * R systems, (n, G, R, q) layout; one system = one gene and right-hand side.
  const auto b = rhs_in.to(at::kDouble).permute({2, 0, 1, 3}).contiguous();
  auto x = at::zeros_like(b), res = b.clone(), z = at::empty_like(b), p = at::empty_like(b);
  auto Hp = at::empty_like(b), tmp = at::empty({V.size(1), G * R * q}, b.options());
  std::vector<double> rz(G * R), target(G * R);
  std::vector<char> active(G * R);
  std::vector<int64_t> used(G * R, 0);
  const double* pinv = Pinv.data_ptr<double>();
  double *xp = x.data_ptr<double>(), *rp = res.data_ptr<double>(), *zp = z.data_ptr<double>();
  double *pp = p.data_ptr<double>(), *hp = Hp.data_ptr<double>();
  const int64_t stride = G * R * q;  // between consecutive spots of one system
  const auto at_spot = [&](int64_t s, int64_t sys) { return s * stride + sys * q; };
  // z = Pinv r and rz = r^T z per system; p = z on the first iteration.
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g)
      for (int64_t rr = 0; rr < R; ++rr) {
        const int64_t sys = g * R + rr;
        double bb = 0, acc = 0;
        for (int64_t s = 0; s < n; ++s) {
          const int64_t o = at_spot(s, sys);
          std::fill(zp + o, zp + o + q, 0.0);
          H.block_mul_add(pinv + (g * n + s) * q * q, rp + o, nullptr, zp + o);
          for (int64_t j = 0; j < q; ++j) {
            bb += rp[o + j] * rp[o + j];
            acc += rp[o + j] * zp[o + j];
            pp[o + j] = zp[o + j];
          }
        }
        rz[sys] = acc;
        target[sys] = tol * std::sqrt(bb);
        active[sys] = bb > 0;
      }
  });
  std::vector<char> broken(G, 0);
  int64_t it = 0;
  while (std::any_of(active.begin(), active.end(), [](char a) { return a != 0; }) &&
         it < max_iter) {
    ++it;
    H.apply(p, Hp, tmp);
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g)
        for (int64_t rr = 0; rr < R; ++rr) {
          const int64_t sys = g * R + rr;
          if (!active[sys]) continue;
          double pHp = 0;
          for (int64_t s = 0; s < n; ++s)
            for (int64_t j = 0; j < q; ++j)
              pHp += pp[at_spot(s, sys) + j] * hp[at_spot(s, sys) + j];
          if (!(pHp > 0)) {
            broken[g] = 1;
            active[sys] = 0;
            continue;
          }
          const double alpha = rz[sys] / pHp;
          double rr2 = 0, rz_new = 0;
          for (int64_t s = 0; s < n; ++s) {
            const int64_t o = at_spot(s, sys);
            for (int64_t j = 0; j < q; ++j) {
              xp[o + j] += alpha * pp[o + j];
              rp[o + j] -= alpha * hp[o + j];
              rr2 += rp[o + j] * rp[o + j];
            }
            std::fill(zp + o, zp + o + q, 0.0);
            H.block_mul_add(pinv + (g * n + s) * q * q, rp + o, nullptr, zp + o);
            for (int64_t j = 0; j < q; ++j) rz_new += rp[o + j] * zp[o + j];
          }
          if (std::sqrt(rr2) <= target[sys]) {
            active[sys] = 0;
            used[sys] = it;
            continue;
          }
          const double beta = rz_new / rz[sys];
          rz[sys] = rz_new;
          for (int64_t s = 0; s < n; ++s) {
            const int64_t o = at_spot(s, sys);
            for (int64_t j = 0; j < q; ++j) pp[o + j] = zp[o + j] + beta * pp[o + j];
          }
        }
    });
    for (int64_t g = 0; g < G; ++g)
      TORCH_CHECK(!broken[g], "splisosm::laplace_solve_eig: gene ", g,
                  ": the Laplace system H is not positive definite (CG found p^T H p <= 0)");
  }
  for (int64_t sys = 0; sys < G * R; ++sys)
    TORCH_CHECK(!active[sys], "splisosm::laplace_solve_eig: gene ", sys / R, ": CG did not reach "
                "the relative residual ", tol, " within max_iter = ", max_iter, " iterations");
  auto* ip = iters.data_ptr<int64_t>();
  for (int64_t sys = 0; sys < G * R; ++sys) ip[sys / R] = std::max(ip[sys / R], used[sys]);
  return {x.permute({1, 2, 0, 3}).to(rhs_in.scalar_type()).contiguous(), iters};
}

// ------------------------------------------------------------------------------------------
// Eigenbasis form: log-determinant
// ------------------------------------------------------------------------------------------

// Low rank, H = A + U E U^T with A = diag(1/d) + W (per spot), E = clip(1/c - 1/d), U = I_q (x) V.
// With L L^T = M = U^T A^-1 U and S = I + L^T E L (SPD whenever H is):
//   log det H = sum_s log det A_s + log det S      (determinant lemma),
//   H^-1 g = A^-1 g - A^-1 U c,  c = t - E L S^-1 L^T t,  t = E U^T A^-1 g   (Woodbury).
// rhs (G, R, n, q) float64; R may be 0 for the log-determinant alone.
std::tuple<at::Tensor, at::Tensor> low_rank_direct(const at::Tensor& W, const at::Tensor& V,
                                                   const EigPrior& prior, const at::Tensor& rhs,
                                                   const char* op_name) {
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2), r = V.size(1), R = rhs.size(1);
  auto x = at::empty_like(rhs);
  auto Ainv = at::empty_like(W);
  auto logdet_A = at::zeros({G}, W.options());
  GeneFailures failures(G);
  {
    const double* w = W.data_ptr<double>();
    const double* dinv = prior.dinv.data_ptr<double>();
    double* out = Ainv.data_ptr<double>();
    double* lda = logdet_A.data_ptr<double>();
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      MatX A(q, q);
      for (int64_t g = begin; g < end; ++g) {
        for (int64_t s = 0; s < n; ++s) {
          A = Eigen::Map<const MatX>(w + (g * n + s) * q * q, q, q);
          A.diagonal() += Eigen::Map<const VecX>(dinv + g * q, q);
          Eigen::LLT<MatX> llt(A);
          if (llt.info() != Eigen::Success) {
            failures.set(g, "diag(1/d) + W_s is not positive definite at spot " +
                                std::to_string(s) + " (is W positive semi-definite?)");
            break;
          }
          lda[g] += 2 * llt.matrixLLT().diagonal().array().log().sum();
          Eigen::Map<MatX>(out + (g * n + s) * q * q, q, q) = llt.solve(MatX::Identity(q, q));
        }
      }
    });
  }
  failures.raise_first(op_name);
  // Genes in chunks of batched products; a chunk's scaled copies of V stay within ~64 MB.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{8} << 20) / std::max<int64_t>(1, n * r));
  const auto Ainv_t = Ainv.permute({0, 2, 3, 1});  // (G, q, q, n)
  for (int64_t g0 = 0; g0 < G; g0 += chunk) {
    const int64_t g1 = std::min(G, g0 + chunk), cg = g1 - g0;
    const auto Vb = V.unsqueeze(0).expand({cg, n, r});
    auto M = at::empty({cg, q, r, q, r}, W.options());
    for (int64_t j = 0; j < q; ++j)
      for (int64_t l = j; l < q; ++l) {
        const auto scaled = Vb * Ainv_t.slice(0, g0, g1).select(1, j).select(1, l).unsqueeze(-1);
        const auto blk = at::bmm(scaled.transpose(1, 2), Vb);  // (cg, r, r)
        M.select(1, j).select(2, l).copy_(blk);
        if (l != j) M.select(1, l).select(2, j).copy_(blk.transpose(1, 2));
      }
    // Small dense factorisations, one gene per thread (batched LAPACK calls are slower here).
    const int64_t k = q * r;
    const double* mp = M.data_ptr<double>();
    const double* ep = prior.e.data_ptr<double>();
    double* op = logdet_A.data_ptr<double>();
    at::parallel_for(g0, g1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        Eigen::LLT<MatX> llt(Eigen::Map<const MatX>(mp + (g - g0) * k * k, k, k));
        if (llt.info() != Eigen::Success) {
          failures.set(g, "U^T (diag(1/d) + W)^-1 U is not positive definite");
          continue;
        }
        const MatX L = llt.matrixL();
        MatX S = L.transpose() * (Eigen::Map<const VecX>(ep + g * k, k).asDiagonal() * L);
        S.diagonal().array() += 1;
        Eigen::LLT<MatX> lls(S);
        if (lls.info() != Eigen::Success) {
          failures.set(g, "the Laplace system H is not positive definite");
          continue;
        }
        op[g] += 2 * lls.matrixLLT().diagonal().array().log().sum();
        const Eigen::Map<const RowMatX> Vm(V.data_ptr<double>(), n, r);
        const Eigen::Map<const VecX> e(ep + g * k, k);
        const double* ainv = Ainv.data_ptr<double>() + g * n * q * q;
        RowMatX ag(n, q), back(n, q);
        for (int64_t rr = 0; rr < R; ++rr) {
          const int64_t off = (g * R + rr) * n * q;
          const Eigen::Map<const RowMatX> gm(rhs.data_ptr<double>() + off, n, q);
          for (int64_t s = 0; s < n; ++s)
            ag.row(s) = (Eigen::Map<const MatX>(ainv + s * q * q, q, q) * gm.row(s).transpose())
                            .transpose();
          MatX Y = Vm.transpose() * ag;  // (r, q): column j holds the entries j * r + k
          const VecX t = e.cwiseProduct(Eigen::Map<const VecX>(Y.data(), k));
          const VecX c = t - e.cwiseProduct(L * lls.solve(L.transpose() * t));
          back.noalias() = Vm * Eigen::Map<const MatX>(c.data(), r, q);
          Eigen::Map<RowMatX> xm(x.data_ptr<double>() + off, n, q);
          for (int64_t s = 0; s < n; ++s)
            xm.row(s) = ag.row(s) -
                        (Eigen::Map<const MatX>(ainv + s * q * q, q, q) * back.row(s).transpose())
                            .transpose();
        }
      }
    });
  }
  failures.raise_first(op_name);
  return {x, logdet_A};
}

// Full rank: log det H = -log det Sigma + log det(I + R^T Sigma R) with W_s = R_s R_s^T, over the
// spots where W is non-zero (zero-count spots drop out).
at::Tensor logdet_eig_full_rank(const at::Tensor& W, const at::Tensor& V, const at::Tensor& lam,
                                const EigPrior& prior, const at::Tensor& v,
                                const at::Tensor& theta) {
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2);
  const auto K = at::mm(V * lam.unsqueeze(0), V.t()).contiguous();
  const double* k = K.data_ptr<double>();
  auto out = at::empty({G}, W.options());
  for (int64_t g = 0; g < G; ++g) {
    const auto Wg = W[g].contiguous();
    const double* w = Wg.data_ptr<double>();
    std::vector<int64_t> spots;
    for (int64_t s = 0; s < n; ++s)
      if (Eigen::Map<const MatX>(w + s * q * q, q, q).cwiseAbs().maxCoeff() > 0) spots.push_back(s);
    const int64_t na = static_cast<int64_t>(spots.size());
    std::vector<MatX> Rf(na);
    for (int64_t a = 0; a < na; ++a) {
      Eigen::SelfAdjointEigenSolver<MatX> es(Eigen::Map<const MatX>(w + spots[a] * q * q, q, q));
      const double scale = std::max(1.0, es.eigenvalues().cwiseAbs().maxCoeff());
      TORCH_CHECK(es.eigenvalues().minCoeff() >= -1e-10 * scale, "splisosm::laplace_logdet_eig: "
                  "gene ", g, ": W block at spot ", spots[a], " is not positive semi-definite");
      Rf[a] = es.eigenvectors() * es.eigenvalues().cwiseMax(0).cwiseSqrt().asDiagonal();
    }
    const auto vg = v[g].contiguous(), tg = theta[g].contiguous();
    const double* vp = vg.data_ptr<double>();
    const double* tp = tg.data_ptr<double>();
    auto Mt = at::zeros({na * q, na * q}, W.options());
    double* m = Mt.data_ptr<double>();
    at::parallel_for(0, na, 8, [&](int64_t begin, int64_t end) {
      std::vector<double> sig(q);
      for (int64_t a = begin; a < end; ++a)
        for (int64_t b = 0; b <= a; ++b) {
          const double kst = k[spots[a] * n + spots[b]];
          for (int64_t j = 0; j < q; ++j)
            sig[j] = vp[j] * (tp[j] * kst + (a == b ? 1 - tp[j] : 0.0));
          // (R_a^T diag(sig) R_b)_il without temporaries: this loop runs n'^2 / 2 times.
          const double* ra = Rf[a].data();
          const double* rb = Rf[b].data();
          double* row = m + a * q * na * q + b * q;
          for (int64_t i = 0; i < q; ++i)
            for (int64_t l = 0; l < q; ++l) {
              double acc = 0;
              for (int64_t j = 0; j < q; ++j) acc += ra[i * q + j] * sig[j] * rb[l * q + j];
              row[i * na * q + l] = acc;
            }
        }
    });
    Mt.diagonal().add_(1);
    auto [L, info] = at::linalg_cholesky_ex(Mt);  // reads the lower triangle filled above
    TORCH_CHECK(info.item<int64_t>() == 0, "splisosm::laplace_logdet_eig: gene ", g,
                ": the Laplace system H is not positive definite");
    out[g] = 2 * L.diagonal().log().sum() - prior.c[g].log().sum();
  }
  return out;
}

at::Tensor laplace_logdet_eig_cpu(const at::Tensor& W_in, const at::Tensor& evals_in,
                                  const at::Tensor& evecs_in, const at::Tensor& v_in,
                                  const at::Tensor& theta_in) {
  check_laplace_W(W_in, c10::DeviceType::CPU);
  check_eig(W_in, evals_in, evecs_in);
  check_variance(W_in, v_in, theta_in, false);
  const auto W = to_f64(W_in), V = to_f64(evecs_in), lam = to_f64(evals_in);
  const auto v = to_f64(v_in), theta = to_f64(theta_in);
  const auto prior = eig_prior(lam, W.size(1), v, theta);
  const auto out = V.size(1) == W.size(1) ? logdet_eig_full_rank(W, V, lam, prior, v, theta)
                                          : std::get<1>(low_rank_direct(
                                                W, V, prior, at::empty({W.size(0), 0, W.size(1),
                                                                        W.size(2)}, W.options()),
                                                "laplace_logdet_eig"));
  return out.to(W_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> laplace_lowrank_cpu(const at::Tensor& W_in,
                                                       const at::Tensor& rhs_in,
                                                       const at::Tensor& evals_in,
                                                       const at::Tensor& evecs_in,
                                                       const at::Tensor& v_in,
                                                       const at::Tensor& theta_in) {
  check_laplace_W(W_in, c10::DeviceType::CPU);
  check_laplace_rhs(W_in, rhs_in);
  check_eig(W_in, evals_in, evecs_in);
  check_low_rank(evecs_in);
  check_variance(W_in, v_in, theta_in, false);
  const auto W = to_f64(W_in), V = to_f64(evecs_in), v = to_f64(v_in), theta = to_f64(theta_in);
  const auto prior = eig_prior(to_f64(evals_in), W.size(1), v, theta);
  auto [x, logdet] = low_rank_direct(W, V, prior, to_f64(rhs_in), "laplace_lowrank");
  return {x.to(rhs_in.scalar_type()), logdet.to(W_in.scalar_type())};
}

// ------------------------------------------------------------------------------------------
// Sparse-precision form
// ------------------------------------------------------------------------------------------

void check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val) {
  for (auto [t, name] :
       {std::pair{&crow, "crow"}, std::pair{&col, "col"}, std::pair{&val, "val"}}) {
    check_device_type(*t, name, c10::DeviceType::CPU);
    check_rank(*t, 1, name, "(nnz,) / (n + 1,)");
  }
  TORCH_CHECK(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong,
              "splisosm: `crow` and `col` must be int64");
  TORCH_CHECK(val.scalar_type() == at::kDouble, "splisosm: `val` must be float64, got ",
              val.scalar_type());
  TORCH_CHECK(crow.numel() >= 2, "splisosm: `crow` must have n + 1 >= 2 entries");
  TORCH_CHECK(col.numel() == val.numel(), "splisosm: `col` and `val` must have nnz entries each");
  const auto c = crow.contiguous();
  const int64_t* cr = c.data_ptr<int64_t>();
  const int64_t n = crow.numel() - 1;
  TORCH_CHECK(cr[0] == 0 && cr[n] == col.numel(), "splisosm: `crow` must run from 0 to nnz");
  for (int64_t s = 0; s < n; ++s)
    TORCH_CHECK(cr[s + 1] >= cr[s], "splisosm: `crow` must be non-decreasing");
  if (col.numel() > 0)
    TORCH_CHECK(col.min().item<int64_t>() >= 0 && col.max().item<int64_t>() < n,
                "splisosm: `col` indices must lie in [0, n)");
}

// The kernel precision Q as read by the kernels (contiguous CSR, checked by check_csr).
struct Csr {
  const int64_t* crow;
  const int64_t* col;
  const double* val;
  int64_t n;
  uint64_t pattern;   // hash of crow and col
  uint64_t identity;  // hash of the pattern and the values: which Q this is
};

uint64_t fnv_hash(const int64_t* a, int64_t len, uint64_t h) {
  for (int64_t i = 0; i < len; ++i) {
    h ^= static_cast<uint64_t>(a[i]);
    h *= 1099511628211ULL;
  }
  return h;
}
constexpr uint64_t kFnvSeed = 14695981039346656037ULL;

// crow, col and val contiguous and checked by check_csr.
Csr csr_view(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val) {
  const int64_t n = crow.numel() - 1;
  static_assert(sizeof(double) == sizeof(int64_t), "hashing doubles by their bits");
  const auto* bits = reinterpret_cast<const int64_t*>(val.data_ptr<double>());
  const uint64_t pattern = fnv_hash(col.data_ptr<int64_t>(), col.numel(),
                                    fnv_hash(crow.data_ptr<int64_t>(), n + 1, kFnvSeed));
  return {crow.data_ptr<int64_t>(), col.data_ptr<int64_t>(), val.data_ptr<double>(), n,
          pattern, fnv_hash(bits, val.numel(), pattern)};
}

// Results for scale Q + shift I by exact (Q, scale, shift), the oldest dropped once their total
// size passes a budget. A gene's prior terms and its Laplace system at one parameter value ask
// for the same matrices (the prior terms twice per Newton step: before and after it), and each
// costs a factorisation. One cache per kind of result for the process, whatever the dataset.
template <typename Value>
class ShiftedCache {
 public:
  explicit ShiftedCache(double budget) : budget_(budget) {}
  bool find(uint64_t matrix, double scale, double shift, Value& out) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = known_.find({matrix, scale, shift});
    if (it == known_.end()) return false;
    out = it->second.first;
    return true;
  }
  void store(uint64_t matrix, double scale, double shift, Value value, double size) {
    std::lock_guard<std::mutex> lock(mutex_);
    const Key key{matrix, scale, shift};
    if (!known_.emplace(key, std::make_pair(std::move(value), size)).second) return;
    order_.push_back(key);
    used_ += size;
    while (used_ > budget_ && order_.size() > 1) {
      const auto it = known_.find(order_.front());
      used_ -= it->second.second;
      known_.erase(it);
      order_.pop_front();
    }
  }

 private:
  using Key = std::tuple<uint64_t, double, double>;
  const double budget_;
  double used_ = 0;
  mutable std::mutex mutex_;
  std::map<Key, std::pair<Value, double>> known_;
  std::deque<Key> order_;  // oldest first
};

// log det(a Q + tau I), counted one each.
ShiftedCache<double>& known_logdets() {
  static ShiftedCache<double> cache(4096);
  return cache;
}

// Factors of a Q + tau I kept for their solves, counted in bytes of their panels.
ShiftedCache<std::shared_ptr<const BlockCholesky>>& known_factors() {
  static ShiftedCache<std::shared_ptr<const BlockCholesky>> cache(512.0 * (1 << 20));
  return cache;
}

// Symbolic analyses of Q's pattern (one per pattern and q, shared by every gene and call) with
// a pool of factor objects on each, so a call does not reallocate a factor's panels per thread.
struct CachedPattern {
  std::shared_ptr<const BlockCholeskyPattern> analysis;
  std::mutex mutex;
  std::vector<std::unique_ptr<BlockCholesky>> pool;
};

struct PatternKey {
  int64_t n, q, nnz;
  uint64_t hash;
  bool operator<(const PatternKey& o) const {
    return std::tie(n, q, nnz, hash) < std::tie(o.n, o.q, o.nnz, o.hash);
  }
};

// Once per pattern: the CSR structure the factorisation relies on (sorted, unique, symmetric).
void check_symmetric_pattern(const int64_t* crow, const int64_t* col, int64_t n) {
  const auto has = [&](int64_t s, int64_t t) {
    return std::binary_search(col + crow[s], col + crow[s + 1], t);
  };
  for (int64_t s = 0; s < n; ++s)
    for (int64_t p = crow[s]; p < crow[s + 1]; ++p) {
      TORCH_CHECK(p == crow[s] || col[p] > col[p - 1], "splisosm: `col` indices must be sorted "
                  "and unique within each row (row ", s, ")");
      TORCH_CHECK(has(col[p], s), "splisosm: the sparse precision must be symmetric; entry (", s,
                  ", ", col[p], ") has no transpose");
    }
}

std::shared_ptr<CachedPattern> cached_pattern(const Csr& Q, int64_t q) {
  static std::mutex mutex;
  static std::map<PatternKey, std::shared_ptr<CachedPattern>> cache;
  constexpr size_t kMaxPatterns = 16;
  const int64_t nnz = Q.crow[Q.n];
  const PatternKey key{Q.n, q, nnz, Q.pattern};
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  check_symmetric_pattern(Q.crow, Q.col, Q.n);
  auto entry = std::make_shared<CachedPattern>();
  entry->analysis = std::make_shared<const BlockCholeskyPattern>(Q.crow, Q.col, Q.n, q);
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() >= kMaxPatterns) cache.clear();  // rare: many datasets in one process
  return cache.emplace(key, entry).first->second;
}

// A factor on a cached pattern, borrowed from its pool for one thread and returned after use.
class PooledFactor {
 public:
  explicit PooledFactor(std::shared_ptr<CachedPattern> pattern) : pattern_(std::move(pattern)) {
    {
      std::lock_guard<std::mutex> lock(pattern_->mutex);
      if (!pattern_->pool.empty()) {
        factor_ = std::move(pattern_->pool.back());
        pattern_->pool.pop_back();
      }
    }
    if (!factor_) factor_ = std::make_unique<BlockCholesky>(pattern_->analysis);
  }
  ~PooledFactor() {
    std::lock_guard<std::mutex> lock(pattern_->mutex);
    pattern_->pool.push_back(std::move(factor_));
  }
  PooledFactor(const PooledFactor&) = delete;
  PooledFactor& operator=(const PooledFactor&) = delete;

  BlockCholesky& operator*() const { return *factor_; }
  BlockCholesky* operator->() const { return factor_.get(); }

 private:
  std::shared_ptr<CachedPattern> pattern_;
  std::unique_ptr<BlockCholesky> factor_;
};

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
  check_dim(crow_in, 0, W_in.size(1) + 1, "crow", "n + 1, with n spots as in W");
  check_variance(W_in, v_in, theta_in, true);
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
  check_dim(crow_in, 0, W_in.size(1) + 1, "crow", "n + 1, with n spots as in W");
  check_variance(W_in, v_in, theta_in, true);
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
  check_float(rhs_in, "rhs");
  check_device_type(rhs_in, "rhs", c10::DeviceType::CPU);
  check_rank(rhs_in, 3, "rhs", "(G, R, n)");
  check_dim(rhs_in, 2, n, "rhs", "n, as in crow");
  const int64_t G = rhs_in.size(0), R = rhs_in.size(1);
  for (auto [t, name] : {std::pair{&scale_in, "scale"}, std::pair{&shift_in, "shift"}}) {
    check_float(*t, name);
    check_device_type(*t, name, c10::DeviceType::CPU);
    check_rank(*t, 1, name, "(G,)");
    check_dim(*t, 0, G, name, "genes G, as in rhs");
  }
  TORCH_CHECK(scale_in.gt(0).all().item<bool>() && shift_in.ge(0).all().item<bool>(),
              "splisosm: `scale` must be positive and `shift` non-negative");
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
  m.impl("laplace_solve_eig", &laplace_solve_eig_cpu);
  m.impl("laplace_logdet_eig", &laplace_logdet_eig_cpu);
  m.impl("laplace_sparse", &laplace_sparse_cpu);
  m.impl("laplace_lowrank", &laplace_lowrank_cpu);
  m.impl("laplace_sparse_logdet_grad", &laplace_sparse_logdet_grad_cpu);
  m.impl("sparse_shifted_solve", &sparse_shifted_solve_cpu);
  m.impl("sparse_inverse_diagonal", &sparse_inverse_diagonal_cpu);
}

}  // namespace splisosm
