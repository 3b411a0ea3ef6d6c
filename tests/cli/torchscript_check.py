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
"""
import math
import sys

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
    elif cmd == "compare":
        base = torch.jit.load(args[0])
        for item in args[1:]:
            check_export(*item.split(":"), base)
    else:
        fail(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
