"""Fits the exp polynomial of the WebAssembly kernels (expOfReduced in
wasm/assembly/router.ts): exp(r) ~ 1 + r + r^2 q(r) on |r| <= ln2/2, q of
degree 4, minimax on the relative error of exp (a linear program on a
Chebyshev grid), then checks the float32 coefficients the way the kernel
evaluates them (Horner in float32, then (p r) r + r + 1) against float64 exp
on 2e7 random r, next to Cephes' degree-7 polynomial it replaced.

Run: python3 scripts/fit_exp.py [degree of q, default 4]  (numpy, scipy, mpmath)
"""
import sys

import mpmath as mp
import numpy as np
from scipy.optimize import linprog

mp.mp.dps = 40
deg = int(sys.argv[1]) if len(sys.argv) > 1 else 4
half = float(mp.log(2) / 2) * 1.0005  # a little past ln2/2: the reduction rounds
r = np.cos(np.linspace(0, np.pi, 4000)) * half
r = r[np.abs(r) > 1e-9]
g = np.array([float((mp.exp(mp.mpf(x)) - 1 - mp.mpf(x)) / mp.mpf(x) ** 2) for x in r])  # what q stands for
w = r**2 / np.exp(r)  # an error in q, relative to exp(r)
A = np.vstack([r**k for k in range(deg + 1)]).T
n = deg + 2  # coefficients, then the bound t
objective = np.zeros(n)
objective[-1] = 1
ub = np.vstack([np.hstack([w[:, None] * A, -np.ones((len(r), 1))]), np.hstack([-w[:, None] * A, -np.ones((len(r), 1))])])
fit = linprog(objective, A_ub=ub, b_ub=np.concatenate([w * g, -w * g]), bounds=[(None, None)] * n, method="highs")
coefs = [np.float32(c) for c in reversed(fit.x[:-1])]  # highest degree first: EXP_P0, EXP_P1, ...
print("EXP_P0.. (float32):", ", ".join(repr(float(c)) for c in coefs))


def worst_ulps(cs):
    rs = np.float32(np.random.default_rng(1).uniform(-0.3466, 0.3466, 20_000_000))
    p = np.full_like(rs, cs[0])
    for c in cs[1:]:
        p = p * rs + c
    y = (p * rs) * rs + rs + np.float32(1)
    exact = np.exp(rs.astype(np.float64))
    return (np.abs(y.astype(np.float64) - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)).max()


cephes = [np.float32(c) for c in [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1]]
print(f"float32 evaluation, worst error: {worst_ulps(coefs):.3f} ulp (Cephes degree 7: {worst_ulps(cephes):.3f} ulp)")
