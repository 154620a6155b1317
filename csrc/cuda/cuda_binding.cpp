// CUDA implementations of the splisosm ops: input checks, allocations and streams around the
// plain-CUDA launchers of kernels.cuh. Schemas live in registration.cpp; semantics follow the CPU
// kernels (csrc/cpu/*.cpp), with which the input checks (checks.h) and the eigenbasis prior
// (laplace_prior.h) are shared, so both devices reject the same inputs with the same messages.
//
// Laplace ops work in float64 whatever the input dtype, like the CPU kernels, so both devices
// agree to round-off. Host synchronisations: one per multinomial call (the counts flag), and in
// CG one per kCheckEvery iterations (the number of systems still active).
//
// Streams come from c10::cuda::getCurrentCUDAStream (what at::cuda::getCurrentCUDAStream
// forwards to): <c10/cuda/CUDAStream.h> does not pull in the cuBLAS/cuSPARSE headers that
// <ATen/cuda/CUDAContext.h> needs, and the GEMMs go through at::mm / at::matmul anyway.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "checks.h"
#include "cuda/kernels.cuh"
#include "laplace_prior.h"

namespace splisosm {
namespace {

// CG iterations between two reads of the active-system count (each read syncs the stream).
constexpr int64_t kCheckEvery = 8;
// Elements of the largest temporary of the dense log-determinant routes (1 GiB of float64);
// genes are processed in chunks that fit.
constexpr int64_t kDenseBudget = int64_t{1} << 27;

constexpr int64_t kMaxInt = std::numeric_limits<int>::max();

at::Tensor to_f64(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

// Index of the first true entry of a (G,) bool tensor, or -1.
int64_t first_true(const at::Tensor& flags) {
  const auto idx = flags.nonzero();
  return idx.numel() == 0 ? -1 : idx.min().item<int64_t>();
}

// ---------------------------------------------------------------------------------------------
// Multinomial ops
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> multinom_terms_cuda(const at::Tensor& eta_in,
                                                                   const at::Tensor& counts_in) {
  check_multinom_inputs(eta_in, counts_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(eta_in.device());
  const auto eta = eta_in.contiguous();
  const auto counts = counts_in.contiguous();
  const int64_t G = eta.size(0), n = eta.size(1), q = eta.size(2);
  const int64_t per_gene = cuda::multinom_blocks_per_gene(n);
  TORCH_CHECK(G * per_gene <= kMaxInt, "splisosm: `eta` is too large for one launch (G n = ",
              G * n, ")");
  auto ll_partial = at::empty({G, per_gene}, eta.options());
  auto grad = at::empty({G, n, q}, eta.options());
  auto W = at::empty({G, n, q, q}, eta.options());
  auto bad = at::zeros({1}, eta.options().dtype(at::kInt));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(eta.scalar_type(), "multinom_terms_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_multinom_terms<scalar_t>(
        eta.data_ptr<scalar_t>(), counts.data_ptr<scalar_t>(), G, n, q,
        ll_partial.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(),
        bad.data_ptr<int>(), stream));
  });
  const int flag = bad.item<int>();
  TORCH_CHECK(flag != cuda::kCountsNonFinite, "splisosm: `counts` contains NaN or infinite values");
  TORCH_CHECK(flag != cuda::kCountsNegative, "splisosm: `counts` contains negative values");
  return {ll_partial.sum(1), grad, W};
}

std::tuple<at::Tensor, at::Tensor> fixed_effect_info_cuda(const at::Tensor& X_in,
                                                          const at::Tensor& W_in,
                                                          const at::Tensor& r_in) {
  check_fixed_effect_inputs(X_in, W_in, r_in, c10::DeviceType::CUDA);
  const int64_t G = W_in.size(0), n = W_in.size(1), q = W_in.size(2), P = X_in.size(1);
  TORCH_CHECK(G <= kMaxInt, "splisosm: `W` has too many genes for one launch (", G, ")");
  const c10::cuda::CUDAGuard guard(W_in.device());
  const auto W = W_in.contiguous();
  const auto r = r_in.contiguous();
  const auto X = X_in.contiguous();
  const int64_t k = q * (P + 1);
  auto info = at::empty({G, k, k}, W.options());
  auto score = at::empty({G, k}, W.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "fixed_effect_info_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_fixed_effect_info<scalar_t>(
        X.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), G, n, q, P,
        info.data_ptr<scalar_t>(), score.data_ptr<scalar_t>(), stream));
  });
  return {info, score};
}

