// Native fitting engine: whole `joint_gd` fits of batches of genes in one call.
//
// The Python fitter spends its time dispatching a dozen small autograd steps per epoch. Here an
// epoch is: two GEMMs with the kernel's eigenvectors for all still-active genes of all groups
// (one group per isoform count) at once, so that V is read once per epoch, not once per gene or
// group; between them, fused per-gene passes that form the multinomial terms, the loss and
// analytic gradients, and the optimiser step; the early-stopping rules between epochs. Each pass
// is one parallel region over the genes of all groups, dealt to the threads by their work (the
// genes of a batch are few and unequal: one region per group left threads waiting at every
// barrier). Genes never interact: each gene's gradient is that of its own objective, so a result
// does not depend on its batch-mates or on the thread that computes it.
//
// Model (per gene, isoform column j of q, spots s of n):
//   l = multinomial(eta) - 1/2 [n q log 2 pi + log det Sigma + nu^T Sigma^-1 nu] + log prior,
//   eta = nu + X beta + bias, Sigma_j = v_j (theta_j K + (1 - theta_j) I),
//   v = max(sigma^2, min_variance), theta = min(sigmoid(theta_logit), max_theta),
//   K = V diag(lambda) V^T for r = n; for r < n the residual eigenvalue of K is 0 (white noise of
//   variance d_j = v_j (1 - theta_j) outside span V); r = 0 is the white-noise prior v I.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <optional>
#include <utility>
#include <type_traits>
#include <vector>

#include "cpu/multinomial_cpu.h"
#include "cpu/panel_gemm.h"
#include "engine_rules.h"
#include "engine_settings.h"

namespace splisosm {
namespace {

using engine::AdamScalars;

// One parameter tensor of all genes: values, gradient, optimiser moments and the best snapshot,
// each (G, size) row-major.
template <typename T>
struct Slot {
  at::Tensor value, grad, m, v, best;
  int64_t size = 0;
  bool trainable = true;

  Slot(const at::Tensor& start, bool train) : trainable(train) {
    value = start.contiguous().clone();
    size = value.numel() / std::max<int64_t>(value.size(0), 1);
    grad = at::zeros_like(value);
    m = at::zeros_like(value);
    v = at::zeros_like(value);
    best = value.clone();
  }
  T* row(const at::Tensor& t, int64_t g) const { return t.data_ptr<T>() + g * size; }

  // Adam or SGD step of gene g.
  void step(int64_t g, const engine::Settings& s, const AdamScalars& adam) const {
    if (!trainable) return;
    T* __restrict p = row(value, g);
    const T* __restrict gr = row(grad, g);
    if (!s.adam) {
      for (int64_t i = 0; i < size; ++i) p[i] -= static_cast<T>(s.lr) * gr[i];
      return;
    }
    T* __restrict m1 = row(m, g);
    T* __restrict m2 = row(v, g);
    const T step_size = static_cast<T>(adam.step_size), bias2 = static_cast<T>(adam.bias2_sqrt);
#pragma omp simd
    for (int64_t i = 0; i < size; ++i)
      engine::adam_update(p[i], m1[i], m2[i], gr[i], step_size, bias2);
  }
  void snapshot(int64_t g) const { std::copy(row(value, g), row(value, g) + size, row(best, g)); }
};

// The kernel's eigenpairs, shared by every group of a fit: the products of rows (gene columns)
// with V and V^T, and the eigenvalues minus one.
template <typename T>
struct Eigenbasis {
  int64_t n, r;
  at::Tensor V, Vt;  // only where the eigenvectors are not packed
  std::optional<PackedPanels> packed_V, packed_Vt;
  std::vector<double> lam_m1;

