"""The one place where the tests' tolerances live (docs/design.md, "Reference results").

Relative error of an output array ``a`` against a reference ``b`` is one number
per array: ``max|a - b| / max|b|``. Every comparison in the tests goes through
:func:`assert_rel`, which turns that definition into a
``numpy.testing.assert_allclose`` call so that failures print the usual
element-wise report.
"""

from __future__ import annotations

import numpy as np
from numpy.testing import assert_allclose

# float64 inputs against the plain NumPy reference (tests/reference.py).
RTOL_F64 = 1e-10
# float32 inputs (computed in float32) against the float64 reference.
RTOL_F32 = 2e-4

# Finite differences of the meta-loss, float64 only. The tests use the
# fourth-order central stencil (f(x-2h) - 8 f(x-h) + 8 f(x+h) - f(x+2h)) / 12h:
# truncation ~ h^4 |f^(5)| ~ 1e-12 and rounding ~ eps |f| / h ~ 1e-13 for
# h = 1e-3 (measured: ~1e-12 on the test problems), so 1e-8 leaves a wide margin
# while any missing or wrong term (first order instead of exact: ~0.5) fails.
FD_STEP = 1e-3
FD_RTOL = 1e-8


def rel_error(a, b) -> float:
    """DESIGN's relative error max|a - b| / max|b| (inf if b is all zero and a is not)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if b.size else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_rel(actual, desired, rtol: float, err_msg: str = "") -> None:
    """Assert DESIGN's relative error of ``actual`` against ``desired`` is <= rtol.

    Implemented as ``assert_allclose(actual, desired, rtol=0, atol=rtol * max|desired|)``:
    an absolute tolerance scaled by the largest reference entry is exactly the
    per-array relative error. When ``desired`` is all zeros the tolerance is 0,
    so ``actual`` must be exactly zero too. Shapes must match exactly (no
    broadcasting hides a wrong shape).
    """
    actual_arr = np.asarray(actual)
    desired_arr = np.asarray(desired)
    assert actual_arr.shape == desired_arr.shape, (
        f"shape mismatch: actual {actual_arr.shape} vs desired {desired_arr.shape}. {err_msg}"
    )
    scale = float(np.max(np.abs(desired_arr.astype(np.float64)))) if desired_arr.size else 0.0
    assert np.isfinite(scale), f"the reference itself is not finite. {err_msg}"
    assert_allclose(
        actual_arr.astype(np.float64),
        desired_arr.astype(np.float64),
        rtol=0,
        atol=rtol * scale,
        err_msg=f"relative error {rel_error(actual_arr, desired_arr):.3e} > {rtol:.1e}. {err_msg}",
    )
