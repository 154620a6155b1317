// Input checks shared by the CPU and CUDA bindings. Every message names the offending argument,
// because users reach these through Python wrappers several layers above the op.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

namespace splisosm {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "splisosm: `", name, "` must be float32 or float64, got ", t.scalar_type());
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == rank, "splisosm: `", name, "` must have shape ", layout, " (", rank,
              " dimensions), got ", t.sizes());
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "splisosm: `", bn, "` must have the dtype of `",
              an, "` (", a.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "splisosm: `", bn, "` must be on the device of `", an,
              "` (", a.device(), "), got ", b.device());
}

inline void check_dim(const at::Tensor& t, int64_t d, int64_t expected, const char* name,
                      const char* what) {
  TORCH_CHECK(t.size(d) == expected, "splisosm: `", name, "` dimension ", d, " (", what,
              ") must be ", expected, ", got ", t.size(d));
}

// Shape contract of the multinomial ops: eta (G, n, q), counts (G, n, q + 1).
inline void check_multinom_inputs(const at::Tensor& eta, const at::Tensor& counts) {
  check_float(eta, "eta");
  check_rank(eta, 3, "eta", "(G, n, q)");
  check_rank(counts, 3, "counts", "(G, n, m)");
  check_same(eta, "eta", counts, "counts");
  check_dim(counts, 0, eta.size(0), "counts", "genes G, as in eta");
  check_dim(counts, 1, eta.size(1), "counts", "spots n, as in eta");
  check_dim(counts, 2, eta.size(2) + 1, "counts", "isoforms m = q + 1, eta has q columns");
  TORCH_CHECK(eta.size(2) >= 1, "splisosm: `eta` needs q >= 1 (genes with at least 2 isoforms)");
}

// W (G, n, q, q) and a per-spot vector argument (G, n, q).
inline void check_blocks(const at::Tensor& W, const at::Tensor& r, const char* rname) {
  check_float(W, "W");
  check_rank(W, 4, "W", "(G, n, q, q)");
  check_same(W, "W", r, rname);
  TORCH_CHECK(W.size(2) == W.size(3), "splisosm: `W` blocks must be square (G, n, q, q), got ",
              W.sizes());
}

}  // namespace splisosm