// ---------------------------------------------------------------------------------------------
// Eigenbasis Laplace ops
// ---------------------------------------------------------------------------------------------

// The kernels index genes with int.
void check_W(const at::Tensor& W) {
  check_laplace_W(W, c10::DeviceType::CUDA);
  TORCH_CHECK(W.size(0) <= kMaxInt, "splisosm: `W` has too many genes (", W.size(0), ")");
}

std::tuple<at::Tensor, at::Tensor> laplace_solve_eig_cuda(const at::Tensor& W_in,
                                                          const at::Tensor& rhs_in,
                                                          const at::Tensor& evals_in,
                                                          const at::Tensor& evecs_in,
                                                          const at::Tensor& v_in,
                                                          const at::Tensor& theta_in, double tol,
                                                          int64_t max_iter) {
  check_W(W_in);
  check_laplace_rhs(W_in, rhs_in);
  check_eig(W_in, evals_in, evecs_in);
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}, {&rhs_in, "rhs"}, {&evecs_in, "evecs"}, {&evals_in, "evals"}},
                       v_in, theta_in, false);
  check_cg_controls(tol, max_iter);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const auto W = to_f64(W_in), V = to_f64(evecs_in), v = to_f64(v_in), theta = to_f64(theta_in);
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2), R = rhs_in.size(1), r = V.size(1);
  auto iters = at::zeros({G}, W.options().dtype(at::kLong));
  if (G == 0 || R == 0) return {at::zeros_like(rhs_in), iters};
  const auto prior = eig_prior(to_f64(evals_in), n, v, theta);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = W.options();
  const auto i32 = W.options().dtype(at::kInt);

  // Block-Jacobi factors of W_s + diag(Sigma^-1)_s, with diag(Sigma_j^-1)_s =
  // dinv_j + sum_k V_sk^2 e_jk for all genes in one product (n, G q).
  const auto Wt = W.permute({1, 0, 2, 3}).contiguous();  // (n, G, q, q)
  const auto prior_diag =
      at::mm(V * V, prior.e.view({G * q, r}).t()).add_(prior.dinv.view({1, G * q})).contiguous();
  auto chol = at::empty_like(Wt);
  auto first_bad = at::full({1}, G, i32);
  C10_CUDA_CHECK(cuda::launch_block_jacobi_factor<double>(
      Wt.data_ptr<double>(), prior_diag.data_ptr<double>(), n, G, q, chol.data_ptr<double>(),
      first_bad.data_ptr<int>(), stream));
  const int64_t bad_gene = first_bad.item<int>();
  TORCH_CHECK(bad_gene >= G, "splisosm::laplace_solve_eig: gene ", bad_gene,
              ": preconditioner block W_s + diag(Sigma^-1)_s is not positive definite "
              "(is W positive semi-definite?)");

  const cuda::PcgShape sh = cuda::pcg_shape(n, G, R, q);
  const int64_t S = G * R, cols = S * q;
  const auto b = rhs_in.to(at::kDouble).permute({2, 0, 1, 3}).contiguous();  // (n, G, R, q)
  auto x = at::zeros_like(b);
  auto res = b.clone();
  auto z = at::empty_like(b);
  auto p = at::zeros_like(b);
  auto hp = at::zeros_like(b);
  auto p_mat = p.view({n, cols});
  auto hp_mat = hp.view({n, cols});
  auto proj = at::empty({r, cols}, f64);  // V^T p, then scaled by e
  auto pq_part = at::empty({sh.chunks, S}, f64);
  auto rz_part = at::empty({sh.chunks, S}, f64);
  auto rr_part = at::empty({sh.chunks, S}, f64);
  auto rz = at::zeros({S}, f64), bb = at::zeros({S}, f64), beta = at::zeros({S}, f64);
  auto alpha = at::zeros({S}, f64);
  auto active = at::zeros({S}, i32), broken = at::zeros({S}, i32);
  auto used = at::zeros({S}, W.options().dtype(at::kLong));
  auto n_active = at::zeros({1}, i32);
  const auto e_cols = prior.e.permute({2, 0, 1}).unsqueeze(2);  // (r, G, 1, q)
  const auto Vt = V.t();

  const auto update = [&] {
    C10_CUDA_CHECK(cuda::launch_pcg_update<double>(
        sh, chol.data_ptr<double>(), alpha.data_ptr<double>(), p.data_ptr<double>(),
        hp.data_ptr<double>(), x.data_ptr<double>(), res.data_ptr<double>(),
        z.data_ptr<double>(), rz_part.data_ptr<double>(), rr_part.data_ptr<double>(), stream));
  };
  const auto scalars = [&](bool first) {
    C10_CUDA_CHECK(cuda::launch_pcg_scalars<double>(
        sh, first, tol, rz_part.data_ptr<double>(), rr_part.data_ptr<double>(),
        rz.data_ptr<double>(), bb.data_ptr<double>(), beta.data_ptr<double>(),
        active.data_ptr<int>(), used.data_ptr<int64_t>(), n_active.data_ptr<int>(), stream));
  };
  // With alpha = 0 the update only preconditions the initial residual b.
  update();
  scalars(true);
  int64_t still_active = n_active.item<int>();
  for (int64_t it = 1; it <= max_iter && still_active > 0; ++it) {
    C10_CUDA_CHECK(cuda::launch_pcg_direction<double>(sh, z.data_ptr<double>(),
                                                      beta.data_ptr<double>(),
                                                      p.data_ptr<double>(), stream));
    // Prior part of H p for every gene, right-hand side and column: two GEMMs with V.
    at::mm_out(proj, Vt, p_mat);
    proj.view({r, G, R, q}).mul_(e_cols);
    at::mm_out(hp_mat, V, proj);
    C10_CUDA_CHECK(cuda::launch_pcg_apply<double>(sh, Wt.data_ptr<double>(),
                                                  prior.dinv.data_ptr<double>(),
                                                  p.data_ptr<double>(), hp.data_ptr<double>(),
                                                  pq_part.data_ptr<double>(), stream));
    C10_CUDA_CHECK(cuda::launch_pcg_alpha<double>(sh, pq_part.data_ptr<double>(),
                                                  rz.data_ptr<double>(), active.data_ptr<int>(),
                                                  broken.data_ptr<int>(),
                                                  alpha.data_ptr<double>(), stream));
    update();
    scalars(false);
    if (it % kCheckEvery == 0 || it == max_iter) still_active = n_active.item<int>();
  }
  const int64_t broken_gene = first_true(broken.view({G, R}).ne(0).any(1));
  TORCH_CHECK(broken_gene < 0, "splisosm::laplace_solve_eig: gene ", broken_gene,
              ": the Laplace system H is not positive definite (CG found p^T H p <= 0)");
  const int64_t slow_gene = first_true(active.view({G, R}).ne(0).any(1));
  TORCH_CHECK(slow_gene < 0, "splisosm::laplace_solve_eig: gene ", slow_gene,
              ": CG did not reach the relative residual ", tol, " within max_iter = ", max_iter,
              " iterations");
  iters.copy_(used.view({G, R}).amax(1));
  return {x.permute({1, 2, 0, 3}).to(rhs_in.scalar_type()).contiguous(), iters};
}

