// Input checks shared by the CPU and CUDA bindings. Every message names the offending argument,
// because users reach these through Python wrappers several layers above the op.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace splisosm {

// How a bad argument is reported. Most ops raise RuntimeError (TORCH_CHECK). The Laplace ops
// raise ValueError (TORCH_CHECK_VALUE): their Python wrappers leave the checks of the op inputs
// to them, and in Python a bad argument is a ValueError.
enum class ArgError { kRuntime, kValue };

template <typename... Msg>
inline void check_arg(bool ok, ArgError kind, const Msg&... msg) {
  if (kind == ArgError::kValue) {
    TORCH_CHECK_VALUE(ok, msg...);
  }
  TORCH_CHECK(ok, msg...);
}

inline void check_float(const at::Tensor& t, const char* name,
                        ArgError kind = ArgError::kRuntime) {
  check_arg(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, kind,
            "splisosm: `", name, "` must be float32 or float64, got ", t.scalar_type());
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout,
                       ArgError kind = ArgError::kRuntime) {
  check_arg(t.dim() == rank, kind, "splisosm: `", name, "` must have shape ", layout, " (", rank,
            " dimensions), got ", t.sizes());
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "splisosm: `", bn, "` must have the dtype of `",
              an, "` (", a.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "splisosm: `", bn, "` must be on the device of `", an,
              "` (", a.device(), "), got ", b.device());
}

inline void check_dim(const at::Tensor& t, int64_t d, int64_t expected, const char* name,
                      const char* what, ArgError kind = ArgError::kRuntime) {
  check_arg(t.size(d) == expected, kind, "splisosm: `", name, "` dimension ", d, " (", what,
            ") must be ", expected, ", got ", t.size(d));
}

// The dispatcher picks one kernel from the highest-priority device among all tensor arguments,
// so a kernel can still be handed tensors of another device type, or of another GPU.
inline void check_device_type(const at::Tensor& t, const char* name, c10::DeviceType device,
                              ArgError kind = ArgError::kRuntime) {
  check_arg(t.device().type() == device, kind, "splisosm: `", name, "` must be a ",
            c10::DeviceTypeName(device), " tensor for the ", c10::DeviceTypeName(device),
            " kernel, got ", t.device());
}

// Conditions on the values of arguments: a 0-dim bool tensor (true: fine) and the message that
// names the argument otherwise (ValueError). They reach the host together, so on a GPU the
// checks of one call cost one transfer instead of one per condition.
using ValueCondition = std::pair<at::Tensor, std::string>;

inline void check_values(const std::vector<ValueCondition>& conditions) {
  if (conditions.empty()) return;
  std::vector<at::Tensor> flags;
  flags.reserve(conditions.size());
  for (const auto& c : conditions) flags.push_back(c.first);
  const auto ok = at::stack(flags).to(at::kCPU);
  for (size_t i = 0; i < conditions.size(); ++i)
    TORCH_CHECK_VALUE(ok.data_ptr<bool>()[i], "splisosm: ", conditions[i].second);
}

inline ValueCondition finite_condition(const at::Tensor& t, const char* name) {
  return {at::isfinite(t).all(), std::string("`") + name + "` contains NaN or infinite values"};
}

// Shape contract of the multinomial ops: eta (G, n, q), counts (G, n, q + 1).
inline void check_multinom_inputs(const at::Tensor& eta, const at::Tensor& counts,
                                  c10::DeviceType device) {
  check_float(eta, "eta");
  check_rank(eta, 3, "eta", "(G, n, q)");
  check_rank(counts, 3, "counts", "(G, n, m)");
  check_same(eta, "eta", counts, "counts");
  check_dim(counts, 0, eta.size(0), "counts", "genes G, as in eta");
  check_dim(counts, 1, eta.size(1), "counts", "spots n, as in eta");
  check_dim(counts, 2, eta.size(2) + 1, "counts", "isoforms m = q + 1, eta has q columns");
  TORCH_CHECK(eta.size(2) >= 1, "splisosm: `eta` needs q >= 1 (genes with at least 2 isoforms)");
  check_device_type(eta, "eta", device);
}

// W (G, n, q, q) and a per-spot vector argument (G, n, q).
inline void check_blocks(const at::Tensor& W, const at::Tensor& r, const char* rname) {
  check_float(W, "W");
  check_rank(W, 4, "W", "(G, n, q, q)");
  check_same(W, "W", r, rname);
  TORCH_CHECK(W.size(2) == W.size(3), "splisosm: `W` blocks must be square (G, n, q, q), got ",
              W.sizes());
}

// fixed_effect_info: X (n, P), W (G, n, q, q), resid (G, n, q).
inline void check_fixed_effect_inputs(const at::Tensor& X, const at::Tensor& W,
                                      const at::Tensor& resid, c10::DeviceType device) {
  check_blocks(W, resid, "resid");
  check_rank(X, 2, "X", "(n, P)");
  check_same(W, "W", X, "X");
  check_rank(resid, 3, "resid", "(G, n, q)");
  check_device_type(W, "W", device);
  check_dim(X, 0, W.size(1), "X", "spots n, as in W");
  check_dim(resid, 0, W.size(0), "resid", "genes G, as in W");
  check_dim(resid, 1, W.size(1), "resid", "spots n, as in W");
  check_dim(resid, 2, W.size(2), "resid", "q, as in W");
}

