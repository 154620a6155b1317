"""Names of the hypothesis tests, in one light module the CLI can import without torch."""

from __future__ import annotations

#: Differential-usage tests; the first is the calibrated one recommended for new analyses.
DU_METHODS = ("marginal-score", "score", "wald")
#: Spatial-variability tests; the first is calibrated after every fitting method.
SV_METHODS = ("score", "llr")
RECOMMENDED_DU, RECOMMENDED_SV = DU_METHODS[0], SV_METHODS[0]
#: Fitting methods; the Python API defaults to the first (splisosm 1.2.0's), the command line to
#: the recommended one, whose random effects sit at their mode (the marginal score tests use it).
FITTING_METHODS = ("joint_gd", "joint_newton", "marginal_gd", "marginal_newton")
RECOMMENDED_FIT = "marginal_newton"
