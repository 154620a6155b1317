"""The fitters' own Adam and SGD against torch.optim's, bit for bit.

The Python fitting path (and with it the reference the native engine is tested against) promises
torch's update rules; these optimisers only avoid importing torch.optim's machinery.
"""

from __future__ import annotations

import pytest
import torch

from splisosm.glmm._fitting import make_optimizer


def _params(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 40, 2), (3, 2), (3, 1), (3, 0, 2)]  # nu-, bias-, sigma-like; an empty beta
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]


def _run(params: list[torch.Tensor], optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for k in range(steps):
        optimizer.zero_grad()
        # a gradient that changes with the parameters, and one parameter left without a
        # gradient in some steps (torch then skips it and does not count the step for it)
        loss = sum((p * p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum()
                   for i, p in enumerate(params) if not (i == 2 and k % 3 == 1))
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_same_bits_as_torch_optim(dtype: torch.dtype, name: str, cls) -> None:
    lr = 0.03
    ours, theirs = _params(dtype, 1), _params(dtype, 1)
    _run(ours, make_optimizer(ours, {"lr": lr, "optim": name}), 60, seed=2)
    _run(theirs, cls(theirs, lr=lr), 60, seed=2)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _params(dtype, 1)[0])  # the parameters did move


def test_nothing_to_train() -> None:
    frozen = [torch.zeros(3)]
    assert make_optimizer(frozen, {"lr": 0.1, "optim": "adam"}) is None
