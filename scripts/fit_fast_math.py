"""Fit the polynomial coefficients of fastkd's fast exp and log (csrc/fast_math.h).

Run: ``python scripts/fit_fast_math.py``. Prints float32 coefficients for

* exp(r) = 1 + r + r^2 * P(r) on |r| <= ln2/2 (after n = round(x / ln2), r = x - n ln2),
* log(1 + u) = u - u^2/2 + u^3 * Q(u) on u in [sqrt(1/2) - 1, sqrt(2) - 1]
  (after x = 2^e (1 + u) with 1 + u in [sqrt(1/2), sqrt(2))),

minimising the maximum relative error of the whole approximation with Lawson's algorithm
(iteratively reweighted least squares, which converges to the minimax fit), in float64 with
mpmath references. The coefficients are rounded to float32 and the achieved error is printed.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np


def lawson(xs, base, target, weight, degree, iters=400):
    """Coefficients c of sum_k c_k x^k minimising max |(base + x^m * sum c x^k - target) * weight|."""
    A = np.vander(xs, degree + 1, increasing=True)
    w = np.ones_like(xs) / len(xs)
    c = None
    for _ in range(iters):
        sw = np.sqrt(w)
        c, *_ = np.linalg.lstsq(A * sw[:, None], target * sw, rcond=None)
        err = np.abs(A @ c - target)
        w = w * err
        w = w / w.sum()
    return c


def main() -> None:
    mpmath.mp.dps = 40
    # --- exp
    h = math.log(2) / 2
    r = np.cos(np.linspace(0, np.pi, 4001)) * h
    r = r[np.abs(r) > 1e-6]
    e = np.array([float(mpmath.exp(mpmath.mpf(x))) for x in r])
    # e = 1 + r + r^2 P(r): fit P = (e - 1 - r) / r^2 with relative weight r^2 / e
    tgt = np.array([float((mpmath.exp(mpmath.mpf(x)) - 1 - mpmath.mpf(x)) / mpmath.mpf(x) ** 2) for x in r])
    for deg in (3, 4):
        wts = r**2 / e
        A = np.vander(r, deg + 1, increasing=True)
        ww = np.ones_like(r) / len(r)
        for _ in range(400):
            sw = np.sqrt(ww)
            c, *_ = np.linalg.lstsq(A * (sw * wts)[:, None], tgt * sw * wts, rcond=None)
            err = np.abs((A @ c - tgt) * wts)
            ww = ww * err
            ww /= ww.sum()
        c32 = c.astype(np.float32).astype(np.float64)
        approx = 1 + r + r**2 * (np.vander(r, deg + 1, increasing=True) @ c32)
        rel = np.max(np.abs(approx - e) / e)
        print(
            f"exp: P degree {deg} (total degree {deg + 2}): max relative error {rel:.3g} ({rel / 2**-24:.2f} half-ulp)"
        )
        print(
            "  coefficients c2..: "
            + ", ".join(f"{np.float32(x)!r}f".replace("np.float32(", "").replace(")", "") for x in c.astype(np.float32))
        )
    # --- log
    lo, hi = math.sqrt(0.5) - 1, math.sqrt(2) - 1
    u = (np.cos(np.linspace(0, np.pi, 4001)) + 1) / 2 * (hi - lo) + lo
    u = u[np.abs(u) > 1e-4]
    ref = np.array([float(mpmath.log1p(mpmath.mpf(x))) for x in u])
    tgt = np.array(
        [float((mpmath.log1p(mpmath.mpf(x)) - mpmath.mpf(x) + mpmath.mpf(x) ** 2 / 2) / mpmath.mpf(x) ** 3) for x in u]
    )
    for deg in (5, 6, 7):
        wts = np.abs(u**3 / ref)
        A = np.vander(u, deg + 1, increasing=True)
        ww = np.ones_like(u) / len(u)
        for _ in range(400):
            sw = np.sqrt(ww)
            c, *_ = np.linalg.lstsq(A * (sw * wts)[:, None], tgt * sw * wts, rcond=None)
            err = np.abs((A @ c - tgt) * wts)
            ww = ww * err
            ww /= ww.sum()
        c32 = c.astype(np.float32).astype(np.float64)
        approx = u - u**2 / 2 + u**3 * (np.vander(u, deg + 1, increasing=True) @ c32)
        rel = np.max(np.abs(approx - ref) / np.abs(ref))
        print(f"log1p: Q degree {deg}: max relative error {rel:.3g} ({rel / 2**-24:.2f} half-ulp)")
        print(
            "  coefficients q0..: "
            + ", ".join(f"{np.float32(x)!r}f".replace("np.float32(", "").replace(")", "") for x in c.astype(np.float32))
        )


if __name__ == "__main__":
    main()
