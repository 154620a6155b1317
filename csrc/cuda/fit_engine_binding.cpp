// CUDA implementation of joint_gd_fit (schema: registration.cpp): the same fit as the CPU
// engine (csrc/cpu/fit_engine_cpu.cpp, rules in engine_rules.h) with every epoch on the device.
//
// The host only enqueues: per epoch five kernels of fit_engine.cu and three GEMMs (at::mm_out,
// i.e. cuBLAS) over all genes at once, two with the kernel's eigenvectors and one with the
// design. It reads one integer back every kCheckEvery epochs, the number of stopped genes, to
// end the loop once every gene has stopped. Genes that have stopped are frozen but stay in the
// GEMMs (their columns cost the same as active ones; compaction would need a sync per change).
//
// float32 fits keep float32 GEMMs (torch's default: no TF32 unless
// torch.backends.cuda.matmul.allow_tf32 is set); the spectrum terms, losses and the early-
// stopping record are float64, as on the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cuda/kernels.cuh"
#include "engine_settings.h"

namespace splisosm {
namespace {

// Epochs between two reads of the stopped-gene count (each read syncs the stream). After the
// last gene stops, at most this many epochs run on frozen genes before the loop ends.
constexpr int64_t kCheckEvery = 16;
// Genes whose log-factorial constants are computed at once.
constexpr int64_t kConstantsChunk = 1024;
// CUDA's limit on a grid's second dimension (engine_multinom's chunks of spots).
constexpr int64_t kMaxGridY = 65535;

// One parameter of all genes in the layout the kernels use, with its optimiser state and best
// snapshot.
struct DeviceParam {
  at::Tensor value, m1, m2, best;
  int64_t per_gene;

  DeviceParam(const at::Tensor& start, int64_t genes)
      : value(start.clone(at::MemoryFormat::Contiguous)),
        m1(at::zeros_like(value)),
        m2(at::zeros_like(value)),
        best(value.clone()),
        per_gene(genes > 0 ? value.numel() / genes : 0) {}