  Eigenbasis(const at::Tensor& evals, const at::Tensor& evecs)
      : n(evecs.size(0)), r(evecs.size(1)) {
    if (r > 0) {
      if (std::is_same_v<T, float> && PackedPanels::available()) {
        packed_V.emplace(evecs);
        packed_Vt.emplace(evecs.t());
      } else {
        V = evecs.contiguous();
        Vt = evecs.t().contiguous();
      }
    }
    const auto lam = evals.to(at::kDouble).contiguous();
    lam_m1.resize(r);
    for (int64_t k = 0; k < r; ++k) lam_m1[k] = lam.data_ptr<double>()[k] - 1;
  }

  // rows V (rows x r) and rows V^T (rows x n), in `workspace` (kept by the caller for the next
  // call); the result's rows may lie further apart than its width.
  at::Tensor project(const at::Tensor& rows, at::Tensor& workspace) const {
    return times(rows, V, packed_V, workspace);
  }
  at::Tensor expand(const at::Tensor& rows, at::Tensor& workspace) const {
    return times(rows, Vt, packed_Vt, workspace);
  }

  // rows @ B: through B packed once per fit where the CPU allows (float32 on AVX2), else BLAS.
  // BLAS runs a GEMM with a handful of rows far below its bandwidth limit (a single gene's q
  // rows: several times slower), so up to kGemvRows rows go one matrix-vector product B^T x
  // each, through the transposed view of B, which BLAS streams at memory speed.
  static at::Tensor times(const at::Tensor& rows, const at::Tensor& B,
                          const std::optional<PackedPanels>& packed, at::Tensor& workspace) {
    if (packed) return packed->times(rows, workspace);
    at::Tensor out = reuse_workspace(workspace, rows.size(0), B.size(1), rows.options());
    constexpr int64_t kGemvRows = 8;
    if (rows.size(0) > kGemvRows) return at::mm_out(out, rows, B);
    const at::Tensor op = B.t();
    for (int64_t i = 0; i < rows.size(0); ++i) {
      at::Tensor dst = out.select(0, i);
      at::mv_out(dst, op, rows.select(0, i));
    }
    return out;
  }
};

// The fit of one group of genes with equal isoform count. An epoch runs in phases so that a
// driver can do the products with the eigenvectors for all groups in one GEMM each, and every
// per-gene phase in one parallel region for all groups: activate (how many rows this group
// adds), begin_gene (eta, nu^T rows; then the driver computes the multinomial terms of each
// thread's genes together), prior_gene (terms of the prior from V^T nu, and the rows of
// Sigma^-1 nu in the eigenbasis), finish_gene (loss and gradients from V w), advance (the
// stopping rules), then step_gene.
template <typename T>
class JointGdEngine {
 public:
  JointGdEngine(const at::Tensor& counts, const at::Tensor& X, const Eigenbasis<T>& basis,
                const std::vector<at::Tensor>& start, const engine::Settings& s)
      : s_(s),
        basis_(basis),
        X1t_(at::cat({X, at::ones({X.size(0), 1}, X.options())}, 1).t().contiguous()),
        counts_t_(counts.transpose(1, 2).contiguous()),
        totals_(counts.sum(2).contiguous()),
        G_(counts.size(0)),
        n_(counts.size(1)),
        q_(counts.size(2) - 1),
        P_(X.size(1)),
        r_(basis.r),
        C_(start[3].size(1)) {
    slots_.emplace_back(start[0], true);
    slots_.emplace_back(start[1], true);
    slots_.emplace_back(start[2], true);
    slots_.emplace_back(start[3], s_.train_sigma);
    slots_.emplace_back(start[4], s_.train_theta);
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    best_loss_ = at::full({G_}, INFINITY, f64);
    best_epoch_ = at::full({G_}, -1, f64.dtype(at::kLong));
    converged_ = at::zeros({G_}, f64.dtype(at::kBool));
    counter_.assign(G_, 0);
    stopped_.assign(G_, 0);
    loss_.assign(G_, 0.0);
    ll_.assign(G_, 0.0);
    low_.assign(G_, 0);
    snapshot_due_.assign(G_, 0);
    const at::Tensor rows = counts.contiguous();
    constant_.resize(G_);
    for (int64_t g = 0; g < G_; ++g)
      constant_[g] = multinom_count_constant(rows.data_ptr<T>() + g * n_ * (q_ + 1), n_, q_);
    eta_t_ = at::empty({G_, q_, n_}, counts.options());
    g_eta_t_ = at::empty({G_, q_, n_}, counts.options());
  }

