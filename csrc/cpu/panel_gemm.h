// Products A B with one fixed float32 matrix B and many small, changing A.
//
// The fitting engine multiplies the kernel's eigenvectors by a few to a few hundred rows, twice
// per epoch, for hundreds of epochs. BLAS re-packs B into its panel layout on every call; with
// few rows that packing costs as much as the arithmetic (and MKL's generic path on non-Intel
// CPUs runs at a fraction of the FMA units' speed). Packing B once and running an AVX2/FMA (or,
// where the CPU has it, AVX-512) micro-kernel over it removes both costs.
#pragma once
#include <ATen/ATen.h>

namespace splisosm {

// The first rows x cols of `workspace` as a contiguous matrix, the workspace grown as needed. For
// matrices a caller makes anew at every step of a loop: fresh ones of a few MB cost page faults
// each time.
at::Tensor reuse_workspace(at::Tensor& workspace, int64_t rows, int64_t cols,
                           const at::TensorOptions& options);

class PackedPanels {
 public:
  // Whether this CPU can run the kernels (x86-64 with AVX2 and FMA, checked at run time).
  static bool available();

  // Packs B (K, N), float32, any strides. Requires available().
  explicit PackedPanels(const at::Tensor& B);

  // A (M, K) float32 -> A B (M, N), contiguous.
  at::Tensor times(const at::Tensor& A) const;

  // The same in `workspace`, grown as needed and kept by the caller for the next call (a fit
  // multiplies every epoch; fresh outputs of this size cost page faults each time). Returns a
  // view of its first M rows: N columns, rows padded_width() apart.
  at::Tensor times(const at::Tensor& A, at::Tensor& workspace) const;
  int64_t padded_width() const;

 private:
  int64_t K_ = 0, N_ = 0, panels_ = 0;
  at::Tensor packed_;  // (panels, K, kPanelWidth), zero beyond column N
};

}  // namespace splisosm
