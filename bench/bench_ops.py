"""Native multinomial ops vs their pure-torch references (float32, CPU).

Run: ``python bench/bench_ops.py`` (add ``--threads N`` to pin torch's thread pool).
Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import machine_line, median_seconds  # noqa: E402

from splisosm import ops  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--genes", type=int, default=64)
    parser.add_argument("--covariates", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {machine_line()}; G = {args.genes}, P = {args.covariates}, float32\n")
    print("| op | n | m | native ms | reference ms | speed-up |")
    print("|---|---|---|---|---|---|")
    G = args.genes
    for n in (900, 5000):
        for m in (2, 3, 5):
            eta = 2 * torch.randn(G, n, m - 1)
            counts = torch.poisson(torch.full((G, n, m), 10.0 / m))
            X = torch.randn(n, args.covariates)
            _, resid, W = ops.multinom_terms(eta, counts)
            cases = {
                "multinom_terms": (
                    lambda: torch.ops.splisosm.multinom_terms(eta, counts),
                    lambda: ops.multinom_terms_reference(eta, counts),
                ),
                "fixed_effect_info": (
                    lambda: torch.ops.splisosm.fixed_effect_info(X, W, resid),
                    lambda: ops.fixed_effect_info_reference(X, W, resid),
                ),
            }
            for name, (native, reference) in cases.items():
                t_native = median_seconds(native)
                t_ref = median_seconds(reference)
                print(
                    f"| {name} | {n} | {m} | {1e3 * t_native:.2f} | {1e3 * t_ref:.2f} "
                    f"| {t_ref / t_native:.1f}x |"
                )


if __name__ == "__main__":
    main()