  bool running() const { return !done_; }
  int64_t isoform_columns() const { return q_; }
  int64_t spots() const { return n_; }
  int64_t active_count() const { return static_cast<int64_t>(active_.size()); }

  // Starts an epoch: the active genes, and the number of rows (gene columns) they add to the
  // products with the eigenvectors.
  int64_t activate() {
    active_.clear();
    for (int64_t g = 0; g < G_; ++g)
      if (!stopped_[g]) active_.push_back(g);
    const int64_t rows = static_cast<int64_t>(active_.size()) * q_;
    for (auto* buf : {&quad_, &dquad_, &logdet_, &dlogdet_, &v_, &d_, &th_}) buf->assign(rows, 0.0);
    return rows;
  }

  // Ends an epoch after its loss was evaluated: records it (from the second epoch on; the loss
  // evaluated at the start of an epoch is the post-step loss of the previous one). While the
  // group is still running after it, its active genes are to be stepped (step_gene).
  void advance(int64_t epoch) {
    if (epoch > 0 && record()) {
      done_ = true;
      for (int64_t g = 0; g < G_; ++g) take_snapshot(g);
      return;
    }
    adam_ = engine::adam_scalars(s_.lr, ++t_);
  }

  // The optimiser step of the a-th active gene, after the snapshot its last loss asked for.
  void step_gene(int64_t a) {
    take_snapshot(active_[a]);
    for (const auto& slot : slots_) slot.step(active_[a], s_, adam_);
  }

  // Records the loss of the last step, after the final epoch.
  void conclude() {
    if (done_) return;
    record();
    for (int64_t g = 0; g < G_; ++g) take_snapshot(g);
  }

  std::vector<at::Tensor> results() {
    const at::Tensor seen = best_epoch_ >= 0;
    std::vector<at::Tensor> out;
    for (auto& slot : slots_) {
      std::vector<int64_t> shape(slot.value.dim(), 1);
      shape[0] = -1;
      out.push_back(at::where(seen.view(shape), slot.best, slot.value));
    }
    out[3] = out[3].abs();  // sigma enters only through sigma^2 and |sigma|
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    out.push_back(history_.empty() ? at::empty({0, G_}, f64) : at::stack(history_));
    out.push_back(best_loss_);
    out.push_back(best_epoch_);
    out.push_back(converged_);
    const bool low = std::any_of(low_.begin(), low_.end(), [](char l) { return l != 0; });
    out.push_back(at::scalar_tensor(low, f64.dtype(at::kBool)));
    return out;
  }

  // eta of the a-th active gene, and its rows of nu^T into `nuT` (this group's rows x n, rows as
  // returned by activate(); null for a white-noise prior).
  void begin_gene(int64_t a, T* nuT) {
    const int64_t g = active_[a];
    const T* X1t = X1t_.data_ptr<T>();
    const T* nu = slots_[kNu].row(slots_[kNu].value, g);
    const T* beta = slots_[kBeta].row(slots_[kBeta].value, g);
    const T* bias = slots_[kBias].row(slots_[kBias].value, g);
    T* eta = eta_t_.data_ptr<T>() + g * q_ * n_;
    for (int64_t j = 0; j < q_; ++j) {
      T* __restrict e = eta + j * n_;
      T* __restrict out = r_ > 0 ? nuT + (a * q_ + j) * n_ : nullptr;
      for (int64_t s = 0; s < n_; ++s) e[s] = nu[s * q_ + j] + bias[j];
      if (out)
        for (int64_t s = 0; s < n_; ++s) out[s] = nu[s * q_ + j];
      for (int64_t f = 0; f < P_; ++f) {
        const T* __restrict x = X1t + f * n_;
        const T b = beta[f * q_ + j];
        for (int64_t s = 0; s < n_; ++s) e[s] += x[s] * b;
      }
    }
  }

