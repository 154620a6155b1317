// Packed-panel float32 products for the fitting engine (see panel_gemm.h).
//
// Layout: B's columns are cut into panels of 16; a panel is stored as K consecutive 16-float rows,
// so the micro-kernel reads it as one stream. A 6 x 16 tile of C lives in twelve AVX registers
// while the kernel walks K; K is walked in chunks of kDepth so that a chunk of the panel stays in
// L1 while every 6-row tile of A passes over it.
#include "cpu/panel_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPLISOSM_PANEL_AVX2 1
#include <immintrin.h>
#endif

namespace splisosm {
namespace {

constexpr int64_t kPanelWidth = 16;  // two 8-float AVX registers
constexpr int kRowTile = 6;          // 6 x 2 accumulators + 2 panel loads + 1 broadcast <= 16
constexpr int64_t kDepth = 256;      // 16 KB of a panel per chunk
// Below this many multiply-adds per task, threads cost more than they save.
constexpr int64_t kMinTaskWork = int64_t{1} << 18;

#ifdef SPLISOSM_PANEL_AVX2
// C[0:MR, 0:16] (+)= A[0:MR, 0:depth] P[0:depth, 0:16]; A rows lda apart, C rows ldc apart.
template <int MR>
__attribute__((target("avx2,fma"))) void tile_kernel(const float* a, int64_t lda,
                                                     const float* panel, int64_t depth, float* c,
                                                     int64_t ldc, bool accumulate) {
  __m256 lo[MR], hi[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    lo[i] = accumulate ? _mm256_loadu_ps(c + i * ldc) : _mm256_setzero_ps();
    hi[i] = accumulate ? _mm256_loadu_ps(c + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    const __m256 p0 = _mm256_load_ps(panel + kPanelWidth * k);
    const __m256 p1 = _mm256_load_ps(panel + kPanelWidth * k + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 x = _mm256_broadcast_ss(a + i * lda + k);
      lo[i] = _mm256_fmadd_ps(x, p0, lo[i]);
      hi[i] = _mm256_fmadd_ps(x, p1, hi[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(c + i * ldc, lo[i]);
    _mm256_storeu_ps(c + i * ldc + 8, hi[i]);
  }
}

void run_tile(int rows, const float* a, int64_t lda, const float* panel, int64_t depth, float* c,
              int64_t ldc, bool accumulate) {
  switch (rows) {
    case 1: return tile_kernel<1>(a, lda, panel, depth, c, ldc, accumulate);
    case 2: return tile_kernel<2>(a, lda, panel, depth, c, ldc, accumulate);
    case 3: return tile_kernel<3>(a, lda, panel, depth, c, ldc, accumulate);
    case 4: return tile_kernel<4>(a, lda, panel, depth, c, ldc, accumulate);
    case 5: return tile_kernel<5>(a, lda, panel, depth, c, ldc, accumulate);
    default: return tile_kernel<kRowTile>(a, lda, panel, depth, c, ldc, accumulate);
  }
}
#endif

}  // namespace

bool PackedPanels::available() {
#ifdef SPLISOSM_PANEL_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

PackedPanels::PackedPanels(const at::Tensor& B)
    : K_(B.size(0)), N_(B.size(1)), panels_((B.size(1) + kPanelWidth - 1) / kPanelWidth) {
  TORCH_CHECK(available(), "splisosm: the packed-panel product needs a CPU with AVX2 and FMA "
              "instructions, which this one lacks");
  TORCH_CHECK(B.dim() == 2 && B.scalar_type() == at::kFloat && B.device().is_cpu(),
              "splisosm: the packed-panel product needs a 2-D float32 CPU matrix, got ",
              B.scalar_type(), " of shape ", B.sizes());
  const at::Tensor padded = at::constant_pad_nd(B, {0, panels_ * kPanelWidth - N_});
  // (K, panels, 16) -> (panels, K, 16)
  packed_ = padded.view({K_, panels_, kPanelWidth}).transpose(0, 1).contiguous();
}

at::Tensor PackedPanels::times(const at::Tensor& A_in) const {
  TORCH_CHECK(A_in.dim() == 2 && A_in.size(1) == K_ && A_in.scalar_type() == at::kFloat,
              "splisosm: the packed-panel product needs float32 rows of length ", K_, ", got ",
              A_in.scalar_type(), " of shape ", A_in.sizes());
  const at::Tensor A = A_in.contiguous();
  const int64_t M = A.size(0), ldc = panels_ * kPanelWidth;
  if (M == 0 || K_ == 0) return at::zeros({M, N_}, A.options());
  // every tile's first depth chunk overwrites it, so C needs no clearing
  at::Tensor C = at::empty({M, ldc}, A.options());
#ifdef SPLISOSM_PANEL_AVX2
  const float* a = A.data_ptr<float>();
  const float* packed = packed_.data_ptr<float>();
  float* c = C.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, M * K_ * kPanelWidth));
  at::parallel_for(0, panels_, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = packed + p * K_ * kPanelWidth;
      for (int64_t k0 = 0; k0 < K_; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K_ - k0);
        for (int64_t i0 = 0; i0 < M; i0 += kRowTile) {
          const int rows = static_cast<int>(std::min<int64_t>(kRowTile, M - i0));
          run_tile(rows, a + i0 * K_ + k0, K_, panel + k0 * kPanelWidth, depth,
                   c + i0 * ldc + p * kPanelWidth, ldc, k0 > 0);
        }
      }
    }
  });
#endif
  return N_ == ldc ? C : C.narrow(1, 0, N_).contiguous();
}

namespace {

// The product as an op, so that tests compare it with `a @ b` on awkward shapes.
at::Tensor panel_matmul_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_rank(a, 2, "a", "(M, K)");
  check_rank(b, 2, "b", "(K, N)");
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "splisosm: panel_matmul takes float32 `a` and `b`, got ", a.scalar_type(), " and ",
              b.scalar_type());
  check_dim(b, 0, a.size(1), "b", "K, the columns of a");
  return PackedPanels(b).times(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(splisosm, CPU, m) { m.impl("panel_matmul", &panel_matmul_cpu); }

}  // namespace splisosm