// Low rank, H = A + U E U^T with A = diag(1/d) + W (per spot), E = clip(1/c - 1/d), U = I_q (x) V:
// with L L^T = M = U^T A^-1 U and S = I + L^T E L (SPD whenever H is),
//   log det H = sum_s log det A_s + log det S                          (determinant lemma),
//   H^-1 g = A^-1 g - A^-1 U c,  c = t - E L S^-1 L^T t,  t = E U^T A^-1 g   (Woodbury).
// The CPU kernel's formulation, so both fail on the same inputs. rhs (G, R, n, q) float64; R may
// be 0 for the log-determinant alone. Genes go in chunks whose scaled copies of V fit kDenseBudget.
std::tuple<at::Tensor, at::Tensor> low_rank_direct(const at::Tensor& W, const at::Tensor& V,
                                                   const EigPrior& prior, const at::Tensor& rhs,
                                                   const char* op) {
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2), r = V.size(1), R = rhs.size(1);
  const int64_t k = q * r;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto A_inv = at::empty_like(W);
  auto logdet_spot = at::empty({G, n}, W.options());
  auto first_bad = at::full({1}, G, W.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::launch_spot_inverse_logdet<double>(
      W.data_ptr<double>(), prior.dinv.data_ptr<double>(), G, n, q, A_inv.data_ptr<double>(),
      logdet_spot.data_ptr<double>(), first_bad.data_ptr<int>(), stream));
  const int64_t bad_gene = first_bad.item<int>();
  TORCH_CHECK(bad_gene >= G, "splisosm::", op, ": gene ", bad_gene,
              ": diag(1/d) + W_s is not positive definite (is W positive semi-definite?)");
  auto logdet = logdet_spot.sum(1);
  auto x = at::empty_like(rhs);
  const auto Vt = V.t().contiguous();
  const int64_t chunk = std::max<int64_t>(1, kDenseBudget / std::max<int64_t>(1, q * q * r * n));
  for (int64_t g0 = 0; g0 < G; g0 += chunk) {
    const int64_t gc = std::min(chunk, G - g0);
    const auto Ainv_c = A_inv.narrow(0, g0, gc);
    const auto e = prior.e.narrow(0, g0, gc).reshape({gc, k});  // index j r + k
    // scaled[g, j, l, k, s] = V_sk A_s^-1[j, l]; one GEMM with V (folded over the batch) gives
    // M[g, j, l, k, m] = sum_s V_sk A_s^-1[j, l] V_sm, the (j, l) blocks of U^T A^-1 U.
    const auto scaled = Vt.view({1, 1, 1, r, n}) * Ainv_c.permute({0, 2, 3, 1}).unsqueeze(3);
    const auto M = at::matmul(scaled, V).permute({0, 1, 3, 2, 4}).reshape({gc, k, k});
    const auto [L, info] = at::linalg_cholesky_ex(M);
    const int64_t bad_M = first_true(info.ne(0));
    TORCH_CHECK(bad_M < 0, "splisosm::", op, ": gene ", g0 + bad_M,
                ": U^T (diag(1/d) + W)^-1 U is not positive definite");
    auto core = at::matmul(L.transpose(1, 2) * e.unsqueeze(1), L);
    core.diagonal(0, 1, 2).add_(1);
    const auto [LS, info2] = at::linalg_cholesky_ex(core);
    const int64_t bad_H = first_true(info2.ne(0));
    TORCH_CHECK(bad_H < 0, "splisosm::", op, ": gene ", g0 + bad_H,
                ": the Laplace system H is not positive definite");
    logdet.narrow(0, g0, gc).add_(2 * LS.diagonal(0, 1, 2).log().sum(-1));
    if (R == 0) continue;
    // Per-spot products with A^-1 for all right-hand sides: (gc, R, n, q).
    const auto spot_solve = [&](const at::Tensor& vecs) {
      return at::matmul(Ainv_c.unsqueeze(1), vecs.unsqueeze(-1)).squeeze(-1);
    };
    const auto ag = spot_solve(rhs.narrow(0, g0, gc));
    // t (gc, q r, R) = E U^T A^-1 g, entries j r + k.
    const auto t = at::matmul(Vt, ag).transpose(-1, -2).reshape({gc, R, k}).transpose(1, 2) *
                   e.unsqueeze(-1);
    const auto w = at::cholesky_solve(at::matmul(L.transpose(1, 2), t), LS);
    const auto c = t - e.unsqueeze(-1) * at::matmul(L, w);
    // back (gc, R, n, q) = U c: column j of a system is V c[j r : (j + 1) r].
    const auto back = at::matmul(V, c.view({gc, q, r, R})).permute({0, 3, 2, 1});
    x.narrow(0, g0, gc).copy_(ag - spot_solve(back));
  }
  return {x, logdet};
}