  // The operands of the a-th active gene's multinomial terms (after begin_gene): straight to the
  // CPU kernel, without the curvature blocks the engine does not use, and without the counts'
  // constant, computed once.
  MultinomGene<T> multinomial_terms(int64_t a) {
    const int64_t g = active_[a];
    return {eta_t_.data_ptr<T>() + g * q_ * n_, counts_t_.data_ptr<T>() + g * (q_ + 1) * n_,
            totals_.data_ptr<T>() + g * n_, n_, q_, g_eta_t_.data_ptr<T>() + g * q_ * n_, &ll_[g]};
  }

  // The prior's quadratic forms and log-determinants of the a-th active gene's columns from
  // their rows zT = nu^T V (ldz apart), and its rows wT of Sigma^-1 nu in the eigenbasis (this
  // group's rows x r each; null for r = 0). `inv_a`: scratch of r doubles.
  void prior_gene(int64_t a, const T* zT, int64_t ldz, T* wT, std::vector<double>& inv_a) {
    inv_a.resize(r_);
    const int64_t g = active_[a];
    const T* sigma = slots_[kSigma].row(slots_[kSigma].value, g);
    const T* tl = slots_[kTheta].row(slots_[kTheta].value, g);
    const T* nu = slots_[kNu].row(slots_[kNu].value, g);
    double sum_log_a = 0, dlog_a = 0;
    for (int64_t j = 0; j < q_; ++j) {
      const int64_t c = C_ == 1 ? 0 : j, row = a * q_ + j;
      low_[g] |= engine::variance_component(sigma[c], tl[c], s_.min_variance, s_.max_theta,
                                           v_[row], th_[row], d_[row]);
      // 1 / (theta lambda_k + 1 - theta) and its log-sum depend on theta only: once per
      // variance component.
      if (r_ > 0 && (j == 0 || C_ > 1))
        spectrum_terms(th_[row], inv_a.data(), sum_log_a, dlog_a);
      double qd = 0, dq = 0, ld = 0, dld = 0, z_sq = 0;
      if (r_ > 0) {
        const T* z = zT + row * ldz;
        T* w = wT + row * r_;
        column_terms(z, inv_a.data(), v_[row], d_[row], w, qd, dq, z_sq);
        ld = sum_log_a + static_cast<double>(r_) * std::log(v_[row]);
        dld = dlog_a;
      }
      if (r_ < n_) {
        double nu_sq = 0;
        for (int64_t s = 0; s < n_; ++s) nu_sq += double(nu[s * q_ + j]) * nu[s * q_ + j];
        engine::add_white_part(nu_sq - z_sq, static_cast<double>(n_ - r_), v_[row], th_[row],
                               d_[row], qd, dq, ld, dld);
      }
      quad_[row] = qd;
      dquad_[row] = dq;
      logdet_[row] = ld;
      dlogdet_[row] = dld;
    }
  }

