// Packed-panel float32 products for the fitting engine (see panel_gemm.h).
//
// Layout: B's columns are cut into panels of 16; a panel is stored as K consecutive 16-float rows,
// so the micro-kernel reads it as one stream. A tile of C (6 x 16 in twelve AVX registers, or
// 14 x 32 over two adjacent panels in 28 AVX-512 registers where the CPU has them; 14 x 16 for an
// odd last panel) stays in registers while the kernel walks K; K is walked in chunks of kDepth so
// that a chunk of the panels stays in L1 while every row tile of A passes over it. All kernels
// compute each element of C by the same sequence of fused multiply-adds (k ascending, chunk by
// chunk), so they give the same bits: the choice of kernel is a matter of speed only.
#include "cpu/panel_gemm.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "checks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPLISOSM_PANEL_AVX2 1
#include <immintrin.h>
#endif

namespace splisosm {
namespace {

constexpr int64_t kPanelWidth = 16;  // two 8-float AVX registers, or one AVX-512 register
constexpr int kRowTile = 6;          // 6 x 2 accumulators + 2 panel loads + 1 broadcast <= 16
// 14 rows over two panels: 28 accumulators and the two panel rows take 30 of 32 registers (the
// broadcasts of A are memory operands of the FMAs). One row more spills.
constexpr int kRowTile512 = 14;
constexpr int64_t kDepth = 256;      // 16 KB of a panel per chunk
// Below this many multiply-adds per task, threads cost more than they save.
constexpr int64_t kMinTaskWork = int64_t{1} << 18;

#ifdef SPLISOSM_PANEL_AVX2
// Each kernel: C[0:MR, 0:16] (+)= A[0:MR, 0:depth] P[0:depth, 0:16]; A rows lda apart, C rows
// ldc apart.
struct Avx2 {
  static constexpr int kRows = kRowTile;
  static constexpr bool kWide = false;  // 16 registers hold no two-panel tile

  template <int MR>
  __attribute__((target("avx2,fma"))) static void tile(const float* a, int64_t lda,
                                                       const float* panel, int64_t depth,
                                                       float* c, int64_t ldc, bool accumulate) {
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
};

struct Avx512 {
  static constexpr int kRows = kRowTile512;
  static constexpr bool kWide = true;

  template <int MR>
  __attribute__((target("avx512f"))) static void tile(const float* a, int64_t lda,
                                                      const float* panel, int64_t depth,
                                                      float* c, int64_t ldc, bool accumulate) {
    __m512 acc[MR];
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i)
      acc[i] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
    for (int64_t k = 0; k < depth; ++k) {
      const __m512 p = _mm512_loadu_ps(panel + kPanelWidth * k);
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k]), p, acc[i]);
    }
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + i * ldc, acc[i]);
  }

  // The same for two adjacent panels (C[0:MR, 0:32], the second panel `stride` floats after the
  // first): each broadcast of A feeds two FMAs, which halves the loads per FMA that bound the
  // one-panel tile, and A's rows pass over half as often.
  template <int MR>
  __attribute__((target("avx512f"))) static void wide(const float* a, int64_t lda,
                                                      const float* panel, int64_t stride,
                                                      int64_t depth, float* c, int64_t ldc,
                                                      bool accumulate) {
    __m512 lo[MR], hi[MR];
    const float* next = panel + stride;
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      lo[i] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
      hi[i] = accumulate ? _mm512_loadu_ps(c + i * ldc + kPanelWidth) : _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < depth; ++k) {
      const __m512 p0 = _mm512_loadu_ps(panel + kPanelWidth * k);
      const __m512 p1 = _mm512_loadu_ps(next + kPanelWidth * k);
#pragma GCC unroll 14
      for (int i = 0; i < MR; ++i) {
        const __m512 x = _mm512_set1_ps(a[i * lda + k]);
        lo[i] = _mm512_fmadd_ps(x, p0, lo[i]);
        hi[i] = _mm512_fmadd_ps(x, p1, hi[i]);
      }
    }
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      _mm512_storeu_ps(c + i * ldc, lo[i]);
      _mm512_storeu_ps(c + i * ldc + kPanelWidth, hi[i]);
    }
  }
};

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);
using WideFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t,
                        bool);

