// The one place where splisosm's operator schemas are declared.
//
// Backend files (csrc/cpu/*.cpp, csrc/cuda/*_binding.cpp) only provide implementations through
// TORCH_LIBRARY_IMPL; Python wrappers in splisosm/ops add fake kernels and autograd. Ops with a
// Python implementation (torch.library.custom_op) are defined next to their callers in Python.
#include <torch/library.h>

#ifndef SPLISOSM_NO_PYMODULE
#include <Python.h>

// Importing splisosm._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
#endif

TORCH_LIBRARY(splisosm, m) {
  // Multinomial-softmax terms of G genes (last isoform is the reference category):
  // eta (G, n, q), counts (G, n, q + 1) ->
  //   loglik (G,) with log-factorial constants, grad (G, n, q) = Y[:q] - N p[:q],
  //   W (G, n, q, q) = N (diag p - p p^T).
  m.def("multinom_terms(Tensor eta, Tensor counts) -> (Tensor, Tensor, Tensor)");

  // Fixed-effect information and score for the design [X, 1] (intercept last):
  // X (n, P), W (G, n, q, q), resid (G, n, q) ->
  //   info (G, q(P+1), q(P+1)) with index j*(P+1)+f, score (G, q(P+1)).
  m.def("fixed_effect_info(Tensor X, Tensor W, Tensor resid) -> (Tensor, Tensor)");

  // Laplace system H = I_q (x) Sigma^-1 + W of the spatial random effects, with per-column prior
  // Sigma_j = v_j (theta_j K + (1 - theta_j) I); v, theta are (G, q).
  // Eigenbasis form: K = V diag(lambda) V^T (rank r <= n; r < n adds the residual eigenvalue).
  //   rhs (G, R, n, q) -> (H^-1 rhs (G, R, n, q), CG iterations used per gene (G,) int64)
  m.def("laplace_solve_eig(Tensor W, Tensor rhs, Tensor evals, Tensor evecs, Tensor v, Tensor theta, "
        "float tol, int max_iter) -> (Tensor, Tensor)");
  //   -> log det H per gene (G,)
  m.def("laplace_logdet_eig(Tensor W, Tensor evals, Tensor evecs, Tensor v, Tensor theta) -> Tensor");
  // Low-rank eigenbasis form (r < n) solved directly (Woodbury, one rq x rq factor per gene):
  //   rhs (G, R, n, q) -> (H^-1 rhs (G, R, n, q), log det H (G,))
  m.def("laplace_lowrank(Tensor W, Tensor rhs, Tensor evals, Tensor evecs, Tensor v, "
        "Tensor theta) -> (Tensor, Tensor)");
  // Sparse-precision form: K^-1 = Q given as CSR (crow, col, val), float64, same for all genes.
  //   rhs (G, R, n, q) -> (H^-1 rhs (G, R, n, q), log det H (G,))
  m.def("laplace_sparse(Tensor W, Tensor rhs, Tensor crow, Tensor col, Tensor val, Tensor v, "
        "Tensor theta) -> (Tensor, Tensor)");
  //   -> (log det H (G,), and its gradients w.r.t. W (G, n, q, q), v (G, q) and theta (G, q)).
  //   Differentiable in log det H (first derivatives: the other outputs, which are those
  //   derivatives, are not differentiable); autograd registered in splisosm/ops/laplace.py.
  m.def("laplace_sparse_logdet_grad(Tensor W, Tensor crow, Tensor col, Tensor val, Tensor v, "
        "Tensor theta) -> (Tensor, Tensor, Tensor, Tensor)");
  // Shifted sparse precision M_g = scale_g Q + shift_g I (Q as above; scale, shift (G,) float64):
  //   rhs (G, R, n) -> (M_g^-1 rhs (G, R, n), log det M_g (G,),
  //                     tr M_g^-1 (G,) if trace_inverse else (0,))
  m.def("sparse_shifted_solve(Tensor crow, Tensor col, Tensor val, Tensor scale, Tensor shift, "
        "Tensor rhs, bool trace_inverse=False) -> (Tensor, Tensor, Tensor)");
  // diag(M^-1) of a sparse SPD CSR matrix (float64) by selected inversion of its Cholesky factor.
  m.def("sparse_inverse_diagonal(Tensor crow, Tensor col, Tensor val) -> Tensor");

  // a (M, K) @ b (K, N), float32, through the engine's packed-panel kernel (b packed per call;
  // the engine packs its eigenvectors once per fit). CPUs with AVX2 and FMA only.
  m.def("panel_matmul(Tensor a, Tensor b) -> Tensor");

  // Native fitting engine: whole joint_gd fits (Adam or SGD, per-gene early stopping) of groups
  // of genes, one group per isoform count, with prior Sigma_j = v_j (theta_j K + (1 - theta_j) I),
  // K = V diag(evals) V^T (r = 0: white noise), X and the eigenpairs shared by all groups. Per
  // group: counts (G, n, m), X (n, P), evals (r,), evecs (n, r); starting parameters
  // nu (G, n, q), beta (G, P, q), bias (G, q), sigma (G, C), theta_logit (G, C) ->
  //   per group (best nu, beta, bias, |sigma|, theta_logit, loss history (epochs, G) float64,
  //   best loss (G,) float64, best epoch (G,) int64, converged (G,) bool),
  //   and whether any sigma^2 fell below min_variance () bool
  m.def("joint_gd_fit(Tensor[] counts, Tensor X, Tensor evals, Tensor evecs, Tensor[] nu, "
        "Tensor[] beta, Tensor[] bias, Tensor[] sigma, Tensor[] theta_logit, bool train_sigma, "
        "bool train_theta, str prior, float prior_alpha, float prior_beta, float min_variance, "
        "float max_theta, str optim, float lr, float tol, bool tol_relative, int patience, "
        "int max_epochs) -> (Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], Tensor[], "
        "Tensor[], Tensor[], Tensor[], Tensor)");
}
