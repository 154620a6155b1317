"""Numerical core of splisosm as torch ops (``torch.ops.splisosm.*``).

Each op has a native kernel (CPU in C++/Eigen, CUDA when built with it) and a pure-torch
reference in ``*_reference`` modules; the wrappers here pick the kernel for the input's device
and fall back to the reference where no native kernel exists (Apple MPS). The native kernels
check the values of their inputs themselves (the Laplace kernels all of their inputs), so those
checks run in Python only before a reference.
"""

from splisosm.ops._native import NATIVE_AVAILABLE, has_native_kernel, use_reference
from splisosm.ops.laplace import (
    laplace_logdet_eig,
    laplace_lowrank,
    laplace_solve_eig,
    laplace_sparse,
    laplace_sparse_logdet,
    laplace_sparse_logdet_grad,
    sparse_inverse_diagonal,
    sparse_shifted_solve,
)
from splisosm.ops.laplace_reference import (
    laplace_logdet_eig_reference,
    laplace_solve_eig_reference,
    laplace_sparse_logdet_grad_reference,
    laplace_sparse_logdet_reference,
    laplace_sparse_reference,
    sparse_inverse_diagonal_reference,
    sparse_shifted_solve_reference,
)
from splisosm.ops.multinomial import fixed_effect_info, multinom_terms
from splisosm.ops.multinomial_reference import (
    fixed_effect_info_reference,
    multinom_probs,
    multinom_terms_reference,
)

__all__ = [
    "NATIVE_AVAILABLE",
    "fixed_effect_info",
    "fixed_effect_info_reference",
    "has_native_kernel",
    "multinom_probs",
    "multinom_terms",
    "multinom_terms_reference",
    "use_reference",
    "laplace_logdet_eig",
    "laplace_logdet_eig_reference",
    "laplace_lowrank",
    "laplace_solve_eig",
    "laplace_solve_eig_reference",
    "laplace_sparse",
    "laplace_sparse_logdet",
    "laplace_sparse_logdet_grad",
    "laplace_sparse_logdet_grad_reference",
    "laplace_sparse_logdet_reference",
    "laplace_sparse_reference",
    "sparse_inverse_diagonal",
    "sparse_inverse_diagonal_reference",
    "sparse_shifted_solve",
    "sparse_shifted_solve_reference",
]
