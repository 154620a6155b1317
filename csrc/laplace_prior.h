// Prior of the eigenbasis Laplace ops, shared by the CPU and CUDA kernels so that both clip the
// low-rank correction identically and reject the same `evals`.
#pragma once
#include <ATen/ATen.h>

namespace splisosm {

// Bound on the low-rank correction 1/c - 1/d of the prior precision. As theta -> 1 the white-noise
// variance d = v (1 - theta) goes to 0 and 1/d grows without bound; the bound keeps the low-rank
// terms finite. The Python references of these ops clip at the same value (LOW_RANK_CLIP).
constexpr double kLowRankClip = 1e6;

// Prior eigenvalues c (G, q, r) and the eigenbasis precision: full rank V diag(e) V^T with
// e = 1/c and dinv = 0; low rank dinv I + V diag(e) V^T with e = clip(1/c - 1/d).
struct EigPrior {
  at::Tensor c, e, dinv;  // (G, q, r), (G, q, r), (G, q); float64, contiguous
};

// lam (r,), v and theta (G, q), all float64 and contiguous; n spots.
inline EigPrior eig_prior(const at::Tensor& lam, int64_t n, const at::Tensor& v,
                          const at::Tensor& theta) {
  const auto vv = v.unsqueeze(-1), tt = theta.unsqueeze(-1);
  auto c = (vv * (tt * lam.view({1, 1, -1}) + (1 - tt))).contiguous();
  TORCH_CHECK_VALUE(c.gt(0).all().item<bool>(),
                    "splisosm: prior eigenvalues v (theta lambda + 1 - theta) must be positive; "
                    "`evals` is too negative");
  if (lam.size(0) == n) return {c, c.reciprocal(), at::zeros_like(v)};
  auto dinv = (v * (1 - theta)).reciprocal();
  auto e = (c.reciprocal() - dinv.unsqueeze(-1)).clamp(-kLowRankClip, kLowRankClip);
  return {c, e.contiguous(), dinv.contiguous()};
}

}  // namespace splisosm
