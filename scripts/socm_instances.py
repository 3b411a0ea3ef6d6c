#!/usr/bin/env python3
"""The SOC-matching paper's benchmark instances, drawn as facebookresearch/SOC-matching draws them, and
their optimal values V(x0, 0): the numbers that tests/unit/soc_instances_test.cpp checks tilt's
`instance = "socm"` against (docs/soc.md, "Instances").

SOC-matching seeds PyTorch's global CPU generator with torch.manual_seed(seed) and then draws, in
float32 on the CPU, x0 = 0.5 * randn(d) for the quadratic OU problems (d = 20) and
xi = 0.1 * randn(d, d) for linear OU (d = 10; A = -I + xi, sigma = I + xi, formed in float32). These are
the first draws after seeding. This script repeats those calls and computes V(x0, 0) independently of
tilt's code, in double precision:
  - quadratic OU (A = a I, P = p I, Q = q I, sigma = I): F(t) = phi(t) I with the scalar Riccati equation
    phi' = -2 a phi + 2 phi^2 - p, phi(T) = q, integrated by RK4 on 100 000 steps (its integral by the trapezoid rule), and
    V(x0, 0) = phi(0) |x0|^2 + d * integral_0^T phi;
  - linear OU: V(x0, 0) = beta(0) . x0 - 1/2 integral_0^T |sigma^T beta(s)|^2 ds with
    beta(s) = expm((T - s) A^T) omega (torch.matrix_exp), by Simpson's rule on 4000 intervals.
It also prints the value SOC-matching's own ground truth gives (explicit Euler on the 50-step grid), for
reference only. Usage: python3 scripts/socm_instances.py [seed]
"""
import sys

import torch


def quadratic_value(x0, a, p, q, T=1.0, n=100000):
    d = x0.numel()
    h = T / n
    rate = lambda phi: -(-2 * a * phi + 2 * phi * phi - p)  # d phi / d s with s = T - t
    phi, integral = q, 0.0
    for _ in range(n):
        k1 = rate(phi)
        k2 = rate(phi + 0.5 * h * k1)
        k3 = rate(phi + 0.5 * h * k2)
        k4 = rate(phi + h * k3)
        new = phi + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        integral += 0.5 * h * (phi + new)  # trapezoid: error O(h^2) = 1e-10 here
        phi = new
    return phi * float((x0.double() ** 2).sum()) + d * integral


def quadratic_value_socm_euler(x0, a, p, q, T=1.0, steps=50):
    """SOC-matching's explicit-Euler Riccati on its grid, V = x0^T F(0) x0 (its value has no offset c)."""
    F = q
    for _ in range(steps):
        F = F - (T / steps) * (-2 * a * F + 2 * F * F - p)
    return F * float((x0.double() ** 2).sum())


def linear_value(A, sigma, omega, x0, T=1.0, n=4000):
    A, sigma, omega, x0 = A.double(), sigma.double(), omega.double(), x0.double()
    beta = lambda s: torch.matrix_exp((T - s) * A.t()) @ omega
    h = T / n
    total = 0.0
    for j in range(n + 1):
        w = 1 if j in (0, n) else (4 if j % 2 else 2)
        total += w * float(((sigma.t() @ beta(j * h)) ** 2).sum())
    return float(beta(0.0) @ x0) - 0.5 * total * h / 3


def main():
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    torch.manual_seed(seed)
    x0 = 0.5 * torch.randn(20)  # SOC-matching: define_variables, OU_quadratic_*, d = 20
    print(f"quadratic OU, seed {seed}: x0 = {[float(v) for v in x0]}")
    print(f"  |x0|^2 = {float((x0.double() ** 2).sum()):.10f}")
    print(f"  easy: V(x0, 0) = {quadratic_value(x0, 0.2, 0.2, 0.1):.10f}"
          f"  (SOC-matching's 50-step Euler Riccati, no offset: {quadratic_value_socm_euler(x0, 0.2, 0.2, 0.1):.6f})")
    print(f"  hard: V(x0, 0) = {quadratic_value(x0, 1.0, 1.0, 0.5):.10f}")

    torch.manual_seed(seed)
    d = 10
    xi = 0.1 * torch.randn(d, d)  # SOC-matching: define_variables, OU_linear
    A = -torch.eye(d) + xi
    sigma = torch.eye(d) + xi
    print(f"linear OU, seed {seed}: xi[0] = {[float(v) for v in xi[0]]}")
    print(f"  A[0, 0] = {float(A[0, 0]):.10f}, sigma[0, 0] = {float(sigma[0, 0]):.10f}, sigma[9, 9] = {float(sigma[9, 9]):.10f}")
    print(f"  sum A = {float(A.double().sum()):.10f}, sum sigma = {float(sigma.double().sum()):.10f}")
    print(f"  V(0, 0) = {linear_value(A, sigma, torch.ones(d), torch.zeros(d)):.10f}")


if __name__ == "__main__":
    main()
