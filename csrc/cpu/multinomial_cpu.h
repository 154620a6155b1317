// The multinomial terms in the layout of the fitting engine, for C++ callers. The op's kernel
// works spot-major and forms curvature blocks for the Laplace system; the engine needs neither
// and runs isoform-major, where every loop over spots is contiguous.
#pragma once
#include <cstdint>
#include <vector>

namespace splisosm {

// Sum over the n spots of one gene of log N! - sum_k log y_k!, the part of the multinomial
// log-likelihood that depends on the counts only; counts (n, q + 1) row-major. NaN, infinite
// or negative counts raise multinom_terms' errors.
template <typename T>
double multinom_count_constant(const T* counts, int64_t n, int64_t q);

// One gene's operands and results for multinom_isoform_major_terms, in isoform-major layout.
template <typename T>
struct MultinomGene {
  const T* eta_t;     // (q, n)
  const T* counts_t;  // (q + 1, n)
  const T* totals;    // (n,): N, the counts' sum per spot
  int64_t n, q;
  T* grad_t;          // (q, n): y - N p
  double* ll;         // sum_s [sum_k y_sk eta_sk - N_s log Z_s]
};

// The multinomial log-likelihood of each gene but for the counts' constant, and its gradient.
// The genes' spots go through shared passes, each with one vectorised exp and one log over all
// its spots (per gene, the calls' own cost would be a good part of a small gene's work). Inside a
// parallel region it runs on the calling thread.
template <typename T>
void multinom_isoform_major_terms(const std::vector<MultinomGene<T>>& genes);

}  // namespace splisosm