  // Loss, and with want_grads the gradients, of the a-th active gene from its rows of
  // precT = (V w)^T (this group's rows x n, ldp apart; null for r = 0).
  void finish_gene(int64_t a, const T* precT, int64_t ldp, bool want_grads) {
    const double log2pi = std::log(2 * M_PI);
    const int64_t g = active_[a];
    const T* sigma = slots_[kSigma].row(slots_[kSigma].value, g);
    const T* tl = slots_[kTheta].row(slots_[kTheta].value, g);
    double mvn = static_cast<double>(n_ * q_) * log2pi, lp = 0;
    for (int64_t j = 0; j < q_; ++j) mvn += logdet_[a * q_ + j] + quad_[a * q_ + j];
    std::vector<double> dlp(C_, 0.0);
    for (int64_t c = 0; c < C_; ++c) {
      double val, der;
      engine::log_prior(s_.prior, sigma[c], s_.min_variance, val, der);
      lp += val;
      dlp[c] = der;
    }
    loss_[g] = -(ll_[g] + constant_[g] - 0.5 * mvn + lp);
    if (!want_grads) return;
    const T* __restrict nu = slots_[kNu].row(slots_[kNu].value, g);
    T* __restrict gnu = slots_[kNu].row(slots_[kNu].grad, g);
    T* gb = slots_[kBeta].row(slots_[kBeta].grad, g);
    T* gbias = slots_[kBias].row(slots_[kBias].grad, g);
    // Column by column, where the prior's rows and the multinomial gradient are contiguous.
    for (int64_t j = 0; j < q_; ++j) {
      const T* __restrict gg = g_eta_t_.data_ptr<T>() + (g * q_ + j) * n_;
      const T* __restrict prec = r_ > 0 ? precT + (a * q_ + j) * ldp : nullptr;
      const T d = static_cast<T>(d_[a * q_ + j]);
      if (prec && r_ < n_) {
        for (int64_t s = 0; s < n_; ++s)
          gnu[s * q_ + j] = (prec[s] + nu[s * q_ + j] / d) - gg[s];
      } else if (prec) {
        for (int64_t s = 0; s < n_; ++s) gnu[s * q_ + j] = prec[s] - gg[s];
      } else {
        for (int64_t s = 0; s < n_; ++s) gnu[s * q_ + j] = nu[s * q_ + j] / d - gg[s];
      }
      // d loss / d (beta, bias) = -[X 1]^T (y - N p), summed in double (a batched BLAS
      // product of these shapes ran at a few GFLOP/s)
      for (int64_t f = 0; f <= P_; ++f) {
        const T* __restrict xf = X1t_.data_ptr<T>() + f * n_;
        double acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int64_t s = 0; s < n_; ++s) acc += static_cast<double>(xf[s]) * gg[s];
        (f < P_ ? gb[f * q_ + j] : gbias[j]) = static_cast<T>(-acc);
      }
    }
    // Sigma_j is proportional to v_j: d l / d v_j = -(n - quad_j) / (2 v_j).
    T* gs = slots_[kSigma].row(slots_[kSigma].grad, g);
    T* gt = slots_[kTheta].row(slots_[kTheta].grad, g);
    std::vector<double> dv(C_, 0.0), dth(C_, 0.0);
    for (int64_t j = 0; j < q_; ++j) {
      const int64_t c = C_ == 1 ? 0 : j, row = a * q_ + j;
      dv[c] += -0.5 * (static_cast<double>(n_) - quad_[row]) / v_[row];
      dth[c] += -0.5 * (dlogdet_[row] + dquad_[row]);
    }
    for (int64_t c = 0; c < C_; ++c) {
      double g_sigma, g_theta;
      engine::variance_grads(sigma[c], tl[c], s_.min_variance, s_.max_theta, dv[c], dth[c],
                             dlp[c], g_sigma, g_theta);
      gs[c] = static_cast<T>(g_sigma);
      gt[c] = static_cast<T>(g_theta);
    }
  }

 private:
  enum { kNu = 0, kBeta, kBias, kSigma, kTheta };

