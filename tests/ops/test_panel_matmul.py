"""The engine's packed-panel float32 product against ``a @ b``, and the engine fits that use it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import reference_models as ref
from splisosm.glmm.isomodels import IsoFullModel
from splisosm.ops.engine import panel_matmul, panel_matmul_available

pytestmark = pytest.mark.skipif(not panel_matmul_available(),
                                reason="the packed-panel product needs an x86-64 CPU with AVX2/FMA")

# Row counts around the 6-row (AVX2) and 14-row (AVX-512) tiles, depths around the 256-deep
# chunk, widths around the 16-wide panel and the 32-wide pair of panels, and empty operands.
SHAPES = [(1, 1, 1), (5, 7, 15), (6, 256, 16), (7, 257, 17), (13, 513, 33), (12, 1100, 40),
          (11, 300, 20), (25, 700, 47), (2, 900, 90), (14, 300, 32), (15, 257, 48),
          (29, 260, 64), (0, 4, 3), (3, 0, 5), (4, 6, 0)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_matmul(shape):
    M, K, N = shape
    g = torch.Generator().manual_seed(M * 10_000 + K * 100 + N)
    a, b = torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    expected = (a.double() @ b.double()).float()
    # float32 accumulation over K terms of size ~1: error grows like sqrt(K) eps
    torch.testing.assert_close(panel_matmul(a, b), expected, rtol=0, atol=1e-5 * max(K, 1) ** 0.5)


_PRODUCTS = """
import sys, torch, splisosm
g = torch.Generator().manual_seed(11)
shapes = [(1, 5, 3), (11, 300, 20), (12, 256, 16), (13, 513, 33), (25, 700, 47), (29, 260, 64)]
pairs = [(torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)) for m, k, n in shapes]
torch.save([torch.ops.splisosm.panel_matmul(a, b) for a, b in pairs], sys.argv[1])
"""


def test_kernels_give_the_same_bits(tmp_path):
    # The AVX-512 and AVX2 kernels run the same fused multiply-adds per element in the same
    # order, so which one a CPU picks must not change a fit by a single bit. (On a CPU without
    # AVX-512 both runs take the AVX2 kernel.)
    results = []
    for kernel in ("default", "avx2"):
        env = {**os.environ, "SPLISOSM_PANEL_KERNEL": kernel}
        out = tmp_path / f"{kernel}.pt"
        subprocess.run([sys.executable, "-c", _PRODUCTS, str(out)], env=env, check=True)
        results.append(torch.load(out, weights_only=True))
    assert len(results[0]) == 6
    for fast, plain in zip(*results):
        assert torch.equal(fast, plain)


def test_strided_operands():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 9, generator=g), torch.randn(40, 20, generator=g)
    # a transposed view and a column slice: neither is contiguous
    torch.testing.assert_close(panel_matmul(a.t(), b[:, ::2]), a.t() @ b[:, ::2], rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs_name_the_argument():
    with pytest.raises(RuntimeError, match="`b` dimension 0"):
        panel_matmul(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(RuntimeError, match="float32"):
        panel_matmul(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 5))
    with pytest.raises(RuntimeError, match="`a`"):
        panel_matmul(torch.zeros(2, 3, 1), torch.zeros(3, 5))


def test_opcheck():
    g = torch.Generator().manual_seed(4)
    torch.library.opcheck(torch.ops.splisosm.panel_matmul.default,
                          (torch.randn(7, 300, generator=g), torch.randn(300, 18, generator=g)),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.parametrize("rank", [None, 40])
def test_float32_engine_reaches_the_float64_objective(rank):
    # 400 spots: the products walk two 256-deep chunks; 9 genes x 2 columns = 18 rows: three
    # row tiles, the last one short
    K = ref.car_kernel(20)
    Y = ref.simulate_counts(K, 9, 3, seed=21)
    lam, V = np.linalg.eigh(K)
    lam, V = lam[::-1].copy(), V[:, ::-1].copy()
    if rank is not None:
        lam, V = lam[:rank].copy(), V[:, :rank].copy()
    losses = []
    for dtype in (torch.float32, torch.float64):
        model = IsoFullModel(fitting_method="joint_gd", dtype=dtype,
                             fitting_configs={"max_epochs": 200})
        model.setup_data(Y.to(dtype), corr_sp_eigvals=lam, corr_sp_eigvecs=V)
        model.fit(quiet=True)
        losses.append(model.logger.best_loss.double())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=0)
