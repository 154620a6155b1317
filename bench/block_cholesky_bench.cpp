// Microbenchmark of the supernodal Cholesky of the sparse route (csrc/cpu/block_cholesky.h), one
// system at a time, no dispatcher; one thread unless `--threads N` (then independent subtrees of
// the elimination tree are spread over N threads).
//
// Rook grid of side x side spots, CAR precision I - rho D^-1/2 A D^-1/2 (rho = 0.9) widened to q
// unknowns per spot with scales 1 .. q and random SPD q x q blocks, as in a gene's Laplace system.
// Prints the symbolic analysis time, the floating-point operations of one factorisation (the
// dense kernels' count, BlockCholeskyPattern::flops), milliseconds per factorisation and the rate
// they imply (to set against the core's peak), solves with 1 and with 13 right-hand sides and a
// selected inversion.
// Usage: block_cholesky_bench [--threads N] [side:q ...] (default 100:1 100:3 224:1 224:3).
#include <ATen/Parallel.h>

#include <Eigen/Dense>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cpu/block_cholesky.h"

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

void run(int64_t side, int64_t q) {
  const int64_t n = side * side;
  std::vector<int64_t> crow{0}, col;
  std::vector<double> val;
  const auto degree = [&](int64_t i, int64_t j) {
    return double((i > 0) + (i < side - 1) + (j > 0) + (j < side - 1));
  };
  for (int64_t i = 0; i < side; ++i)
    for (int64_t j = 0; j < side; ++j) {
      const int64_t nb[5][2] = {{i - 1, j}, {i, j - 1}, {i, j}, {i, j + 1}, {i + 1, j}};
      for (const auto& t : nb) {
        if (t[0] < 0 || t[0] >= side || t[1] < 0 || t[1] >= side) continue;
        col.push_back(t[0] * side + t[1]);
        val.push_back(t[0] == i && t[1] == j
                          ? 1.0
                          : -0.9 / std::sqrt(degree(i, j) * degree(t[0], t[1])));
      }
      crow.push_back(static_cast<int64_t>(col.size()));
    }
  std::vector<double> scale(q), blocks(n * q * q);
  for (int64_t j = 0; j < q; ++j) scale[j] = 1.0 + j;
  std::mt19937 rng(1);
  std::normal_distribution<double> normal;
  for (int64_t s = 0; s < n; ++s) {
    Eigen::MatrixXd R(q, q);
    for (int64_t k = 0; k < q * q; ++k) R.data()[k] = normal(rng);
    Eigen::Map<Eigen::MatrixXd>(blocks.data() + s * q * q, q, q) = R * R.transpose() / q;
  }

  auto t0 = Clock::now();
  const auto pattern =
      std::make_shared<const splisosm::BlockCholeskyPattern>(crow.data(), col.data(), n, q);
  const double symbolic_ms = ms_since(t0);
  splisosm::BlockCholesky factor(pattern);
  factor.factorize(val.data(), scale.data(), blocks.data());  // warm-up: allocation, pages
  const int reps = n * q <= 40000 ? 10 : 3;
  t0 = Clock::now();
  bool ok = true;
  for (int i = 0; i < reps; ++i) ok &= factor.factorize(val.data(), scale.data(), blocks.data());
  const double factor_ms = ms_since(t0) / reps;
  // one right-hand side (a prior term's solve) averaged over reps, and 13 at once
  std::vector<double> x1(n * q, 1.0);
  t0 = Clock::now();
  for (int i = 0; i < reps; ++i) factor.solve_in_place(x1.data(), 1);
  const double solve1_ms = ms_since(t0) / reps;
  std::vector<double> x(13 * n * q, 1.0);
  t0 = Clock::now();
  factor.solve_in_place(x.data(), 13);
  const double solve_ms = ms_since(t0);
  t0 = Clock::now();
  factor.select_inverse();
  const double selinv_ms = ms_since(t0);
  std::printf("n=%lld q=%lld%s: symbolic %.1f ms, %d supernodes | factorisation %.3g flop, "
              "%.2f ms = %.1f GFLOP/s | solve (1 rhs) %.2f ms, (13 rhs) %.2f ms | selected inversion "
              "%.2f ms\n",
              static_cast<long long>(n), static_cast<long long>(q), ok ? "" : " (NOT SPD)",
              symbolic_ms, static_cast<int>(pattern->supernodes()), pattern->flops(), factor_ms,
              pattern->flops() / factor_ms / 1e6, solve1_ms, solve_ms, selinv_ms);
}

}  // namespace

int main(int argc, char** argv) {
  int first = 1, threads = 1;
  if (argc > 2 && std::string(argv[1]) == "--threads") {
    threads = std::atoi(argv[2]);
    first = 3;
  }
  at::set_num_threads(threads);
  std::vector<std::string> cases;
  for (int i = first; i < argc; ++i) cases.emplace_back(argv[i]);
  if (cases.empty()) cases = {"100:1", "100:3", "224:1", "224:3"};
  for (const auto& c : cases) {
    const auto colon = c.find(':');
    if (colon == std::string::npos) {
      std::fprintf(stderr, "expected side:q, got %s\n", c.c_str());
      return 2;
    }
    run(std::atoll(c.substr(0, colon).c_str()), std::atoll(c.substr(colon + 1).c_str()));
  }
  return 0;
}
