#!/usr/bin/python3
"""Python side of tests/cli/torchscript_test.sh (Debian's python3-torch, /usr/bin/python3). Few
invocations, since each pays ~2 s to import torch.

  mixture DIR
      writes {epsilon,score}_{linear,cosine}.ts: TorchScript modules computing the exact noise
      prediction or score of the reference-flow marginal of a ring mixture (4 components, radius 2,
      std 0.5), in closed form, in float64
  compare BASE.ts MODEL.ts:REFERENCE.pt ...
      checks that each exported module gives tilt's velocity at the reference points, also for a 0-dim
      t, and that it differs from the base module there
  exact REFERENCE.pt:PREDICTION:SCHEDULE ...
      checks tilt's velocity at the reference points against the closed-form mixture velocity
  conditional DIR
      writes cond_base.ts (a conditional velocity network forward(x, t, c: Optional[Tensor])),
      cond_reward.ts (a conditional reward forward(x, c)) and cond_ref.pt: points, conditions and the
      modules' values, a VJP and a reward gradient computed here by autograd, for tilt to compare
  roundtrip EXPORT.ts CHECK.pt OUT.ts
      checks tilt's export of a conditional model against tilt's values in CHECK.pt (c per row, one c
      for the batch, and the null condition c = None), then scripts it into a Python module of its own
      and saves that as OUT.ts, for tilt to load back
"""
import math
import sys
from typing import Optional

import torch


def schedule(name: str, t: torch.Tensor):
    """alpha_t, beta_t and their derivatives (docs/equations.md, E1-E4: t = 0 noise, t = 1 data)."""
    if name == "linear":
        return t, 1.0 - t, torch.ones_like(t), -torch.ones_like(t)
    if name == "cosine":
        h = math.pi / 2.0
        return torch.sin(h * t), torch.cos(h * t), h * torch.cos(h * t), -h * torch.sin(h * t)
    raise ValueError(name)


def ring(components: int, radius: float) -> torch.Tensor:
    angle = 2.0 * math.pi * torch.arange(components, dtype=torch.float64) / components
    return radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


class LinearMixtureScore(torch.nn.Module):
    """Exact score of p_t = sum_k w_k N(alpha mu_k, (alpha^2 s^2 + beta^2) I) for the linear schedule."""

    def __init__(self, mu: torch.Tensor, std: float, epsilon: bool):
        super().__init__()
        self.dim = mu.shape[1]
        self.epsilon = epsilon
        self.register_buffer("mu", mu)
        self.var = std * std

    def coefficients(self, t: torch.Tensor):
        return t, 1.0 - t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.coefficients(t.reshape(-1, 1))           # [B, 1]
        c = alpha * alpha * self.var + beta * beta                  # [B, 1], equal for every component
        diff = x.unsqueeze(1) - alpha.unsqueeze(2) * self.mu         # [B, K, d]
        gamma = torch.softmax(-0.5 * (diff * diff).sum(2) / c, dim=1)  # equal weights and variances
        score = -(gamma.unsqueeze(2) * diff).sum(1) / c
        return -beta * score if self.epsilon else score


class CosineMixtureScore(LinearMixtureScore):
    def coefficients(self, t: torch.Tensor):
        return torch.sin(t * (math.pi / 2.0)), torch.cos(t * (math.pi / 2.0))


def exact_velocity(x, t, mu, std, name):
    """v = sum_k gamma_k [alpha' mu_k + (alpha' alpha s^2 + beta' beta) / c (x - alpha mu_k)] (gmm.h)."""
    alpha, beta, d_alpha, d_beta = (v.reshape(-1, 1) for v in schedule(name, t))
    c = alpha * alpha * std * std + beta * beta
    diff = x.unsqueeze(1) - alpha.unsqueeze(2) * mu
    gamma = torch.softmax(-0.5 * (diff * diff).sum(2) / c, dim=1).unsqueeze(2)
    inner = d_alpha.unsqueeze(2) * mu + ((d_alpha * alpha * std * std + d_beta * beta) / c).unsqueeze(2) * diff
    return (gamma * inner).sum(1)


def fail(message: str) -> None:
    print("FAIL: " + message)
    sys.exit(1)


COMPONENTS, RADIUS, STD, T_MIN = 4, 2.0, 0.5, 1e-3


def check_exact(reference: str, prediction: str, name: str) -> None:
    ref = torch.load(reference)
    x, t, v = ref["x"].double(), ref["t"].double(), ref["v"].double()
    # tilt evaluates epsilon / score models at t clamped to [t_min, 1 - t_min].
    t = t.clamp(T_MIN, 1.0 - T_MIN)
    v_exact = exact_velocity(x, t, ring(COMPONENTS, RADIUS), STD, name)
    err = (v - v_exact).abs().max().item()
    if not err < 1e-5 * (1.0 + v_exact.abs().max().item()):
        fail(f"tilt's velocity from the {prediction} model ({name}) differs from the exact mixture velocity by {err}")
    print(f"ok: {prediction} ({name}) converted to the exact velocity, max error {err:.2e}")