// Full rank: the determinant lemma gains nothing (r q = n q), so H is formed densely for a chunk
// of genes and factorised by batched Cholesky, the route of the dense reference.
at::Tensor logdet_eig_full_rank(const at::Tensor& W, const at::Tensor& V, const EigPrior& prior) {
  const int64_t G = W.size(0), n = W.size(1), q = W.size(2), nq = n * q;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty({G}, W.options());
  const auto Vt = V.t();
  const int64_t chunk = std::max<int64_t>(1, kDenseBudget / (nq * nq));
  for (int64_t g0 = 0; g0 < G; g0 += chunk) {
    const int64_t gc = std::min(chunk, G - g0);
    // Sigma_j^-1 = V diag(1/c_j) V^T for every gene and column of the chunk: (gc, q, n, n).
    const auto prec = at::matmul(V.view({1, 1, n, n}) * prior.e.narrow(0, g0, gc).unsqueeze(2), Vt);
    auto H = at::zeros({gc, q, n, q, n}, W.options());
    for (int64_t j = 0; j < q; ++j) H.select(1, j).select(2, j).copy_(prec.select(1, j));
    C10_CUDA_CHECK(cuda::launch_add_spot_blocks<double>(W.narrow(0, g0, gc).data_ptr<double>(), gc,
                                                        n, q, H.data_ptr<double>(), stream));
    const auto [L, info] = at::linalg_cholesky_ex(H.view({gc, nq, nq}));
    const int64_t bad = first_true(info.ne(0));
    TORCH_CHECK(bad < 0, "splisosm::laplace_logdet_eig: gene ", g0 + bad,
                ": the Laplace system H is not positive definite");
    out.narrow(0, g0, gc).copy_(2 * L.diagonal(0, 1, 2).log().sum(-1));
  }
  return out;
}