  // inv_a_k = 1 / (theta (lambda_k - 1) + 1), sum_k log a_k and sum_k (lambda_k - 1) / a_k. The
  // logarithm is taken of products of 16 factors (each within [1e-6, 1e6]), not of every factor.
  void spectrum_terms(double theta, double* inv_a, double& sum_log, double& dsum) const {
    const double* lm1 = basis_.lam_m1.data();
    double ds = 0;
#pragma omp simd reduction(+ : ds)
    for (int64_t k = 0; k < r_; ++k) {
      inv_a[k] = 1.0 / (theta * lm1[k] + 1.0);
      ds += lm1[k] * inv_a[k];
    }
    double sl = 0;
    for (int64_t k0 = 0; k0 < r_; k0 += 16) {
      double prod = 1;
      for (int64_t k = k0; k < std::min(r_, k0 + 16); ++k) prod *= inv_a[k];
      sl -= std::log(prod);
    }
    sum_log = sl;
    dsum = ds;
  }

  // One isoform column: quad = sum_k z_k^2 / c_k, its theta-derivative (up to the factor v) and
  // w = Sigma^-1 nu in the eigenbasis (minus the white part nu / d when r < n).
  void column_terms(const T* z, const double* inv_a, double v, double d, T* w, double& quad,
                    double& dquad, double& z_sq) const {
    const double* lm1 = basis_.lam_m1.data();
    const double inv_v = 1 / v, inv_d = r_ == n_ ? 0.0 : 1 / d;
    double qd = 0, dq = 0, zz = 0;
#pragma omp simd reduction(+ : qd, dq, zz)
    for (int64_t k = 0; k < r_; ++k) {
      const double zk = z[k], zc = zk * inv_a[k] * inv_v;
      qd += zk * zc;
      dq -= zc * zc * lm1[k];
      zz += zk * zk;
      w[k] = static_cast<T>(zc - zk * inv_d);
    }
    quad = qd;
    dquad = dq * v;
    z_sq = zz;
  }

  // Copies gene g's parameters to its best snapshot if its last logged loss was its best.
  void take_snapshot(int64_t g) {
    if (!snapshot_due_[g]) return;
    snapshot_due_[g] = 0;
    for (auto& slot : slots_) slot.snapshot(g);
  }

  // Logs the losses of the active genes as one epoch; true when every gene has stopped.
  bool record() {
    auto row = at::full({G_}, INFINITY, at::TensorOptions().dtype(at::kDouble));
    double* hist = row.data_ptr<double>();
    double* best = best_loss_.data_ptr<double>();
    int64_t* best_epoch = best_epoch_.data_ptr<int64_t>();
    bool* conv = converged_.data_ptr<bool>();
    int64_t n_stopped = 0;
    for (int64_t g = 0; g < G_; ++g) {
      if (stopped_[g]) {
        // A stopped gene's parameters are frozen here (the Python fitter keeps stepping them,
        // which never changes its result); log what it logged when it stopped.
        hist[g] = history_.empty() ? INFINITY : history_.back().data_ptr<double>()[g];
        ++n_stopped;
        continue;
      }
      const engine::Record rec = engine::record_loss(s_.stop, loss_[g], best[g], counter_[g]);
      hist[g] = rec.logged;
      if (rec.improved) {
        best_epoch[g] = epoch_;
        snapshot_due_[g] = 1;  // taken before the gene's next step, in parallel
      }
      if (rec.stopped) {
        stopped_[g] = 1;
        conv[g] = rec.converged;
        ++n_stopped;
      }
    }
    history_.push_back(row);
    ++epoch_;
    return n_stopped == G_;
  }