def check_export(model_path: str, reference: str, base) -> None:
    model = torch.jit.load(model_path)
    ref = torch.load(reference)
    x, t, v = ref["x"], ref["t"], ref["v"]
    with torch.no_grad():
        got = model(x, t)
        err = (got - v).abs().max().item()
        if got.shape != v.shape or not err < 1e-5 * (1.0 + v.abs().max().item()):
            fail(f"{model_path} differs from tilt's velocity by {err} (shapes {got.shape}, {v.shape})")
        moved = (got - base(x, t)).abs().max().item()
        if not moved > 1e-3:
            fail(f"the fine-tuned model {model_path} equals the base (max difference {moved})")
        # A 0-dim time, and a batch of one.
        if not torch.allclose(model(x[:5], torch.tensor(0.5)), model(x[:5], torch.full((5,), 0.5)), atol=1e-6):
            fail("a 0-dim t gives another velocity than t = [0.5, ...]")
        model(x[:1], t[:1])
    if model.dim != x.shape[1]:
        fail(f"the module's dim attribute is {model.dim}, expected {x.shape[1]}")
    print(f"ok: Python's output of {model_path} equals tilt's velocity (max error {err:.2e}); "
          f"it differs from the base by up to {moved:.3f}")


class ConditionalVelocity(torch.nn.Module):
    """v(x, t | c): an MLP on [x, t, c, flag]; c = None is the null condition (c = 0, flag = 0)."""

    def __init__(self, dim: int, condition_dim: int):
        super().__init__()
        self.dim = dim
        self.condition_dim = condition_dim  # tilt reads the condition's size from this attribute
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1 + condition_dim + 1, 32), torch.nn.SiLU(),
                                       torch.nn.Linear(32, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        if c is None:
            cc = torch.zeros(n, self.condition_dim, dtype=x.dtype)
            flag = torch.zeros(n, 1, dtype=x.dtype)
        else:
            cc = c
            flag = torch.ones(n, 1, dtype=x.dtype)
        return self.net(torch.cat([x, t.reshape(-1, 1), cc, flag], dim=1))


class ConditionalReward(torch.nn.Module):
    """r(x, c) = -|x - c W|^2 / 2 + sin(x_0): a centre that moves with c."""

    def __init__(self, dim: int, condition_dim: int):
        super().__init__()
        self.condition_dim = condition_dim
        self.register_buffer("w", torch.randn(condition_dim, dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d = x - c @ self.w
        return -0.5 * (d * d).sum(dim=1) + torch.sin(x[:, 0])


def write_conditional(directory: str) -> None:
    torch.manual_seed(3)
    dim, dc, n, t0 = 2, 3, 16, 0.35
    base = torch.jit.script(ConditionalVelocity(dim, dc))
    reward = torch.jit.script(ConditionalReward(dim, dc))
    base.save(f"{directory}/cond_base.ts")
    reward.save(f"{directory}/cond_reward.ts")
    x, t, c, a = torch.randn(n, dim), torch.rand(n), torch.randn(n, dc), torch.randn(n, dim)
    with torch.no_grad():
        v, v_null = base(x, t, c), base(x, t, None)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(base(xg, torch.full((n,), t0), c), xg, grad_outputs=a)
    xr = x.clone().requires_grad_(True)
    r = reward(xr, c)
    (r_grad,) = torch.autograd.grad(r.sum(), xr)
    torch.save({"x": x, "t": t, "c": c, "a": a, "v": v, "v_null": v_null, "t0": torch.tensor(t0, dtype=torch.float64),
                "g": g, "r": r.detach(), "r_grad": r_grad}, f"{directory}/cond_ref.pt")
    print(f"ok: wrote {directory}/cond_base.ts, cond_reward.ts and cond_ref.pt")


class Rescripted(torch.nn.Module):
    """tilt's exported module inside a Python module of its own (what a user would build on it)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.dim = inner.dim
        self.condition_dim = inner.condition_dim

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        return self.inner(x, t, c)


def roundtrip(module_path: str, check_path: str, out_path: str) -> None:
    model = torch.jit.load(module_path)
    ref = torch.load(check_path)
    x, t, c, v = ref["x"], ref["t"], ref["c"], ref["v"]
    if model.condition_dim != c.shape[1] or model.dim != x.shape[1]:
        fail(f"the module's attributes are dim {model.dim}, condition_dim {model.condition_dim}")
    with torch.no_grad():
        got = model(x, t, c)
        err = (got - v).abs().max().item()
        if got.shape != v.shape or not err < 1e-5 * (1.0 + v.abs().max().item()):
            fail(f"{module_path} differs from tilt's conditional velocity by {err}")
        one = model(x[:6], t[:6], c[2:3])
        if not torch.allclose(one, model(x[:6], t[:6], c[2:3].expand(6, -1)), atol=1e-6):
            fail("one condition for the batch ([1, dc]) is not every row's")
        null = model(x, t)  # c defaults to None, the null condition
        if not torch.allclose(null, model(x, t, None)) or torch.allclose(null, got, atol=1e-3):
            fail("the null condition is not c = None, or equals the conditional velocity")
    print(f"ok: Python's output of {module_path} equals tilt's v(x, t | c) (max error {err:.2e}); "
          f"c = None gives the null condition")
    torch.jit.script(Rescripted(model)).save(out_path)


def main() -> None:
    torch.set_num_threads(1)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "mixture":
        for name, cls in (("linear", LinearMixtureScore), ("cosine", CosineMixtureScore)):
            for prediction in ("epsilon", "score"):
                module = cls(ring(COMPONENTS, RADIUS), STD, prediction == "epsilon")
                torch.jit.script(module).save(f"{args[0]}/{prediction}_{name}.ts")
    elif cmd == "exact":
        for item in args:
            reference, prediction, name = item.split(":")
            check_exact(reference, prediction, name)
    elif cmd == "conditional":
        write_conditional(args[0])
    elif cmd == "roundtrip":
        roundtrip(*args)
    elif cmd == "compare":
        base = torch.jit.load(args[0])
        for item in args[1:]:
            check_export(*item.split(":"), base)
    else:
        fail(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
