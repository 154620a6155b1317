// The multinomial terms in the layout of the fitting engine, for C++ callers.
#pragma once
#include <cstdint>

namespace splisosm {

// Sum over the n spots of one gene of log N! - sum_k log y_k!, the part of the multinomial
// log-likelihood that depends on the counts only; counts (n, q + 1) row-major. NaN, infinite
// or negative counts raise multinom_terms' errors.
template <typename T>
double multinom_count_constant(const T* counts, int64_t n, int64_t q);

// The rest of one gene's log-likelihood, sum_s [sum_k y_sk eta_sk - N_s log Z_s], and its
// gradient y - N p, in isoform-major layout: eta_t and grad_t (q, n), counts_t (q + 1, n),
// totals N (n). Inside a parallel region it runs on the calling thread.
template <typename T>
double multinom_isoform_major_terms(const T* eta_t, const T* counts_t, const T* totals, int64_t n,
                                    int64_t q, T* grad_t);

}  // namespace splisosm
