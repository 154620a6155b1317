// Input checks and settings of the joint_gd_fit op, shared by the CPU and CUDA bindings so both
// devices accept the same inputs and reject the rest with the same messages.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <initializer_list>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"
#include "engine_rules.h"

namespace splisosm {

inline engine::Prior parse_engine_prior(const std::string& name, double alpha, double beta) {
  engine::Prior p;
  if (name == "none") return p;
  TORCH_CHECK(name == "gamma" || name == "inv_gamma",
              "splisosm: `prior` must be 'none', 'gamma' or 'inv_gamma', got '", name, "'");
  TORCH_CHECK(alpha > 0 && beta > 0 && std::isfinite(alpha) && std::isfinite(beta),
              "splisosm: the variance prior needs finite alpha > 0 and beta > 0, got alpha=",
              alpha, ", beta=", beta);
  p.kind = name == "gamma" ? engine::kPriorGamma : engine::kPriorInvGamma;
  p.alpha = alpha;
  p.beta = beta;
  p.log_norm = alpha * std::log(beta) - std::lgamma(alpha);
  return p;
}

inline void check_engine_param(const at::Tensor& t, const at::Tensor& like, const char* name,
                               std::initializer_list<int64_t> shape, const char* layout) {
  check_same(like, "counts", t, name);
  check_rank(t, static_cast<int64_t>(shape.size()), name, layout);
  int64_t d = 0;
  for (int64_t s : shape) {
    if (s >= 0) check_dim(t, d, s, name, layout);
    ++d;
  }
}

// Checks every argument of joint_gd_fit (see registration.cpp) for a kernel on `device` and
// returns the parsed settings.
inline engine::Settings check_engine_inputs(
    const at::Tensor& counts, const at::Tensor& X, const at::Tensor& evals,
    const at::Tensor& evecs, const at::Tensor& nu, const at::Tensor& beta, const at::Tensor& bias,
    const at::Tensor& sigma, const at::Tensor& theta_logit, bool train_sigma, bool train_theta,
    c10::string_view prior, double prior_alpha, double prior_beta, double min_variance,
    double max_theta, c10::string_view optim, double lr, double tol, bool tol_relative,
    int64_t patience, int64_t max_epochs, c10::DeviceType device) {
  check_float(counts, "counts");
  check_rank(counts, 3, "counts", "(G, n, m)");
  check_device_type(counts, "counts", device);
  const int64_t G = counts.size(0), n = counts.size(1), q = counts.size(2) - 1;
  TORCH_CHECK(q >= 1, "splisosm: `counts` needs at least two isoforms per gene");
  check_engine_param(X, counts, "X", {n, -1}, "(n, P)");
  const int64_t P = X.size(1);
  check_engine_param(evecs, counts, "evecs", {n, -1}, "(n, r)");
  const int64_t r = evecs.size(1);
  check_engine_param(evals, counts, "evals", {r}, "(r,)");
  check_engine_param(nu, counts, "nu", {G, n, q}, "(G, n, q)");
  check_engine_param(beta, counts, "beta", {G, P, q}, "(G, P, q)");
  check_engine_param(bias, counts, "bias", {G, q}, "(G, q)");
  check_engine_param(sigma, counts, "sigma", {G, -1}, "(G, C)");
  const int64_t C = sigma.size(1);
  TORCH_CHECK(C == 1 || C == q, "splisosm: `sigma` must have 1 or q = ", q,
              " columns (shared or per-isoform variance), got ", C);
  check_engine_param(theta_logit, counts, "theta_logit", {G, C}, "(G, C)");
  const std::string optim_name(optim);
  TORCH_CHECK(optim_name == "adam" || optim_name == "sgd",
              "splisosm: the native engine supports optim 'adam' or 'sgd', got '", optim_name, "'");
  TORCH_CHECK(std::isfinite(lr) && lr > 0, "splisosm: `lr` must be a positive number, got ", lr);
  TORCH_CHECK(patience >= 1, "splisosm: `patience` must be >= 1, got ", patience);
  TORCH_CHECK(max_epochs >= 0, "splisosm: `max_epochs` must be >= 0, got ", max_epochs);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0, "splisosm: `tol` must be a finite number >= 0, got ",
              tol);
  TORCH_CHECK(min_variance > 0 && max_theta > 0 && max_theta <= 1,
              "splisosm: need min_variance > 0 and 0 < max_theta <= 1");

