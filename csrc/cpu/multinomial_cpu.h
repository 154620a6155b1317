// The multinomial terms for C++ callers that need no curvature blocks (the fitting engine).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace splisosm {

// multinom_terms' log-likelihood (G,) and gradient (G, n, q) of CPU tensors eta (G, n, q) and
// counts (G, n, q + 1), with the same checks, without forming W.
std::tuple<at::Tensor, at::Tensor> multinom_loglik_grad_cpu(const at::Tensor& eta,
                                                            const at::Tensor& counts);

}  // namespace splisosm
