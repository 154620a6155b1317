// The per-gene rules of the native joint_gd engine, shared by its CPU and CUDA backends so that
// both fit the same model with the same optimiser and stop by the same rule: the variance
// components, the variance prior, torch's Adam/SGD updates and the early-stopping record.
//
// Plain C++ on scalars (no torch headers): every function is callable from host code and, when
// compiled by nvcc, from device code.
#pragma once

#include <float.h>
#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define SPLISOSM_HD __host__ __device__ inline
#else
#define SPLISOSM_HD inline
#endif

namespace splisosm {
namespace engine {

// torch.optim.Adam's defaults (no weight decay, no amsgrad).
constexpr double kBeta1 = 0.9, kBeta2 = 0.999, kAdamEps = 1e-8;

// Below this |sigma| the gamma prior is evaluated at the clamp (torch's clamp subgradient: no
// derivative there).
constexpr double kGammaSigmaFloor = 0.1;

enum PriorKind : int { kPriorNone = 0, kPriorGamma = 1, kPriorInvGamma = 2 };

struct Prior {
  int kind = kPriorNone;
  double alpha = 0, beta = 0, log_norm = 0;  // log_norm = alpha log beta - lgamma(alpha)
};

SPLISOSM_HD bool is_finite(double x) { return x - x == 0; }  // false for +-inf and NaN

// Log density of one variance component and its derivative in sigma (torch's subgradients at the
// clamps: the derivative passes where the clamped value equals its input).
SPLISOSM_HD void log_prior(const Prior& p, double sigma, double min_variance, double& value,
                           double& deriv) {
  value = deriv = 0;
  if (p.kind == kPriorGamma) {
    const double a = fabs(sigma), s = a < kGammaSigmaFloor ? kGammaSigmaFloor : a;
    value = p.log_norm + (p.alpha - 1) * log(s) - p.beta * s;
    const double sign = sigma > 0 ? 1.0 : (sigma < 0 ? -1.0 : 0.0);
    deriv = a >= kGammaSigmaFloor ? ((p.alpha - 1) / s - p.beta) * sign : 0.0;
  } else if (p.kind == kPriorInvGamma) {
    const double sq = sigma * sigma, v = sq < min_variance ? min_variance : sq;
    value = p.log_norm - (p.alpha + 1) * log(v) - p.beta / v;
    deriv = sq >= min_variance ? (-(p.alpha + 1) / v + p.beta / (v * v)) * 2 * sigma : 0.0;
  }
}

// One variance component: v = max(sigma^2, min_variance), theta = min(sigmoid(logit), max_theta)
// and the white-noise variance d = v (1 - theta); true when sigma^2 fell below the floor.
SPLISOSM_HD bool variance_component(double sigma, double theta_logit, double min_variance,
                                    double max_theta, double& v, double& theta, double& d) {
  const double sq = sigma * sigma;
  v = sq < min_variance ? min_variance : sq;
  const double sig = 1.0 / (1.0 + exp(-theta_logit));
  theta = max_theta < sig ? max_theta : sig;
  d = v * (1 - theta);
  return sq < min_variance;
}

// Adds the prior terms of the n - r directions outside the kernel's eigenvectors (white noise of
// variance d there) to one column's quadratic form, its theta-derivative (up to the factor v),
// log det and its theta-derivative; rest = |nu|^2 - |V^T nu|^2.
SPLISOSM_HD void add_white_part(double rest, double n_rest, double v, double theta, double d,
                                double& quad, double& dquad, double& logdet, double& dlogdet) {
  quad += rest / d;
  dquad += rest * v / (d * d);
  logdet += n_rest * log(d);
  dlogdet -= n_rest / (1 - theta);
}

// Gradients of the loss (minus the objective) in sigma and theta_logit of one component, from
// dl/dv, dl/dtheta and the prior's derivative.
SPLISOSM_HD void variance_grads(double sigma, double theta_logit, double min_variance,
                                double max_theta, double dl_dv, double dl_dtheta,
                                double dprior, double& g_sigma, double& g_theta) {
  const double sig = 1.0 / (1.0 + exp(-theta_logit));
  const double dsq = sigma * sigma >= min_variance ? 2 * sigma : 0.0;
  g_sigma = -(dl_dv * dsq + dprior);
  g_theta = -(sig <= max_theta ? dl_dtheta * sig * (1 - sig) : 0.0);
}

// Step-dependent scalars of Adam at step t (1-based; shared by all genes of a fit).
struct AdamScalars {
  double step_size, bias2_sqrt;  // lr / (1 - beta1^t), sqrt(1 - beta2^t)
};
inline AdamScalars adam_scalars(double lr, int64_t t) {
  return {lr / (1 - pow(kBeta1, static_cast<double>(t))),
          sqrt(1 - pow(kBeta2, static_cast<double>(t)))};
}

// torch.optim.Adam's update of one element (moments m1, m2), in the parameter's precision.
template <typename T>
SPLISOSM_HD void adam_update(T& p, T& m1, T& m2, T g, T step_size, T bias2_sqrt) {
  m1 += static_cast<T>(1 - kBeta1) * (g - m1);
  m2 = m2 * static_cast<T>(kBeta2) + static_cast<T>(1 - kBeta2) * g * g;
  const T denom = sqrt(m2) / bias2_sqrt + static_cast<T>(kAdamEps);
  p -= step_size * m1 / denom;
}

// Early stopping of one gene, the Python logger's rule: after each epoch the loss is logged
// (NaN and +inf as +inf, -inf as the lowest finite double; none of them is an improvement); an
// improvement of at least tol (relative: tol max(|best|, 1)) resets the patience counter, any
// other epoch increments it, and a gene stops once the counter reaches `patience`. A strictly
// lower loss becomes the best (and its parameters the best snapshot).
struct StopRule {
  double tol;
  bool relative;
  int64_t patience;
};

struct Record {
  double logged;
  bool improved, stopped, converged;
};

SPLISOSM_HD Record record_loss(const StopRule& rule, double raw, double& best,
                               int64_t& counter) {
  const double kInf = HUGE_VAL;
  const bool finite = is_finite(raw);
  const double loss = raw != raw || raw == kInf ? kInf : (raw == -kInf ? -DBL_MAX : raw);
  const double scale = fabs(best) < 1.0 ? 1.0 : fabs(best);
  const double thr = rule.relative ? rule.tol * scale : rule.tol;
  const double gap = finite ? best - loss : -kInf;
  counter = gap >= thr ? 0 : counter + 1;
  Record rec{loss, gap > 0, counter >= rule.patience, false};
  if (rec.improved) best = loss;
  rec.converged = rec.stopped && finite;
  return rec;
}

// Everything a fit is configured with, parsed and checked by the op's binding.
struct Settings {
  bool train_sigma = false, train_theta = false, adam = true;
  Prior prior;
  StopRule stop{0, false, 1};
  double min_variance = 0, max_theta = 0, lr = 0;
  int64_t max_epochs = 0;
};

}  // namespace engine
}  // namespace splisosm