at::Tensor laplace_logdet_eig_cuda(const at::Tensor& W_in, const at::Tensor& evals_in,
                                   const at::Tensor& evecs_in, const at::Tensor& v_in,
                                   const at::Tensor& theta_in) {
  check_W(W_in);
  check_eig(W_in, evals_in, evecs_in);
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}, {&evecs_in, "evecs"}, {&evals_in, "evals"}}, v_in, theta_in,
                       false);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const auto W = to_f64(W_in), V = to_f64(evecs_in), lam = to_f64(evals_in);
  const auto prior = eig_prior(lam, W.size(1), to_f64(v_in), to_f64(theta_in));
  const auto out = V.size(1) == W.size(1) ? logdet_eig_full_rank(W, V, prior)
                                          : std::get<1>(low_rank_direct(
                                                W, V, prior,
                                                at::empty({W.size(0), 0, W.size(1), W.size(2)},
                                                          W.options()),
                                                "laplace_logdet_eig"));
  return out.to(W_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> laplace_lowrank_cuda(const at::Tensor& W_in,
                                                        const at::Tensor& rhs_in,
                                                        const at::Tensor& evals_in,
                                                        const at::Tensor& evecs_in,
                                                        const at::Tensor& v_in,
                                                        const at::Tensor& theta_in) {
  check_W(W_in);
  check_laplace_rhs(W_in, rhs_in);
  check_eig(W_in, evals_in, evecs_in);
  check_low_rank(evecs_in);
  check_variance(W_in, v_in, theta_in);
  check_laplace_values({{&W_in, "W"}, {&rhs_in, "rhs"}, {&evecs_in, "evecs"}, {&evals_in, "evals"}},
                       v_in, theta_in, false);
  const c10::cuda::CUDAGuard guard(W_in.device());
  const auto W = to_f64(W_in), V = to_f64(evecs_in);
  const auto prior = eig_prior(to_f64(evals_in), W.size(1), to_f64(v_in), to_f64(theta_in));
  const auto [x, logdet] = low_rank_direct(W, V, prior, to_f64(rhs_in), "laplace_lowrank");
  return {x.to(rhs_in.scalar_type()), logdet.to(W_in.scalar_type())};
}

// ---------------------------------------------------------------------------------------------
// Sparse-precision ops: CPU fallback
// ---------------------------------------------------------------------------------------------
//
// These ops factorise one sparse Cholesky per gene (supernodal, with a shared symbolic
// analysis; csrc/cpu/block_cholesky.h). A GPU version would need a sparse direct solver (cuDSS / cuSOLVER-sp), which is not
// a dependency, and supernodal factorisations of ~10^4 unknowns per gene are latency-bound on a
// GPU anyway; the inputs and outputs are O(G n q^2), small next to the factorisation work. So the
// CUDA kernel copies to the host, calls the CPU kernel through the dispatcher (the CPU tensors
// route the call there) and copies the results back to the device of the main input.

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using TT = std::tuple<at::Tensor, at::Tensor>;
using CT = const at::Tensor&;

TT laplace_sparse_cuda(CT W, CT rhs, CT crow, CT col, CT val, CT v, CT theta) {
  static const auto op = find_op<TT(CT, CT, CT, CT, CT, CT, CT)>("splisosm::laplace_sparse");
  const auto [x, logdet] =
      op.call(W.cpu(), rhs.cpu(), crow.cpu(), col.cpu(), val.cpu(), v.cpu(), theta.cpu());
  return {x.to(W.device()), logdet.to(W.device())};
}

using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

T4 laplace_sparse_logdet_grad_cuda(CT W, CT crow, CT col, CT val, CT v, CT theta) {
  static const auto op =
      find_op<T4(CT, CT, CT, CT, CT, CT)>("splisosm::laplace_sparse_logdet_grad");
  const auto [logdet, gW, gv, gt] =
      op.call(W.cpu(), crow.cpu(), col.cpu(), val.cpu(), v.cpu(), theta.cpu());
  return {logdet.to(W.device()), gW.to(W.device()), gv.to(W.device()), gt.to(W.device())};
}

T3 sparse_shifted_solve_cuda(CT crow, CT col, CT val, CT scale, CT shift, CT rhs,
                             bool trace_inverse) {
  static const auto op =
      find_op<T3(CT, CT, CT, CT, CT, CT, bool)>("splisosm::sparse_shifted_solve");
  const auto [x, logdet, trace] = op.call(crow.cpu(), col.cpu(), val.cpu(), scale.cpu(),
                                          shift.cpu(), rhs.cpu(), trace_inverse);
  return {x.to(rhs.device()), logdet.to(rhs.device()), trace.to(rhs.device())};
}

at::Tensor sparse_inverse_diagonal_cuda(CT crow, CT col, CT val) {
  static const auto op = find_op<at::Tensor(CT, CT, CT)>("splisosm::sparse_inverse_diagonal");
  return op.call(crow.cpu(), col.cpu(), val.cpu()).to(val.device());
}

}  // namespace

TORCH_LIBRARY_IMPL(splisosm, CUDA, m) {
  m.impl("multinom_terms", &multinom_terms_cuda);
  m.impl("fixed_effect_info", &fixed_effect_info_cuda);
  m.impl("laplace_solve_eig", &laplace_solve_eig_cuda);
  m.impl("laplace_logdet_eig", &laplace_logdet_eig_cuda);
  m.impl("laplace_lowrank", &laplace_lowrank_cuda);
  m.impl("laplace_sparse", &laplace_sparse_cuda);
  m.impl("laplace_sparse_logdet_grad", &laplace_sparse_logdet_grad_cuda);
  m.impl("sparse_shifted_solve", &sparse_shifted_solve_cuda);
  m.impl("sparse_inverse_diagonal", &sparse_inverse_diagonal_cuda);
}

}  // namespace splisosm