  template <typename T>
  cuda::EngineParam<T> view() {
    return {value.data_ptr<T>(), m1.data_ptr<T>(), m2.data_ptr<T>(), best.data_ptr<T>(), per_gene};
  }
  // The best snapshot where the gene ever improved (`seen`, broadcastable), else the last value.
  at::Tensor result(const at::Tensor& seen) const { return at::where(seen, best, value); }
};

template <typename T>
std::vector<at::Tensor> fit_on_device(const at::Tensor& counts, const at::Tensor& X,
                                      const at::Tensor& evals, const at::Tensor& evecs,
                                      const std::vector<at::Tensor>& start,
                                      const engine::Settings& s) {
  const int64_t G = counts.size(0), n = counts.size(1), q = counts.size(2) - 1;
  const int64_t P = X.size(1), r = evecs.size(1), C = start[3].size(1), cols = G * q;
  const cuda::EngineDims dims{G, n, q, P, r, C};
  const auto opts = counts.options();
  const auto f64 = opts.dtype(at::kDouble), i64 = opts.dtype(at::kLong);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  TORCH_CHECK(cuda::engine_spot_chunks(n) <= kMaxGridY, "splisosm: the CUDA engine handles at "
              "most ", kMaxGridY * cuda::kEngineSpotsPerChunk, " spots, got ", n);
  // The multinomial pass leaves count checks to this one synchronisation.
  TORCH_CHECK(at::isfinite(counts).all().item<bool>(),
              "splisosm: `counts` contains NaN or infinite values");
  TORCH_CHECK(!counts.lt(0).any().item<bool>(), "splisosm: `counts` contains negative values");
  // The log-factorial constants of the multinomial log-likelihood, once per fit, in float64 and
  // in chunks of genes (the float64 copies of the counts would otherwise be the fit's peak).
  auto ll_const = at::empty({G}, f64);
  for (int64_t g0 = 0; g0 < G; g0 += kConstantsChunk) {
    const int64_t gc = std::min(kConstantsChunk, G - g0);
    const auto c64 = counts.narrow(0, g0, gc).to(at::kDouble);
    ll_const.narrow(0, g0, gc).copy_(at::lgamma(c64.sum(-1) + 1).sum(1) -
                                     at::lgamma(c64 + 1).sum({1, 2}));
  }
  const auto counts_t = counts.permute({1, 0, 2}).contiguous();  // (n, G, m)
  const auto X_c = X.contiguous();
  const auto X1t = at::cat({X_c, at::ones({n, 1}, opts)}, 1).t();  // (P + 1, n)
  const auto V = evecs.contiguous();
  const auto lam_m1 = (evals.to(at::kDouble) - 1).contiguous();

  DeviceParam nu(start[0].permute({1, 0, 2}), G);  // (n, G, q)
  DeviceParam beta(start[1], G), bias(start[2], G), sigma(start[3], G), theta(start[4], G);

  auto geta = at::empty({n, cols}, opts);
  auto zw = r > 0 ? at::empty({r, cols}, opts) : at::Tensor();
  auto prec = r > 0 ? at::empty({n, cols}, opts) : at::Tensor();
  auto xg = at::empty({P + 1, cols}, opts);
  auto ll_partial = at::empty({cuda::engine_spot_chunks(n), G}, f64);
  auto column_terms = at::empty({6, cols}, f64);
  double* ct = column_terms.data_ptr<double>();
  const cuda::EngineColumns col{ct, ct + cols, ct + 2 * cols, ct + 3 * cols, ct + 4 * cols,
                                ct + 5 * cols};

  auto stopped_at = at::full({G}, -1, i64), counter = at::zeros({G}, i64);
  auto best_epoch = at::full({G}, -1, i64), best_loss = at::full({G}, INFINITY, f64);
  auto converged = at::zeros({G}, opts.dtype(at::kBool));
  auto improved = at::zeros({G}, opts.dtype(at::kInt));
  auto n_stopped = at::zeros({1}, opts.dtype(at::kInt));
  auto all_stopped_rows = at::full({1}, -1, i64);
  auto low_variance = at::zeros({1}, opts.dtype(at::kInt));
  const cuda::EngineGenes genes{stopped_at.data_ptr<int64_t>(),   counter.data_ptr<int64_t>(),
                                best_epoch.data_ptr<int64_t>(),   best_loss.data_ptr<double>(),
                                converged.data_ptr<bool>(),       improved.data_ptr<int>(),
                                n_stopped.data_ptr<int>(),
                                all_stopped_rows.data_ptr<int64_t>()};
  auto history = at::empty({s.max_epochs, G}, f64);

  const auto nu_mat = nu.value.view({n, cols});
  const auto evaluate = [&] {
    C10_CUDA_CHECK(cuda::launch_engine_multinom<T>(
        dims, X_c.data_ptr<T>(), counts_t.data_ptr<T>(), nu.value.data_ptr<T>(),
        beta.value.data_ptr<T>(), bias.value.data_ptr<T>(), genes.stopped_at,
        geta.data_ptr<T>(), ll_partial.data_ptr<double>(), stream));
    if (r > 0) at::mm_out(zw, V.t(), nu_mat);
    C10_CUDA_CHECK(cuda::launch_engine_columns<T>(
        dims, s, lam_m1.data_ptr<double>(), r > 0 ? zw.data_ptr<T>() : nullptr,
        nu.value.data_ptr<T>(), sigma.value.data_ptr<T>(), theta.value.data_ptr<T>(),
        genes.stopped_at, col, low_variance.data_ptr<int>(), stream));
    if (r > 0) at::mm_out(prec, V, zw);
    at::mm_out(xg, X1t, geta);
  };
  // Record into history row `row` (none for row < 0) with the best snapshot, and step when
  // asked: the step needs every gene's record (whether the group has stopped), so it is a kernel
  // of its own.
  const auto update = [&](int64_t row, bool do_step, const engine::AdamScalars& adam) {
    if (row >= 0)
      C10_CUDA_CHECK(cuda::launch_engine_record<T>(
          dims, s, row, ll_partial.data_ptr<double>(), ll_const.data_ptr<double>(), col,
          beta.view<T>(), bias.view<T>(), sigma.view<T>(), theta.view<T>(), genes,
          history.data_ptr<double>(), stream));
    if (do_step)
      C10_CUDA_CHECK(cuda::launch_engine_step<T>(dims, s, adam, row, col, xg.data_ptr<T>(),
                                                 beta.view<T>(), bias.view<T>(), sigma.view<T>(),
                                                 theta.view<T>(), genes, stream));
    C10_CUDA_CHECK(cuda::launch_engine_nu<T>(dims, s, adam, row, do_step, nu.view<T>(),
                                             geta.data_ptr<T>(),
                                             r > 0 ? prec.data_ptr<T>() : nullptr, col.d, genes,
                                             stream));
  };

  // As the CPU engine: the loss evaluated at the start of epoch e > 0 is the post-step loss of
  // epoch e - 1 and is recorded as history row e - 1; the last step's loss is recorded after
  // the loop, unless every gene had stopped.
  bool all_stopped = false;
  for (int64_t epoch = 0; epoch < s.max_epochs && !all_stopped; ++epoch) {
    evaluate();
    update(epoch - 1, true, engine::adam_scalars(s.lr, epoch + 1));
    if (epoch % kCheckEvery == kCheckEvery - 1) all_stopped = n_stopped.item<int>() == G;
  }
  if (s.max_epochs > 0 && !all_stopped && n_stopped.item<int>() < G) {
    evaluate();
    update(s.max_epochs - 1, false, engine::AdamScalars{0, 0});
  }
  const int64_t stopped_rows = all_stopped_rows.item<int64_t>();
  // As on the CPU, a group without genes has stopped at its first record.
  const int64_t rows = G == 0 ? std::min<int64_t>(s.max_epochs, 1)
                              : (stopped_rows >= 0 ? stopped_rows : s.max_epochs);

  const auto seen = best_epoch.ge(0);
  return {nu.result(seen.view({1, G, 1})).permute({1, 0, 2}).contiguous(),
          beta.result(seen.view({G, 1, 1})),
          bias.result(seen.view({G, 1})),
          sigma.result(seen.view({G, 1})).abs(),  // sigma enters only through sigma^2 and |sigma|
          theta.result(seen.view({G, 1})),
          history.narrow(0, 0, rows).contiguous(),
          best_loss,
          best_epoch,
          converged,
          low_variance.ne(0).reshape({})};
}

// Groups run one after the other: on the GPU each group's GEMMs are large enough to be
// arithmetic-bound, so sharing the reads of V across groups (as the CPU engine does) gains little.
EngineResults joint_gd_fit_cuda(at::TensorList counts, const at::Tensor& X,
                                const at::Tensor& evals, const at::Tensor& evecs,
                                at::TensorList nu, at::TensorList beta, at::TensorList bias,
                                at::TensorList sigma, at::TensorList theta_logit, bool train_sigma,
                                bool train_theta, c10::string_view prior, double prior_alpha,
                                double prior_beta, double min_variance, double max_theta,
                                c10::string_view optim, double lr, double tol, bool tol_relative,
                                int64_t patience, int64_t max_epochs) {
  const EngineGroups groups{counts, nu, beta, bias, sigma, theta_logit};
  const engine::Settings s = check_engine_groups(
      groups, X, evals, evecs, train_sigma, train_theta, prior, prior_alpha, prior_beta,
      min_variance, max_theta, optim, lr, tol, tol_relative, patience, max_epochs,
      c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(X.device());
  at::NoGradGuard no_grad;
  std::vector<std::vector<at::Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "joint_gd_fit_cuda", [&] {
    for (size_t i = 0; i < counts.size(); ++i)
      out.push_back(fit_on_device<scalar_t>(counts[i], X, evals, evecs, groups.start(i), s));
  });
  return collect_engine_results(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(splisosm, CUDA, m) { m.impl("joint_gd_fit", &joint_gd_fit_cuda); }

}  // namespace splisosm