  const engine::Settings& s_;
  const Eigenbasis<T>& basis_;
  // Fixed: X1t_ = [X 1]^T, and the counts isoform-major (the multinomial terms run so, for
  // contiguous loops over spots): counts_t_ (G, q + 1, n), totals_ (G, n) and constant_ (the
  // counts' part of each gene's log-likelihood). This epoch's: eta_t_, g_eta_t_ (G, q, n), ll_.
  at::Tensor X1t_, counts_t_, totals_, eta_t_, g_eta_t_;
  std::vector<double> constant_, ll_;
  int64_t G_, n_, q_, P_, r_, C_;
  // Prior terms of this epoch's active gene columns: quadratic form, its theta-derivative (up to
  // v), log det, its theta-derivative, v, d and theta.
  std::vector<double> quad_, dquad_, logdet_, dlogdet_, v_, d_, th_;
  std::vector<Slot<T>> slots_;
  at::Tensor best_loss_, best_epoch_, converged_;
  std::vector<int64_t> counter_, active_;
  // low_: a gene's variance met its floor
  std::vector<char> stopped_, low_, snapshot_due_;
  std::vector<double> loss_;
  std::vector<at::Tensor> history_;
  int64_t epoch_ = 0, t_ = 0;
  AdamScalars adam_{};
  bool done_ = false;
};

// The genes of an epoch's passes, dealt to the threads: bins[t] lists the (engine, active gene)
// pairs that thread t computes, balanced by their work (spots x isoform columns; largest first,
// each to the lightest bin). Which thread computes a gene never changes its result.
template <typename T>
class GeneBins {
 public:
  struct Task {
    JointGdEngine<T>* engine;
    int64_t gene;     // index among the engine's active genes
    int64_t part;     // the engine's index among the live ones (its rows of the products)
  };

  explicit GeneBins(const std::vector<JointGdEngine<T>*>& live)
      : bins_(std::max<int64_t>(1, at::get_num_threads())) {
    std::vector<std::pair<int64_t, Task>> tasks;
    for (size_t i = 0; i < live.size(); ++i)
      for (int64_t a = 0; a < live[i]->active_count(); ++a)
        tasks.push_back({live[i]->spots() * live[i]->isoform_columns(),
                         Task{live[i], a, static_cast<int64_t>(i)}});
    std::stable_sort(tasks.begin(), tasks.end(),
                     [](const auto& x, const auto& y) { return x.first > y.first; });
    std::vector<int64_t> load(bins_.size(), 0);
    for (const auto& [work, task] : tasks) {
      const size_t b = std::min_element(load.begin(), load.end()) - load.begin();
      load[b] += work;
      bins_[b].push_back(task);
    }
  }

  // body(bin) for every bin's tasks, one parallel region.
  template <class Body>
  void run_bins(const Body& body) const {
    at::parallel_for(0, static_cast<int64_t>(bins_.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) body(bins_[b]);
    });
  }

  // body(task, scratch) for every task, one parallel region; Scratch is per thread.
  template <class Scratch, class Body>
  void run(const Body& body) const {
    run_bins([&](const std::vector<Task>& bin) {
      Scratch scratch;
      for (const Task& task : bin) body(task, scratch);
    });
  }

 private:
  std::vector<std::vector<Task>> bins_;
};

