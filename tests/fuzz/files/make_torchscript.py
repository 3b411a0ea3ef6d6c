#!/usr/bin/python3
"""Writes the small TorchScript modules of the fuzz corpus (run once with Debian's python3-torch 1.13;
the .ts files are committed, so the fuzz test needs no Python torch). Usage: make_torchscript.py [DIR]

reward_ok.ts is a valid reward for 2-D data (the source of the corrupted copies the test makes);
every other module is wrong in one way that tilt must report naming the file (or [base] dim)."""
import os
import sys

import torch


class Reward(torch.nn.Module):
    """r(x) = -|x - (2, 0)|^2 / 4: a valid reward, forward(x [B, 2]) -> [B]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("c", torch.tensor([2.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -((x - self.c) ** 2).sum(1) / 4.0


class RewardShape(torch.nn.Module):
    """Returns [B, 2] instead of [B]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


class RewardTuple(torch.nn.Module):
    """Returns a tuple, not a tensor."""

    def forward(self, x: torch.Tensor):
        return (x.sum(1), x.sum(1))


class RewardRaises(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this reward always fails")


class BaseShape(torch.nn.Module):
    """forward(x, t) returns [B, 3] for 2-D data."""

    def __init__(self):
        super().__init__()
        self.dim = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, t.reshape(-1, 1)], 1)


class BaseOneArg(torch.nn.Module):
    """forward(x): no time argument."""

    def __init__(self):
        super().__init__()
        self.dim = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


class BaseNoDim(torch.nn.Module):
    """A velocity without an integer attribute dim (so [base] dim is needed)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x


class BaseNegDim(torch.nn.Module):
    """dim = -2."""

    def __init__(self):
        super().__init__()
        self.dim = -2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x


class BaseRaises(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dim = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this base always fails")


class BaseNan(torch.nn.Module):
    """Returns NaN everywhere."""

    def __init__(self):
        super().__init__()
        self.dim = 2

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


MODULES = {"reward_ok": Reward, "reward_shape": RewardShape, "reward_tuple": RewardTuple,
           "reward_raises": RewardRaises, "base_shape": BaseShape, "base_onearg": BaseOneArg,
           "base_nodim": BaseNoDim, "base_negdim": BaseNegDim, "base_raises": BaseRaises, "base_nan": BaseNan}

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
    torch.manual_seed(0)
    for name, cls in MODULES.items():
        torch.jit.save(torch.jit.script(cls()), os.path.join(out, name + ".ts"))
