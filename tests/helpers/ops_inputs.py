"""Random inputs for the op tests."""

from __future__ import annotations

import torch


def random_multinom_inputs(
    G: int, n: int, m: int, dtype: torch.dtype = torch.float64, scale: float = 2.0, depth: float = 8.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(G, n, m-1)`` and Poisson-depth multinomial-ish counts ``(G, n, m)``."""
    eta = scale * torch.randn(G, n, m - 1, dtype=torch.float64)
    counts = torch.poisson(torch.full((G, n, m), depth / m, dtype=torch.float64))
    return eta.to(dtype), counts.to(dtype)
