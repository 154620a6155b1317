// The multinomial terms for C++ callers that need no curvature blocks (the fitting engine).
#pragma once
#include <cstdint>

namespace splisosm {

// multinom_terms for the n spots of one gene, without W: the gradient (n, q) into `grad`, the
// per-spot log-likelihood into the scratch `ll_spot` (n); returns their sum. eta (n, q) and
// counts (n, q + 1) are contiguous CPU rows; bad counts raise the op's errors. Inside a
// parallel region it runs on the calling thread.
template <typename T>
T multinom_gene_terms(const T* eta, const T* counts, int64_t n, int64_t q, T* grad, T* ll_spot);

}  // namespace splisosm