// One instruction set's row tile and its kernels for every tile height: kernels[h - 1] has h rows
// (one panel), wide[h - 1] too (two panels; none where the instruction set has no such tile).
struct TileSet {
  int rows;
  std::vector<TileFn> kernels;
  std::vector<WideFn> wide;
};

template <class Isa, int... H>
TileSet tile_set(std::integer_sequence<int, H...>) {
  if constexpr (Isa::kWide)
    return {Isa::kRows, {&Isa::template tile<H + 1>...}, {&Isa::template wide<H + 1>...}};
  else
    return {Isa::kRows, {&Isa::template tile<H + 1>...}, {}};
}

// AVX-512 where the CPU has it; SPLISOSM_PANEL_KERNEL=avx2 keeps the AVX2 kernel (for tests that
// compare the two, and for CPUs that slow down their clock for AVX-512).
const TileSet& tiles() {
  static const TileSet set = [] {
    const char* forced = std::getenv("SPLISOSM_PANEL_KERNEL");
    const bool avx2_only = forced != nullptr && std::strcmp(forced, "avx2") == 0;
    if (!avx2_only && __builtin_cpu_supports("avx512f"))
      return tile_set<Avx512>(std::make_integer_sequence<int, Avx512::kRows>{});
    return tile_set<Avx2>(std::make_integer_sequence<int, Avx2::kRows>{});
  }();
  return set;
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

at::Tensor reuse_workspace(at::Tensor& workspace, int64_t rows, int64_t cols,
                           const at::TensorOptions& options) {
  if (!workspace.defined() || workspace.numel() < rows * cols)
    workspace = at::empty({rows * cols}, options);
  return workspace.narrow(0, 0, rows * cols).view({rows, cols});
}

int64_t PackedPanels::padded_width() const { return panels_ * kPanelWidth; }

at::Tensor PackedPanels::times(const at::Tensor& A) const {
  at::Tensor C;
  const at::Tensor out = times(A, C);
  return out.is_contiguous() ? out : out.contiguous();
}

at::Tensor PackedPanels::times(const at::Tensor& A_in, at::Tensor& workspace) const {
  TORCH_CHECK(A_in.dim() == 2 && A_in.size(1) == K_ && A_in.scalar_type() == at::kFloat,
              "splisosm: the packed-panel product needs float32 rows of length ", K_, ", got ",
              A_in.scalar_type(), " of shape ", A_in.sizes());
  const at::Tensor A = A_in.contiguous();
  const int64_t M = A.size(0), ldc = padded_width();
  if (M == 0 || K_ == 0) return at::zeros({M, N_}, A.options());
  // every tile's first depth chunk overwrites it, so C needs no clearing
  const at::Tensor C = reuse_workspace(workspace, M, ldc, A.options());
#ifdef SPLISOSM_PANEL_AVX2
  const float* a = A.data_ptr<float>();
  const float* packed = packed_.data_ptr<float>();
  float* c = C.data_ptr<float>();
  const TileSet& set = tiles();
  // units of work: pairs of panels where there is a two-panel tile, else single panels
  const int64_t per_unit = set.wide.empty() ? 1 : 2;
  const int64_t units = (panels_ + per_unit - 1) / per_unit;
  const int64_t stride = K_ * kPanelWidth;
  const int64_t grain =
      std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, M * stride * per_unit));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p = u * per_unit;
      const bool pair = p + 1 < panels_ && per_unit == 2;
      const float* panel = packed + p * stride;
      for (int64_t k0 = 0; k0 < K_; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K_ - k0);
        for (int64_t i0 = 0; i0 < M; i0 += set.rows) {
          const int rows = static_cast<int>(std::min<int64_t>(set.rows, M - i0));
          float* tile = c + i0 * ldc + p * kPanelWidth;
          if (pair)
            set.wide[rows - 1](a + i0 * K_ + k0, K_, panel + k0 * kPanelWidth, stride, depth, tile,
                               ldc, k0 > 0);
          else
            set.kernels[rows - 1](a + i0 * K_ + k0, K_, panel + k0 * kPanelWidth, depth, tile,
                                  ldc, k0 > 0);
        }
      }
    }
  });
#endif
  return C.narrow(1, 0, N_);
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
