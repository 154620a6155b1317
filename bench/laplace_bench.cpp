// Microbenchmark of the Laplace-system ops through the dispatcher (no Python).
//
// Rook grid of side x side spots, standardised CAR precision (rho = 0.99), q = 2, W from random
// multinomial probabilities with N ~ Poisson(10), v = 0.2, theta = 0.5. Prints milliseconds per
// gene for the sparse form (solve + log-det), the low-rank eigenbasis form (r = ceil(4 sqrt n),
// random orthonormal eigenvectors: the cost does not depend on which they are; CG solve,
// log-det, direct solve + log-det) and the selected inversion used for the standardisation.
// Usage: laplace_bench [side ...] (default 30 50 100).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <tuple>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;
using Pair = std::tuple<at::Tensor, at::Tensor>;
const auto kF64 = at::TensorOptions().dtype(at::kDouble);
const auto kI64 = at::TensorOptions().dtype(at::kLong);

struct Csr {
  at::Tensor crow, col, val;
};

// M = I - rho D^-1/2 A D^-1/2 of the rook grid, CSR with sorted columns.
Csr car_precision(int64_t side, double rho) {
  const int64_t n = side * side;
  std::vector<int64_t> crow{0}, col;
  std::vector<double> val;
  for (int64_t i = 0; i < side; ++i)
    for (int64_t j = 0; j < side; ++j) {
      const int64_t s = i * side + j;
      const auto degree = [&](int64_t a, int64_t b) {
        return double((a > 0) + (a < side - 1) + (b > 0) + (b < side - 1));
      };
      const double ds = degree(i, j);
      const int64_t nb[4][2] = {{i - 1, j}, {i, j - 1}, {i, j + 1}, {i + 1, j}};
      bool diag_done = false;
      for (const auto& t : nb) {
        if (t[0] < 0 || t[0] >= side || t[1] < 0 || t[1] >= side) continue;
        const int64_t u = t[0] * side + t[1];
        if (u > s && !diag_done) {
          col.push_back(s);
          val.push_back(1.0);
          diag_done = true;
        }
        col.push_back(u);
        val.push_back(-rho / std::sqrt(ds * degree(t[0], t[1])));
      }
      if (!diag_done) {
        col.push_back(s);
        val.push_back(1.0);
      }
      crow.push_back(static_cast<int64_t>(col.size()));
    }
  (void)n;
  return {at::tensor(crow, kI64), at::tensor(col, kI64), at::tensor(val, kF64)};
}

template <typename F>
double ms_per_gene(F&& fn, int64_t genes) {
  fn();  // warm-up: symbolic analysis, thread pools
  const auto t0 = Clock::now();
  fn();
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / genes;
}

void run(int64_t side) {
  const int64_t n = side * side, q = 2;
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto invdiag = dispatcher.findSchemaOrThrow("splisosm::sparse_inverse_diagonal", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&)>();
  const auto sparse = dispatcher.findSchemaOrThrow("splisosm::laplace_sparse", "")
                          .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&)>();
  const auto solve_eig = dispatcher.findSchemaOrThrow("splisosm::laplace_solve_eig", "")
                             .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         double, int64_t)>();
  const auto lowrank = dispatcher.findSchemaOrThrow("splisosm::laplace_lowrank", "")
                           .typed<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  const auto logdet_eig = dispatcher.findSchemaOrThrow("splisosm::laplace_logdet_eig", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&)>();

  const Csr M = car_precision(side, 0.99);
  auto t0 = Clock::now();
  const auto s = invdiag.call(M.crow, M.col, M.val);
  const double invdiag_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  // Q = S^1/2 M S^1/2: the precision of the unit-diagonal kernel.
  const auto rows = at::repeat_interleave(M.crow.diff());
  const auto Qval = M.val * s.sqrt().index({rows}) * s.sqrt().index({M.col});

  const int64_t G = n <= 2500 ? 64 : 8;
  at::manual_seed(0);
  const auto p = at::softmax(at::randn({G, n, q + 1}, kF64), -1);
  const auto N = at::poisson(at::full({G, n}, 10.0, kF64));
  const auto pq = p.slice(2, 0, q);
  const auto W = (N.view({G, n, 1, 1}) *
                  (at::diag_embed(pq) - pq.unsqueeze(-1) * pq.unsqueeze(-2))).contiguous();
  const auto rhs = at::randn({G, 1, n, q}, kF64);
  const auto v = at::full({G, q}, 0.2, kF64), theta = at::full({G, q}, 0.5, kF64);

  const double sparse_ms =
      ms_per_gene([&] { sparse.call(W, rhs, M.crow, M.col, Qval, v, theta); }, G);
  const int64_t r = static_cast<int64_t>(std::ceil(4 * std::sqrt(double(n))));
  const auto V = std::get<0>(at::linalg_qr(at::randn({n, r}, kF64)));
  const auto lam = at::linspace(20.0, 0.5, r, kF64);
  const int64_t Gl = n <= 2500 ? G : 4;
  const auto Wl = W.slice(0, 0, Gl), rl = rhs.slice(0, 0, Gl);
  const auto vl = v.slice(0, 0, Gl), tl = theta.slice(0, 0, Gl);
  const double cg_ms =
      ms_per_gene([&] { solve_eig.call(Wl, rl, lam, V, vl, tl, 1e-10, 10000); }, Gl);
  const double lowdet_ms = ms_per_gene([&] { logdet_eig.call(Wl, lam, V, vl, tl); }, Gl);
  const double direct_ms = ms_per_gene([&] { lowrank.call(Wl, rl, lam, V, vl, tl); }, Gl);
  std::printf("n=%lld threads=%d G=%lld: sparse solve+logdet %.3f ms/gene | low rank r=%lld: "
              "CG solve %.3f, logdet %.3f, direct solve+logdet %.3f ms/gene | diag(M^-1) %.2f ms\n",
              static_cast<long long>(n), at::get_num_threads(), static_cast<long long>(G),
              sparse_ms, static_cast<long long>(r), cg_ms, lowdet_ms, direct_ms, invdiag_ms);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> sides;
  for (int i = 1; i < argc; ++i) sides.push_back(std::atoll(argv[i]));
  if (sides.empty()) sides = {30, 50, 100};
  for (const int64_t side : sides) run(side);
  return 0;
}