// Fits every group, epoch by epoch together, so that each product with the eigenvectors is one
// GEMM over the active gene columns of all groups. Returns each group's results.
template <typename T>
std::vector<std::vector<at::Tensor>> fit_groups(const EngineGroups& groups, const at::Tensor& X,
                                                const at::Tensor& evals, const at::Tensor& evecs,
                                                const engine::Settings& s) {
  const Eigenbasis<T> basis(evals, evecs);
  std::vector<std::unique_ptr<JointGdEngine<T>>> engines;
  for (size_t i = 0; i < groups.counts.size(); ++i)
    engines.push_back(std::make_unique<JointGdEngine<T>>(groups.counts[i], X, basis,
                                                         groups.start(i), s));
  const auto any_running = [&] {
    return std::any_of(engines.begin(), engines.end(), [](const auto& e) { return e->running(); });
  };
  struct NoScratch {};
  struct PriorScratch {
    std::vector<double> inv_a;
  };
  // nu^T, zT, wT and precT of an epoch, in memory kept from epoch to epoch
  std::array<at::Tensor, 4> workspace;
  // The loss (and gradients) of every running gene; returns the bins of the genes it evaluated.
  const auto evaluate = [&](bool want_grads) {
    std::vector<JointGdEngine<T>*> live;
    std::vector<int64_t> offset;
    int64_t total = 0;
    for (auto& e : engines)
      if (e->running()) {
        live.push_back(e.get());
        offset.push_back(total);
        total += e->activate();
      }
    GeneBins<T> bins(live);
    const bool products = basis.r > 0;
    // the first row of live engine i's part of a product operand or result
    const auto part = [&](const at::Tensor& t, int64_t i) -> T* {
      return products ? t.data_ptr<T>() + offset[i] * t.stride(0) : nullptr;
    };
    const auto ld = [&](const at::Tensor& t) { return products ? t.stride(0) : int64_t{0}; };
    const at::Tensor nuT =
        products ? reuse_workspace(workspace[0], total, basis.n, X.options()) : at::Tensor();
    // the multinomial terms of a bin's genes together: their vectorised calls are shared
    bins.run_bins([&](const auto& bin) {
      std::vector<MultinomGene<T>> terms;
      for (const auto& task : bin) {
        task.engine->begin_gene(task.gene, part(nuT, task.part));
        terms.push_back(task.engine->multinomial_terms(task.gene));
      }
      multinom_isoform_major_terms(terms);
    });
    const at::Tensor zT = products ? basis.project(nuT, workspace[1]) : at::Tensor();
    const at::Tensor wT =
        products ? reuse_workspace(workspace[2], total, basis.r, X.options()) : at::Tensor();
    bins.template run<PriorScratch>([&](const auto& task, PriorScratch& scratch) {
      task.engine->prior_gene(task.gene, part(zT, task.part), ld(zT), part(wT, task.part),
                              scratch.inv_a);
    });
    const at::Tensor precT = products ? basis.expand(wT, workspace[3]) : at::Tensor();
    bins.template run<NoScratch>([&](const auto& task, NoScratch&) {
      task.engine->finish_gene(task.gene, part(precT, task.part), ld(precT), want_grads);
    });
    return bins;
  };
  for (int64_t epoch = 0; epoch < s.max_epochs && any_running(); ++epoch) {
    const GeneBins<T> bins = evaluate(/*want_grads=*/true);
    for (auto& e : engines)
      if (e->running()) e->advance(epoch);
    bins.template run<NoScratch>([&](const auto& task, NoScratch&) {
      if (task.engine->running()) task.engine->step_gene(task.gene);
    });
  }
  if (s.max_epochs > 0 && any_running()) {
    evaluate(/*want_grads=*/false);
    for (auto& e : engines) e->conclude();
  }
  std::vector<std::vector<at::Tensor>> out;
  for (auto& e : engines) out.push_back(e->results());
  return out;
}

EngineResults joint_gd_fit_cpu(at::TensorList counts, const at::Tensor& X, const at::Tensor& evals,
                               const at::Tensor& evecs, at::TensorList nu, at::TensorList beta,
                               at::TensorList bias, at::TensorList sigma,
                               at::TensorList theta_logit, bool train_sigma, bool train_theta,
                               c10::string_view prior, double prior_alpha, double prior_beta,
                               double min_variance, double max_theta, c10::string_view optim,
                               double lr, double tol, bool tol_relative, int64_t patience,
                               int64_t max_epochs) {
  const EngineGroups groups{counts, nu, beta, bias, sigma, theta_logit};
  const engine::Settings s = check_engine_groups(
      groups, X, evals, evecs, train_sigma, train_theta, prior, prior_alpha, prior_beta,
      min_variance, max_theta, optim, lr, tol, tol_relative, patience, max_epochs,
      c10::DeviceType::CPU);
  at::NoGradGuard no_grad;
  std::vector<std::vector<at::Tensor>> out;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "joint_gd_fit_cpu", [&] {
    out = fit_groups<scalar_t>(groups, X, evals, evecs, s);
  });
  return collect_engine_results(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(splisosm, CPU, m) { m.impl("joint_gd_fit", &joint_gd_fit_cpu); }

}  // namespace splisosm
