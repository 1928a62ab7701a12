"""Pseudo-data that go through what the data went through: the linearised refit of a toy.

The data's background is a fit to the data, so it absorbs part of every fluctuation (the
normalisation all of the total count's, the shape part of any broad excess). A toy scanned
against the fixed fitted background B keeps those fluctuations and is scanned against a
background that did not follow it: its statistic is larger than the data's would be under
the null, and a p-value from such toys is biased towards 1. The toy must be refitted.

A full minimisation per toy is too slow for 1e4-1e5 toys, so each toy is refitted to first
order around the accepted fit: with J = d mu / d parameters over the histogram's bins (zero
outside the fit range, `core.fit.background_jacobian`) and W = diag(1 / B) over the bins the
fit used (in range, not masked), the weighted least-squares step of the Poisson likelihood
from B gives the refitted background

    B' = B + J (J^T W J)^+ J^T W (n - B)

(`RefitProjection.refitted`, which keeps B' > 0 where a step in the far tail would make
it negative).

This is one Gauss-Newton step of the extended Poisson likelihood (its information at mu = B
is J^T W J), exact to first order in (n - B) / B; the first column of J is B itself
(d mu / d ln p1), so the refit keeps sum over fitted bins of B' equal to the toy's count
there, as the fit's profiled normalisation does. Directions the fit cannot move (exact
redundancies of the function: zero singular values of J^T W J) are not refitted, through
the pseudo-inverse. Bins outside the fit range are not refitted (J = 0); masked bins in
range move with the extrapolated function, as the data's background does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

PSEUDO_INVERSE_RCOND = 1e-10
"""Singular values of J^T W J below this fraction of the largest are exact redundancies."""


@dataclass(frozen=True, eq=False)
class RefitProjection:
    """The linear map from a toy's residuals n - B (fitted bins) to its refit shift B' - B.

    `matrix` has shape (n_bins, n_fitted): shift = matrix @ (n - B)[fitted].
    """

    fitted: BoolArray
    matrix: FloatArray

    def shifts(self, toys: npt.ArrayLike, background: FloatArray) -> FloatArray:
        """The first-order shift J delta-theta of each row of `toys` (bin counts over B's bins)."""
        residuals = np.asarray(toys, dtype=np.float64)[..., self.fitted] - background[self.fitted]
        return np.asarray(residuals @ self.matrix.T, dtype=np.float64)

    def refitted(self, toys: npt.ArrayLike, background: FloatArray) -> FloatArray:
        """The refitted background B' = B + J delta-theta of each row of `toys`, kept > 0.

        With r = J delta-theta / B the first-order change of ln mu, B' = B (1 + r) (the
        step of the module docstring; measured closest to the minimiser's refit, see
        tests/core/test_pseudodata.py), continued below r = -1/2 by B 0.5 exp(2 r + 1):
        the step in mu turns negative in the far tail, where ln mu moves by more than 1,
        and a window against B' <= 0 would claim an infinite excess. B' is then scaled to
        the toy's count over the fitted bins (the fit's profiled normalisation; a no-op
        unless the continuation acted). Bins with B = 0 stay 0.
        """
        counts = np.asarray(toys, dtype=np.float64)
        shift = self.shifts(counts, background)
        positive = background > 0
        ratio = np.divide(shift, background, out=np.zeros_like(shift), where=positive)
        # 1 + r, continued below r = -1/2 by 0.5 exp(2 r + 1) (value and slope match): never 0
        factor = np.where(
            ratio >= -0.5, 1.0 + ratio, 0.5 * np.exp(2.0 * np.clip(ratio, -350.0, -0.5) + 1.0)
        )
        refitted = background * factor
        # the fit's normalisation is profiled exactly: B' sums to the toy's fitted count
        total = counts[..., self.fitted].sum(axis=-1, keepdims=True)
        fitted_sum = refitted[..., self.fitted].sum(axis=-1, keepdims=True)
        scale = np.divide(total, fitted_sum, out=np.ones_like(total), where=total > 0)
        return np.asarray(refitted * scale, dtype=np.float64)


def refit_projection(
    jacobian: npt.ArrayLike, background: npt.ArrayLike, fitted: npt.ArrayLike
) -> RefitProjection:
    """The `RefitProjection` of a fit: J (J^T W J)^+ J^T W over the `fitted` bins (module doc).

    `jacobian` (n_bins, n_params) is d mu / d parameters (zero outside the fit range),
    `background` (n_bins) the fitted expected counts, `fitted` (n_bins, bool) the bins the
    likelihood used. Raises InvalidInputError on mismatched shapes, a fitted bin with B <= 0
    or non-finite values.
    """
    j = np.asarray(jacobian, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    used = np.asarray(fitted, dtype=bool)
    if j.ndim != 2 or j.shape[0] != b.size or used.shape != b.shape:
        raise InvalidInputError(
            f"refit projection: expected a jacobian (n_bins, n_params) and background and "
            f"fitted mask of n_bins; found {j.shape}, {b.shape}, {used.shape}"
        )
    if not (np.all(np.isfinite(j)) and np.all(np.isfinite(b))):
        raise InvalidInputError("refit projection: the jacobian and background must be finite")
    if np.any(b[used] <= 0):
        raise InvalidInputError(
            "refit projection: a bin used by the fit has background <= 0; the fitted mask "
            "must cover only bins with expected counts > 0"
        )
    weighted = j[used] / b[used, None]
    information = j[used].T @ weighted
    inverse = np.linalg.pinv(information, rcond=PSEUDO_INVERSE_RCOND, hermitian=True)
    return RefitProjection(used, np.asarray(j @ inverse @ weighted.T, dtype=np.float64))
