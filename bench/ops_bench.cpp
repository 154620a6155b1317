// C++ microbenchmark of the multinomial ops through the dispatcher (no Python in the loop).
//
// Build and run (see bench/README.md):
//   cmake -S . -B build-bench -G Ninja -DSPLISOSM_BUILD_BENCH=ON \
//         -DCMAKE_PREFIX_PATH="$(python3 -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
//   cmake --build build-bench --target ops_bench && ./build-bench/ops_bench
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

namespace {

double median_ms(const std::function<void()>& fn, int repeats = 9) {
  fn();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + repeats / 2, times.end());
  return times[repeats / 2];
}

}  // namespace

int main() {
  auto terms = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("splisosm::multinom_terms", "")
                   .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&)>();
  auto info = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("splisosm::fixed_effect_info", "")
                  .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  const int64_t G = 64, P = 2;
  std::printf("threads %d, G = %lld, P = %lld, float32\n", at::get_num_threads(), static_cast<long long>(G),
              static_cast<long long>(P));
  std::printf("| n | m | multinom_terms ms | fixed_effect_info ms | terms Mspots/s |\n|---|---|---|---|---|\n");
  for (int64_t n : {900, 5000}) {
    for (int64_t m : {2, 3, 5}) {
      at::manual_seed(0);
      const auto eta = at::randn({G, n, m - 1}) * 2;
      const auto counts = at::poisson(at::full({G, n, m}, 10.0 / m));
      const auto X = at::randn({n, P});
      const auto out = terms.call(eta, counts);
      const double t_terms = median_ms([&] { terms.call(eta, counts); });
      const double t_info = median_ms([&] { info.call(X, std::get<2>(out), std::get<1>(out)); });
      std::printf("| %lld | %lld | %.3f | %.3f | %.1f |\n", static_cast<long long>(n), static_cast<long long>(m),
                  t_terms, t_info, G * n / t_terms / 1e3);
    }
  }
  return 0;
}
