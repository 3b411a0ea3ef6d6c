#!/usr/bin/python3
"""Export a base velocity model and a reward model from PyTorch for tilt (TorchScript).

Run it with Debian's python3-torch (PyTorch 1.13), which only /usr/bin/python3 sees:

    /usr/bin/python3 examples/torchscript_export.py --out-dir runs/torchscript
    build/bin/tilt finetune -c configs/torchscript_2d.toml -o runs/torchscript/ft
    build/bin/tilt export -m runs/torchscript/ft/model.pt -o runs/torchscript/finetuned.ts

and load the fine-tuned model back in Python with torch.jit.load("runs/torchscript/finetuned.ts").

What tilt expects (README, "Using models from PyTorch (TorchScript)"):

* base model: a TorchScript module whose forward(x, t) takes x of shape [B, d] and t of shape [B]
  and returns a tensor [B, d]. Time runs as in tilt and flow matching: t = 0 is noise, t = 1 is data,
  on the path x_t = beta_t x0 + alpha_t x1 of a schedule that tilt knows ([schedule] in the config:
  linear alpha = t, beta = 1 - t; cosine; vp). The output may be the velocity (prediction =
  "velocity"), or, for a diffusion model, its noise prediction E[x0 | x_t] ("epsilon") or the score
  grad log p_t ("score"); tilt converts both to a velocity. A diffusion model written for the usual
  convention (s = 0 data, s = 1 noise) needs a wrapper whose forward calls it at s = 1 - t.
  Give the module an integer attribute `dim` (as below), or set [base] dim in the config.
* reward model: a TorchScript module whose forward(x) takes x [B, d] and returns r [B]. tilt takes
  its gradient with autograd, so it must be differentiable in x.
* conditional models (a condition c [B, dc], e.g. a class's one-hot row): forward(x, t, c) for a
  base, forward(x, c) for a reward, with an integer attribute `condition_dim = dc`. Declare
  c: Optional[torch.Tensor] and handle c = None to give the model a null condition (what guidance
  subtracts); tilt's export of a conditional model has forward(x, t, c=None).

Both are scripted with torch.jit.script (torch.jit.trace works too, but a traced module loses the
`dim` attribute and bakes in Python control flow).
"""
import argparse
import math
import os

import torch
from torch import nn


class VelocityNet(nn.Module):
    """v(x, t): an MLP on [x, t, sin(pi k t), cos(pi k t) for k = 1..4]."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.dim = dim  # tilt reads this integer attribute to learn the data dimension
        self.net = nn.Sequential(
            nn.Linear(dim + 9, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: [B, d], t: [B] (t = 0 noise, t = 1 data)
        tt = t.reshape(-1, 1)
        k = torch.arange(1, 5, dtype=x.dtype, device=x.device) * math.pi
        features = torch.cat([x, tt, torch.sin(tt * k), torch.cos(tt * k)], dim=1)
        return self.net(features)


class QuadraticReward(nn.Module):
    """r(x) = -|x - c|^2 / 8: pulls samples towards c."""

    def __init__(self, center):
        super().__init__()
        self.register_buffer("center", torch.tensor(center, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.center) ** 2).sum(dim=1) / 8.0  # shape [B]


def ring_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples of 8 Gaussians (std 0.5) on a circle of radius 3: the data of configs/demo_2d.toml."""
    k = torch.randint(0, 8, (n,), generator=generator)
    angle = 2.0 * math.pi * k.to(torch.float32) / 8.0
    means = 3.0 * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return means + 0.5 * torch.randn(n, 2, generator=generator)


def train_flow_matching(model: nn.Module, steps: int, seed: int) -> None:
    """Flow matching with the linear schedule: x_t = (1 - t) x0 + t x1, target velocity x1 - x0."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(steps):
        x1 = ring_data(256, generator)
        x0 = torch.randn(256, 2, generator=generator)
        t = torch.rand(256, generator=generator)
        xt = (1.0 - t[:, None]) * x0 + t[:, None] * x1
        loss = ((model(xt, t) - (x1 - x0)) ** 2).sum(dim=1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if steps >= 10 and (step + 1) % (steps // 5) == 0:
            print(f"flow matching step {step + 1}/{steps}: loss {loss.item():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default="runs/torchscript", help="where to write the .ts files")
    parser.add_argument("--steps", type=int, default=3000, help="flow-matching steps (0: an untrained network)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    os.makedirs(args.out_dir, exist_ok=True)

    base = VelocityNet(dim=2)
    train_flow_matching(base, args.steps, args.seed)
    base.eval()
    base_path = os.path.join(args.out_dir, "base_velocity.ts")
    torch.jit.script(base).save(base_path)  # [base] type = "torchscript", prediction = "velocity"

    reward_path = os.path.join(args.out_dir, "reward.ts")
    torch.jit.script(QuadraticReward([2.5, 0.0])).save(reward_path)  # [reward] type = "torchscript"
    print(f"wrote {base_path} and {reward_path}")


if __name__ == "__main__":
    main()
