// What the CPU Laplace kernels of both forms (eigenbasis and sparse precision) share. They compute
// in float64 whatever the input dtype, and they run genes in parallel, so a numerical failure is
// kept per gene and the one reported is the lowest gene's: the message then does not depend on
// thread scheduling.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace splisosm {

inline at::Tensor to_f64(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

// First failing gene (lowest index) and why.
class GeneFailures {
 public:
  explicit GeneFailures(int64_t genes) : reason_(genes) {}
  void set(int64_t g, std::string why) { reason_[g] = std::move(why); }
  void raise_first(const char* op) const {
    for (size_t g = 0; g < reason_.size(); ++g)
      TORCH_CHECK(reason_[g].empty(), "splisosm::", op, ": gene ", g, ": ", reason_[g]);
  }

 private:
  std::vector<std::string> reason_;  // each gene is written by one thread only
};

}  // namespace splisosm
