// CPU kernels of the eigenbasis Laplace ops (schemas in registration.cpp). The kernel enters
// through its leading eigenpairs: all of them (full rank) or r < n of them (low rank).
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
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/laplace_common.h"
#include "laplace_prior.h"

namespace splisosm {
namespace {

using MatX = Eigen::MatrixXd;
using VecX = Eigen::VectorXd;
using RowMatX = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Inverses (G, n, q, q) of the spot blocks W_s + diag(d), with gene g's diagonal for spot s at
// diag + g q + s spot_stride (spot_stride 0: one diagonal per gene). With `logdet`, adds each
// block's log-determinant to logdet[g]. A block that is not positive definite fails its gene.
at::Tensor invert_spot_blocks(const at::Tensor& W, const double* diag, int64_t spot_stride,
                              const char* block, GeneFailures& failures, double* logdet) {
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2);
  auto inv = at::empty_like(W);
  const double* w = W.data_ptr<double>();
  double* out = inv.data_ptr<double>();
  at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
    MatX A(q, q);
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t s = 0; s < n; ++s) {
        A = Eigen::Map<const MatX>(w + (g * n + s) * q * q, q, q);
        A.diagonal() += Eigen::Map<const VecX>(diag + g * q + s * spot_stride, q);
        Eigen::LLT<MatX> llt(A);
        if (llt.info() != Eigen::Success) {
          failures.set(g, std::string(block) + " is not positive definite at spot " +
                              std::to_string(s) + " (is W positive semi-definite?)");
          break;
        }
        if (logdet) logdet[g] += 2 * llt.matrixLLT().diagonal().array().log().sum();
        Eigen::Map<MatX>(out + (g * n + s) * q * q, q, q) = llt.solve(MatX::Identity(q, q));
      }
    }
  });
  return inv;
}

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
    const int64_t G = G_, q = q_;
    // diag(Sigma_j^-1)_s = dinv_j + sum_k V_sk^2 e_jk for all genes in one product: (n, G q).
    const auto diag =
        at::mm(V_ * V_, e_.view({G * q, -1}).t()).add_(dinv_.view({1, G * q})).contiguous();
    return invert_spot_blocks(W_, diag.data_ptr<double>(), G * q,
                              "preconditioner block W_s + diag(Sigma^-1)_s", failures, nullptr);
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
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}, {&rhs_in, "rhs"}, {&evecs_in, "evecs"}, {&evals_in, "evals"}},
                       v_in, theta_in, false);
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
  auto logdet_A = at::zeros({G}, W.options());
  GeneFailures failures(G);
  const auto Ainv = invert_spot_blocks(W, prior.dinv.data_ptr<double>(), 0, "diag(1/d) + W_s",
                                       failures, logdet_A.data_ptr<double>());
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
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}, {&evecs_in, "evecs"}, {&evals_in, "evals"}}, v_in, theta_in,
                       false);
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
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}, {&rhs_in, "rhs"}, {&evecs_in, "evecs"}, {&evals_in, "evals"}},
                       v_in, theta_in, false);
  const auto W = to_f64(W_in), V = to_f64(evecs_in), v = to_f64(v_in), theta = to_f64(theta_in);
  const auto prior = eig_prior(to_f64(evals_in), W.size(1), v, theta);
  auto [x, logdet] = low_rank_direct(W, V, prior, to_f64(rhs_in), "laplace_lowrank");
  return {x.to(rhs_in.scalar_type()), logdet.to(W_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(splisosm, CPU, m) {
  m.impl("laplace_solve_eig", &laplace_solve_eig_cpu);
  m.impl("laplace_logdet_eig", &laplace_logdet_eig_cpu);
  m.impl("laplace_lowrank", &laplace_lowrank_cpu);
}

}  // namespace splisosm