// ---------------------------------------------------------------------------------------------
// Laplace ops. Inputs are converted to float64, so their dtypes may differ; their device may not,
// and `W` sets it. The Python wrappers check only what they read themselves, so these checks are
// the ones the native path makes: a bad argument is a ValueError naming it.
// ---------------------------------------------------------------------------------------------
constexpr ArgError kLaplaceArg = ArgError::kValue;

// The Laplace ops take their device (and the CUDA device guard) from `W`; the rest must follow.
inline void check_device_of_W(const at::Tensor& t, const char* name, const at::Tensor& W) {
  TORCH_CHECK_VALUE(t.device() == W.device(), "splisosm: `", name,
                    "` must be on the device of `W` (", W.device(), "), got ", t.device());
}

// W (G, n, q, q) with q >= 1.
inline void check_laplace_W(const at::Tensor& W, c10::DeviceType device) {
  check_float(W, "W", kLaplaceArg);
  check_device_type(W, "W", device, kLaplaceArg);
  check_rank(W, 4, "W", "(G, n, q, q)", kLaplaceArg);
  TORCH_CHECK_VALUE(W.size(2) == W.size(3) && W.size(2) >= 1,
                    "splisosm: `W` blocks must be square (G, n, q, q) with q >= 1, got ",
                    W.sizes());
}

// rhs (G, R, n, q) for a checked W.
inline void check_laplace_rhs(const at::Tensor& W, const at::Tensor& rhs) {
  check_float(rhs, "rhs", kLaplaceArg);
  check_device_of_W(rhs, "rhs", W);
  check_rank(rhs, 4, "rhs", "(G, R, n, q)", kLaplaceArg);
  check_dim(rhs, 0, W.size(0), "rhs", "genes G, as in W", kLaplaceArg);
  check_dim(rhs, 2, W.size(1), "rhs", "spots n, as in W", kLaplaceArg);
  check_dim(rhs, 3, W.size(2), "rhs", "columns q, as in W", kLaplaceArg);
}

// Eigenpairs of the kernel K: evecs (n, r), evals (r,), 1 <= r <= n.
inline void check_eig(const at::Tensor& W, const at::Tensor& evals, const at::Tensor& evecs) {
  check_float(evals, "evals", kLaplaceArg);
  check_float(evecs, "evecs", kLaplaceArg);
  check_device_of_W(evals, "evals", W);
  check_device_of_W(evecs, "evecs", W);
  check_rank(evecs, 2, "evecs", "(n, r)", kLaplaceArg);
  check_rank(evals, 1, "evals", "(r,)", kLaplaceArg);
  check_dim(evecs, 0, W.size(1), "evecs", "spots n, as in W", kLaplaceArg);
  check_dim(evals, 0, evecs.size(1), "evals", "rank r, as in evecs", kLaplaceArg);
  TORCH_CHECK_VALUE(evecs.size(1) >= 1 && evecs.size(1) <= evecs.size(0),
                    "splisosm: `evecs` must have 1 <= r <= n columns, got ", evecs.sizes());
}

// The direct route of laplace_lowrank rests on the residual eigenvalue, which only r < n has.
inline void check_low_rank(const at::Tensor& evecs) {
  TORCH_CHECK_VALUE(evecs.size(1) < evecs.size(0), "splisosm: `evecs` must be low rank (r < n) "
                    "for laplace_lowrank, got ", evecs.sizes());
}

// Stopping rule of the CG solver of laplace_solve_eig.
inline void check_cg_controls(double tol, int64_t max_iter) {
  TORCH_CHECK_VALUE(tol > 0, "splisosm: `tol` must be positive, got ", tol);
  TORCH_CHECK_VALUE(max_iter >= 1, "splisosm: `max_iter` must be >= 1, got ", max_iter);
}

// Shapes of v and theta, (G, q); check_laplace_values checks their values.
inline void check_variance(const at::Tensor& W, const at::Tensor& v, const at::Tensor& theta) {
  for (auto [t, name] : {std::pair{&v, "v"}, std::pair{&theta, "theta"}}) {
    check_float(*t, name, kLaplaceArg);
    check_device_of_W(*t, name, W);
    check_rank(*t, 2, name, "(G, q)", kLaplaceArg);
    check_dim(*t, 0, W.size(0), name, "genes G, as in W", kLaplaceArg);
    check_dim(*t, 1, W.size(2), name, "columns q, as in W", kLaplaceArg);
  }
}

// Values of the Laplace ops' arguments once their shapes are checked: every tensor finite,
// v > 0 and 0 <= theta < 1; the sparse form divides by theta, so it needs theta > 0
// (`open_theta`). One device round trip for all of them.
inline void check_laplace_values(
    std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors, const at::Tensor& v,
    const at::Tensor& theta, bool open_theta) {
  std::vector<ValueCondition> conditions;
  for (auto [t, name] : tensors) conditions.push_back(finite_condition(*t, name));
  conditions.push_back(finite_condition(v, "v"));
  conditions.push_back(finite_condition(theta, "theta"));
  conditions.emplace_back(v.gt(0).all(), "`v` (total variance) must be positive");
  const auto low_ok = open_theta ? theta.gt(0) : theta.ge(0);
  conditions.emplace_back(low_ok.logical_and(theta.lt(1)).all(),
                          open_theta ? "`theta` (spatial proportion) must satisfy 0 < theta < 1"
                                     : "`theta` (spatial proportion) must satisfy 0 <= theta < 1");
  check_values(conditions);
}

}  // namespace splisosm