  engine::Settings s;
  s.train_sigma = train_sigma;
  s.train_theta = train_theta;
  s.adam = optim_name == "adam";
  s.prior = parse_engine_prior(std::string(prior), prior_alpha, prior_beta);
  s.stop = {tol, tol_relative, patience};
  s.min_variance = min_variance;
  s.max_theta = max_theta;
  s.lr = lr;
  s.max_epochs = max_epochs;
  return s;
}

// The per-group tensors of one joint_gd_fit call (a group: genes of one isoform count).
struct EngineGroups {
  at::TensorList counts, nu, beta, bias, sigma, theta_logit;
  std::vector<at::Tensor> start(size_t i) const {
    return {nu[i], beta[i], bias[i], sigma[i], theta_logit[i]};
  }
};

// Checks every group as check_engine_inputs does (X and the eigenpairs are shared by all).
inline engine::Settings check_engine_groups(
    const EngineGroups& groups, const at::Tensor& X, const at::Tensor& evals,
    const at::Tensor& evecs, bool train_sigma, bool train_theta, c10::string_view prior,
    double prior_alpha, double prior_beta, double min_variance, double max_theta,
    c10::string_view optim, double lr, double tol, bool tol_relative, int64_t patience,
    int64_t max_epochs, c10::DeviceType device) {
  const size_t n_groups = groups.counts.size();
  TORCH_CHECK(n_groups >= 1, "splisosm: `counts` must hold at least one group of genes");
  for (auto [list, name] : {std::pair{&groups.nu, "nu"}, std::pair{&groups.beta, "beta"},
                            std::pair{&groups.bias, "bias"}, std::pair{&groups.sigma, "sigma"},
                            std::pair{&groups.theta_logit, "theta_logit"}})
    TORCH_CHECK(list->size() == n_groups, "splisosm: `", name, "` must hold one tensor per group ",
                "of `counts` (", n_groups, "), got ", list->size());
  engine::Settings s;
  for (size_t i = 0; i < n_groups; ++i)
    s = check_engine_inputs(groups.counts[i], X, evals, evecs, groups.nu[i], groups.beta[i],
                            groups.bias[i], groups.sigma[i], groups.theta_logit[i], train_sigma,
                            train_theta, prior, prior_alpha, prior_beta, min_variance, max_theta,
                            optim, lr, tol, tol_relative, patience, max_epochs, device);
  return s;
}

// joint_gd_fit's outputs: per group the best nu, beta, bias, |sigma|, theta_logit, the loss
// history, best loss, best epoch and convergence; and whether any sigma^2 fell below the floor.
constexpr size_t kEngineOutputs = 9;
using EngineResults =
    std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
               std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
               std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
               at::Tensor>;

// From each group's kEngineOutputs tensors plus its low-variance flag.
inline EngineResults collect_engine_results(const std::vector<std::vector<at::Tensor>>& groups) {
  std::array<std::vector<at::Tensor>, kEngineOutputs> lists;
  at::Tensor low;
  for (const auto& g : groups) {
    for (size_t k = 0; k < kEngineOutputs; ++k) lists[k].push_back(g[k]);
    low = low.defined() ? low.logical_or(g[kEngineOutputs]) : g[kEngineOutputs];
  }
  return {lists[0], lists[1], lists[2], lists[3], lists[4], lists[5], lists[6], lists[7],
          lists[8], low};
}

}  // namespace splisosm
