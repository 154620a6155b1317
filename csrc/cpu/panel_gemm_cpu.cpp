// Packed-panel float32 products for the fitting engine (see panel_gemm.h).
//
// Layout: B's columns are cut into panels of 16; a panel is stored as K consecutive 16-float rows,
// so the micro-kernel reads it as one stream. A tile of C (6 x 16 in twelve AVX registers, or
// 12 x 16 in twelve AVX-512 registers where the CPU has them) stays in registers while the kernel
// walks K; K is walked in chunks of kDepth so that a chunk of the panel stays in L1 while every
// row tile of A passes over it. Both kernels compute each element of C by the same sequence of
// fused multiply-adds (k ascending, chunk by chunk), so they give the same bits: the choice of
// kernel is a matter of speed only (about 1.6x with AVX-512 on an Intel Xeon, measured).
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
// 12 accumulators hide the FMA latency of two AVX-512 units; with the panel row and a broadcast
// that is 14 of 32 registers.
constexpr int kRowTile512 = 12;
constexpr int64_t kDepth = 256;      // 16 KB of a panel per chunk
// Below this many multiply-adds per task, threads cost more than they save.
constexpr int64_t kMinTaskWork = int64_t{1} << 18;

#ifdef SPLISOSM_PANEL_AVX2
// Each kernel: C[0:MR, 0:16] (+)= A[0:MR, 0:depth] P[0:depth, 0:16]; A rows lda apart, C rows
// ldc apart.
struct Avx2 {
  static constexpr int kRows = kRowTile;

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

  template <int MR>
  __attribute__((target("avx512f"))) static void tile(const float* a, int64_t lda,
                                                      const float* panel, int64_t depth,
                                                      float* c, int64_t ldc, bool accumulate) {
    __m512 acc[MR];
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i)
      acc[i] = accumulate ? _mm512_loadu_ps(c + i * ldc) : _mm512_setzero_ps();
    for (int64_t k = 0; k < depth; ++k) {
      const __m512 p = _mm512_loadu_ps(panel + kPanelWidth * k);
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * lda + k]), p, acc[i]);
    }
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(c + i * ldc, acc[i]);
  }
};

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

// One instruction set's row tile and its kernels for every tile height: kernels[h - 1] has h rows.
struct TileSet {
  int rows;
  std::vector<TileFn> kernels;
};

template <class Isa, int... H>
TileSet tile_set(std::integer_sequence<int, H...>) {
  return {Isa::kRows, {&Isa::template tile<H + 1>...}};
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
  const TileSet& set = tiles();
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, M * K_ * kPanelWidth));
  at::parallel_for(0, panels_, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = packed + p * K_ * kPanelWidth;
      for (int64_t k0 = 0; k0 < K_; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K_ - k0);
        for (int64_t i0 = 0; i0 < M; i0 += set.rows) {
          const int rows = static_cast<int>(std::min<int64_t>(set.rows, M - i0));
          set.kernels[rows - 1](a + i0 * K_ + k0, K_, panel + k0 * kPanelWidth, depth,
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
